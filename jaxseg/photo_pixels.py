"""How a photo file's pixels are read and written: the rules that prediction and the dataset
builders share (one module, since prediction cannot import the builders' package: it imports
TensorFlow). `decode_photo` applies them all; `encode_png` is the one way both write pixels.

- Which files are photos (`IMAGE_SUFFIXES`; hidden files and folders, and the system's
  Thumbs.db, desktop.ini and Icon\\r, never are: `is_hidden`).
- Which photos PIL decodes (`decoded_by_pil`): those with transparency, so that colour and
  alpha come from one decode and a TIFF's colours unmultiplied (OpenCV multiplies them by the
  alpha); the others OpenCV decodes, 16-bit ones reduced to 8 bits (a 16-bit grey PNG's
  transparent value still gives the alpha).
- Orientation: as a viewer shows the photo, by its EXIF orientation (or, without one, its XMP
  orientation, as PIL reads them: `orientation_of`, `orient`), whichever library decodes it.
- Colour: training photos and outputs are sRGB (untagged files, and files whose profile
  cannot be used, are read as sRGB); a phone's Display P3 or a camera's Adobe RGB photo holds
  the same numbers for other colours, and is converted (`to_srgb`).
"""
from __future__ import annotations

import io
import pathlib

import cv2
import numpy as np
from PIL import Image, ImageCms


# .jfif and .jpe are JPEGs too: browsers' "save image" names them so.
IMAGE_SUFFIXES = frozenset({".jpg", ".jpeg", ".jfif", ".jpe", ".png", ".bmp", ".webp", ".tif",
                            ".tiff"})


# Files that Windows (thumbnail caches, folder settings) and macOS (a folder's custom icon)
# write into a folder the user browses, under names without a leading '.'.
_SYSTEM_FILES = frozenset({"thumbs.db", "desktop.ini", "icon\r"})


def is_hidden(relative: pathlib.PurePath) -> bool:
    """Whether a path inside a folder of photos is hidden (a part starts with '.', or is one of
    the system's files): macOS's ._x.jpg resource forks, .DS_Store and thumbnail folders, and
    Windows' Thumbs.db, are not the user's photos."""
    return any(part.startswith(".") or part.lower() in _SYSTEM_FILES for part in relative.parts)


_EXIF_ORIENTATION = 0x0112


class PhotoError(ValueError):
    """Pixels that cannot be read or written; the message says why."""


# PIL clips these (16/32-bit gray) to 8 bits instead of scaling them: OpenCV reads them.
_WIDE_GRAY_MODES = frozenset({"I", "I;16", "I;16B", "I;16L", "F"})


def decoded_by_pil(image: Image.Image) -> bool:
    """Whether an opened (not yet decoded) photo's pixels are taken from PIL, as RGBA."""
    return image.has_transparency_data and image.mode not in _WIDE_GRAY_MODES


def orientation_of(image: Image.Image) -> int:
    """The orientation to apply to an opened photo's decoded pixels, 1 (as stored) to 8; 1 where
    it has none or an unusable one, and for a TIFF, which PIL and OpenCV turn as they decode it.

    Call it before the pixels are loaded: loading a PNG makes PIL read an EXIF chunk placed
    after the pixels, which viewers ignore (the PNG spec puts it before them).
    """
    if image.format == "TIFF":
        return 1
    try:
        # Image.getexif, not PngImageFile's: that one decodes a whole PNG to look for EXIF after
        # the pixels, where the PNG spec does not put it. PIL falls back to XMP's orientation.
        value = Image.Image.getexif(image).get(_EXIF_ORIENTATION, 1)
    except Exception:  # unparsable EXIF: the pixels are fine, show them as stored
        return 1
    return value if value in range(1, 9) else 1


def orient(array: np.ndarray, orientation: int) -> np.ndarray:
    """Apply EXIF ORIENTATION (1..8) to an HxW[xC] array, as a viewer displays it."""
    transposed = np.swapaxes(array, 0, 1)
    return {
        1: array,
        2: array[:, ::-1],
        3: array[::-1, ::-1],
        4: array[::-1],
        5: transposed,
        6: transposed[:, ::-1],  # rotate 90 degrees clockwise
        7: transposed[::-1, ::-1],
        8: transposed[::-1],  # rotate 90 degrees counter-clockwise
    }[orientation]


def decode_photo(data: bytes) -> tuple[np.ndarray, np.ndarray | None, list[str]]:
    """(uint8 (H, W, 3) RGB in sRGB, uint8 (H, W) alpha or None when opaque, notes on what was
    converted) of an encoded photo, shown as a viewer shows it. PhotoError when it cannot be.

    PIL's guard against decompression bombs applies: callers that check sizes themselves
    lift it around the call.
    """
    try:
        image = Image.open(io.BytesIO(data))
        orientation = orientation_of(image)
        icc_profile = image.info.get("icc_profile")
        notes, rgb, alpha = [], None, None
        if decoded_by_pil(image):
            rgba = np.asarray(image.convert("RGBA"))
            rgb, alpha = rgba[..., :3], rgba[..., 3]
        elif "transparency" in image.info and image.mode in _WIDE_GRAY_MODES:
            # A 16-bit grey PNG's tRNS: one grey value is see-through (OpenCV would drop it).
            see_through = np.asarray(image) == image.info["transparency"]
            alpha = np.where(see_through, 0, 255).astype(np.uint8)
    except Exception as e:  # PIL raises many types for non-images and damaged files
        raise PhotoError(f"not a readable image ({e.__class__.__name__})") from None
    if rgb is None:
        # IMREAD_COLOR turns grayscale, palette and CMYK into 3 channels; ANYDEPTH keeps
        # 16 bits so that the reduction to 8 bits is explicit here.
        flags = cv2.IMREAD_COLOR | cv2.IMREAD_ANYDEPTH | cv2.IMREAD_IGNORE_ORIENTATION
        bgr = cv2.imdecode(np.frombuffer(data, np.uint8), flags)
        if bgr is None:
            raise PhotoError("could not decode the image")
        if bgr.dtype == np.uint16:
            bgr = (bgr >> 8).astype(np.uint8)
            notes.append("16-bit image reduced to 8 bits")
        elif bgr.dtype != np.uint8:
            raise PhotoError(f"unsupported pixel type {bgr.dtype}")
        rgb = cv2.cvtColor(bgr, cv2.COLOR_BGR2RGB)
    rgb = np.ascontiguousarray(orient(rgb, orientation))
    alpha = None if alpha is None else np.ascontiguousarray(orient(alpha, orientation))
    try:
        if needs_conversion(icc_profile):
            rgb = to_srgb(rgb, icc_profile)
            notes.append("colour profile converted to sRGB")
    except ValueError as e:  # as viewers do: a broken profile is no reason to lose the photo
        notes.append(f"{e}: read as sRGB")
    return rgb, alpha, notes


def encode_png(array: np.ndarray) -> bytes:
    """Lossless PNG of a uint8 (H, W) gray, (H, W, 3) RGB or (H, W, 4) RGBA array."""
    if array.ndim == 3:
        to_bgr = cv2.COLOR_RGB2BGR if array.shape[2] == 3 else cv2.COLOR_RGBA2BGRA
        array = cv2.cvtColor(array, to_bgr)
    ok, buffer = cv2.imencode(".png", array)
    if not ok:
        raise PhotoError("PNG encoding failed")
    return buffer.tobytes()


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
