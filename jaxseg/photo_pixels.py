"""How a photo file's pixels are read: the rules that prediction and the dataset builders share
(one module, since prediction cannot import the builders' package: it imports TensorFlow).

- Which files are photos (`IMAGE_SUFFIXES`; hidden files and folders never are: `is_hidden`).
- Which photos PIL decodes (`decoded_by_pil`): those with transparency, so that colour and
  alpha come from one decode and a TIFF's colours unmultiplied (OpenCV multiplies them by the
  alpha); the others OpenCV decodes.
- Colour: training photos and outputs are sRGB (untagged files are read as sRGB); a phone's
  Display P3 or a camera's Adobe RGB photo holds the same numbers for other colours, and is
  converted (`to_srgb`).
"""
from __future__ import annotations

import io
import pathlib

import numpy as np
from PIL import Image, ImageCms


IMAGE_SUFFIXES = frozenset({".jpg", ".jpeg", ".png", ".bmp", ".webp", ".tif", ".tiff"})


def is_hidden(relative: pathlib.PurePath) -> bool:
    """Whether a path inside a folder of photos is hidden (a part starts with '.'): macOS's
    ._x.jpg resource forks, .DS_Store and thumbnail folders are not the user's photos."""
    return any(part.startswith(".") for part in relative.parts)


# PIL clips these (16/32-bit gray) to 8 bits instead of scaling them: OpenCV reads them.
_WIDE_GRAY_MODES = frozenset({"I", "I;16", "I;16B", "I;16L", "F"})


def decoded_by_pil(image: Image.Image) -> bool:
    """Whether an opened (not yet decoded) photo's pixels are taken from PIL, as RGBA."""
    return image.has_transparency_data and image.mode not in _WIDE_GRAY_MODES


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
