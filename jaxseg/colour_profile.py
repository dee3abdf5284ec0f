"""Photos tagged with a colour profile other than sRGB, converted to sRGB.

Training photos and outputs are sRGB (untagged files are read as sRGB); a phone's Display P3 or a
camera's Adobe RGB photo holds the same numbers for other colours. Prediction and the dataset
builders both read photos through `to_srgb`, so a model sees a photo the same way in training,
evaluation and use.
"""
from __future__ import annotations

import io

import numpy as np
from PIL import Image, ImageCms


def needs_conversion(icc_profile: bytes | None) -> bool:
    """Whether a photo with this embedded profile holds other than sRGB numbers: an RGB profile
    not named sRGB. Untagged photos, sRGB and non-RGB (CMYK, gray) profiles do not.
    ValueError for a profile that cannot be parsed."""
    if not icc_profile:
        return False
    profile = _parse(icc_profile)
    return (profile.profile.xcolor_space.strip() == "RGB"
            and "srgb" not in ImageCms.getProfileDescription(profile).lower())


def to_srgb(rgb: np.ndarray, icc_profile: bytes | None) -> np.ndarray:
    """uint8 (H, W, 3) RGB in the embedded profile's space -> the same photo in sRGB (unchanged
    where needs_conversion says no). ValueError for an unusable profile."""
    if not needs_conversion(icc_profile):
        return rgb
    try:
        converted = ImageCms.profileToProfile(Image.fromarray(rgb), _parse(icc_profile),
                                              ImageCms.createProfile("sRGB"), outputMode="RGB")
    except (ImageCms.PyCMSError, OSError) as e:
        raise ValueError(f"unusable colour profile ({e.__class__.__name__})") from None
    return np.asarray(converted)


def _parse(icc_profile: bytes) -> ImageCms.ImageCmsProfile:
    try:
        return ImageCms.ImageCmsProfile(io.BytesIO(icc_profile))
    except (ImageCms.PyCMSError, OSError) as e:
        raise ValueError(f"unusable colour profile ({e.__class__.__name__})") from None
