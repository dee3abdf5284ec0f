"""Reading and validating photos and person masks for the dataset builders.

Photos decode to uint8 HxWx3 RGB with the EXIF orientation applied; masks to
uint8 HxW of 0 (background) / 1 (person). Every problem with a file surfaces as
`BadFile`, whose message is the reason written to the build report.
"""
import dataclasses
import hashlib
import io
import pathlib

import cv2
import numpy as np
import scipy.io
from PIL import Image

from jaxseg import photo_pixels

# EXIF orientations 5..8 swap width and height.
_TRANSPOSING = frozenset({5, 6, 7, 8})


class BadFile(ValueError):
    """A file that cannot be used; the message says why."""


@dataclasses.dataclass(frozen=True)
class Photo:
    """A validated photo: its displayed size and how it will be stored."""

    path: pathlib.Path
    height: int  # after the EXIF orientation
    width: int
    orientation: int  # EXIF orientation, 1 = as stored
    as_is: bool  # the original file bytes are stored (plain 8-bit RGB JPEG, sRGB, no rotation)
    notes: tuple[str, ...]  # conversions applied, for the build report
    digest: bytes  # SHA-256 of the file: the same photo in two splits is found by it


def _read_bytes(path: pathlib.Path) -> bytes:
    try:
        data = pathlib.Path(path).read_bytes()
    except OSError as e:
        raise BadFile(f"cannot read file: {e}") from e
    if not data:
        raise BadFile("empty file (0 bytes)")
    return data


def _open_checked(data: bytes) -> tuple[Image.Image, int]:
    """(image, orientation to apply to its pixels, as `photo_pixels.decode_photo` applies it):
    opened and fully decoded with Pillow, which raises on truncated or corrupt data.

    OpenCV decodes a truncated JPEG partially with only a warning on stderr, so
    Pillow's full decode is the check that the pixel data is complete.
    """
    try:
        image = Image.open(io.BytesIO(data))
        orientation = photo_pixels.orientation_of(image)  # before loading, as it says
        image.load()
    except Image.UnidentifiedImageError as e:
        raise BadFile("not an image (unknown or corrupt format)") from e
    except Exception as e:  # Pillow signals bad data with many exception types.
        raise BadFile(f"not a readable image: {type(e).__name__}: {e}") from e
    return image, orientation


def _decode_rgb(data: bytes) -> tuple[np.ndarray, list[str]]:
    """The photo's RGB pixels in sRGB and what was converted, as prediction reads them."""
    try:
        rgb, _, notes = photo_pixels.decode_photo(data)
    except photo_pixels.PhotoError as e:
        raise BadFile(str(e)) from None
    return rgb, notes


def probe_photo(path: pathlib.Path) -> Photo:
    """Validate the photo at PATH fully (decodes it) and describe how to store it."""
    data = _read_bytes(path)
    image, orientation = _open_checked(data)
    notes = []
    try:
        converted = photo_pixels.needs_conversion(image.info.get("icc_profile"))
    except ValueError as e:  # read as sRGB, as prediction reads it
        converted = False
        notes.append(f"{e}: read as sRGB")
    as_is = (image.format == "JPEG" and image.mode == "RGB" and orientation == 1
             and not converted)
    if image.mode != "RGB":
        notes.append(f"{image.mode} image converted to RGB")
    if orientation != 1:
        notes.append(f"EXIF orientation {orientation} applied")
    height, width = image.height, image.width
    if not as_is:
        # Converted photos are decoded again when written; decoding here proves
        # that they decode, to the size Pillow reported.
        rgb, decode_notes = _decode_rgb(data)
        notes += [n for n in decode_notes if n not in notes]
        if orientation in _TRANSPOSING:
            height, width = width, height
        if rgb.shape[:2] != (height, width):
            raise BadFile(f"decodes to {rgb.shape[1]}x{rgb.shape[0]}, Pillow says {width}x{height}")
    return Photo(pathlib.Path(path), height, width, orientation, as_is, tuple(notes),
                 hashlib.sha256(data).digest())


def photo_bytes(photo: Photo) -> bytes:
    """Encoded image to store: the original JPEG when it decodes unchanged, else lossless PNG."""
    data = _read_bytes(photo.path)
    if photo.as_is:
        return data
    return photo_pixels.encode_png(_decode_rgb(data)[0])


def read_mask_image(path: pathlib.Path, *, cutout: bool = False) -> np.ndarray:
    """Raw values of a mask image as a 2-D array, person where the values are high.

    Palette images are read by their palette colours, like colour masks (any
    bright channel marks the person): their indices carry no fixed meaning (a
    2-colour quantized palette may list white first), except that in a label map
    (at most 22 indices, no transparency) index 255 beside other labels is VOC's
    void, read as no person (VOC-style palettes put the person at index 15 and the
    boundary at 255). A palette that does not cover the indices used (tools writing
    0/1 index masks without one) gives the indices. An alpha band that varies over
    a constant colour or over a photo's own colours (a cutout or matte saved as
    RGBA/LA) is the mask, as is an all-zero one there (a cutout without a person);
    otherwise alpha is ignored, as in colour masks. `cutout`: the file is named
    as a cutout, so an alpha band over a photo's colours is the mask even where
    it is uniform (the cutout of a photo that is all person). The mask's own EXIF
    orientation is applied, as to photos.
    """
    image, orientation = _open_checked(_read_bytes(path))
    return np.ascontiguousarray(photo_pixels.orient(_mask_values(image, cutout), orientation))


def _mask_values(image: Image.Image, cutout: bool = False) -> np.ndarray:
    if image.mode in ("P", "PA"):
        indices = np.asarray(image)
        if image.mode == "PA":
            indices = indices[..., 0]
        entries = len(image.getpalette("RGB") or ()) // 3
        if indices.size and int(indices.max()) >= entries:
            return indices
        has_alpha = image.mode == "PA" or "transparency" in image.info
        used = np.unique(indices)
        if not has_alpha and 255 in used and len(used) <= 22 and (used % 255).any():
            # A label map (VOC's 21 classes at most) with index 255 beside other labels: 255 is
            # PASCAL VOC's void (boundary, ambiguous), no person whatever its colour, as a grey
            # void-marked mask reads it (binarize). A quantized photo uses more indices.
            rgb = np.array(image.convert("RGB"))
            rgb[indices == 255] = 0
            return rgb.max(axis=2)
        image = image.convert("RGBA" if has_alpha else "RGB")
    if image.mode in ("LA", "RGBA"):
        pixels = np.asarray(image)
        colour, alpha = pixels[..., :-1], pixels[..., -1]
        # A cutout: the person is in the alpha, over one colour or over the photo's own colours
        # (more than two levels, which no two-level mask has); an all-zero alpha there is the
        # cutout of a photo without a person. Else the colour is the label: a two-level mask
        # whatever its alpha, an opaque soft mask (many levels, uniform alpha; so a cutout that
        # is all person reads by its colours, as it cannot be told from one, unless named as a
        # cutout).
        over_photo_colours = len(np.unique(colour.max(axis=2))) > 2
        over_cutout_colours = (colour == colour[:1, :1]).all() or over_photo_colours
        if over_cutout_colours and (alpha.max() == 0 or alpha.min() != alpha.max()
                                    or (cutout and over_photo_colours)):
            return alpha
        if image.mode == "LA":  # a two-level value plus alpha: the value is the label
            return pixels[..., 0]
    if len(image.getbands()) == 1:  # gray, 1-bit, 16/32-bit
        return np.asarray(image)
    # Colour masks: any bright channel marks the person (alpha is ignored).
    return np.asarray(image.convert("RGB")).max(axis=2)


def read_mat(path: pathlib.Path, variable: str) -> np.ndarray:
    """Variable VARIABLE of the MATLAB file at PATH."""
    try:
        size = pathlib.Path(path).stat().st_size
    except OSError as e:  # a dangling link, say: this file is skipped, not the build
        raise BadFile(f"cannot read it ({e.strerror or e})") from e
    if not size:
        raise BadFile("empty file (0 bytes)")
    try:
        return scipy.io.loadmat(path, variable_names=[variable])[variable]
    except KeyError as e:
        raise BadFile(f"no variable {variable!r} in the .mat file") from e
    except Exception as e:  # scipy signals bad files with many exception types.
        raise BadFile(f"not a readable .mat file: {type(e).__name__}: {e}") from e


def read_mat_mask(path: pathlib.Path, variable: str) -> np.ndarray:
    """Variable VARIABLE of the MATLAB file at PATH as a mask or label map: a non-empty 2-D
    array of numbers, else `BadFile` (a 3-D, empty, text or cell array stopped the whole
    build with a traceback)."""
    values = read_mat(path, variable)
    numeric = values.dtype == bool or np.issubdtype(values.dtype, np.integer) or np.issubdtype(
        values.dtype, np.floating)
    if values.ndim != 2 or not values.size or not numeric:
        shape = "x".join(map(str, values.shape)) or "scalar"
        raise BadFile(f"{variable!r} is a {shape} array of {values.dtype}, not a 2-D mask of numbers")
    return values


ODD_MASK_VALUES = "mask values other than "  # how binarize's note on them starts


def binarize(values: np.ndarray) -> tuple[np.ndarray, str | None]:
    """0/1 uint8 mask from 0/1 or 0/255 (0/65535) values; a note when other values occur (0/1
    with a void of 255, as `_void_marked` tells: person = 1; a floating-point matte of 0-1 is cut
    at 0.5; otherwise a threshold at half the bit depth of the largest value). BadFile for a
    floating-point mask holding NaN or infinite values."""
    floating = np.issubdtype(values.dtype, np.floating)
    if floating and not np.isfinite(values).all():
        raise BadFile("mask holds NaN or infinite values")
    if ((values == 0) | (values == 1)).all():
        return (values == 1).astype(np.uint8), None
    top = values.max()
    # The depth the values were saved at: a 12-bit matte (0-4095) in a 16-bit file is cut at 2047.
    full = 255 if top <= 255 else (1 << int(top).bit_length()) - 1
    if ((values == 0) | (values == full)).all():
        return (values == full).astype(np.uint8), None
    if full == 255 and ((values == 0) | (values == 1) | (values == 255)).all():
        if _void_marked(values):
            return (values == 1).astype(np.uint8), "0/1 mask with 255 (void) pixels; void read as background"
        return (values == 255).astype(np.uint8), "0/255 mask with stray 1 pixels; person = 255"
    if ((values == 0) | (values == top)).all():  # two levels at another depth (16-bit 0/1000)
        return (values == top).astype(np.uint8), f"0/{top} mask; person = {top}"
    if floating and top < 2:
        # A floating-point matte (32-bit TIFF) holds coverage 0-1 (a little over 1 where it was
        # resampled): cut at half, as integer mattes are at half their depth, not at 0, which
        # would make a faint halo person.
        return (values > 0.5).astype(np.uint8), "soft 0-1 floating-point mask; person = value > 0.5"
    # Small maxima mean a 0/1-style (or label) mask with stray values.
    threshold = 0 if top < 128 else full // 2
    note = f"{ODD_MASK_VALUES}0/1/{full} (max {top}); person = value > {threshold}"
    return (values > threshold).astype(np.uint8), note


def _void_marked(values: np.ndarray) -> bool:
    """Whether a 0/1/255 mask is 0/1 labels with a void of 255 (grey PASCAL VOC style) rather
    than a 0/255 mask with stray 1s: its 1s are at least as many as its 255s, or they form a
    region of their own (most touch another 1) that the void keeps apart from the 0s (as the
    boundary band around a small person does), and are not a speck inside a 0/255 person."""
    grid = values.reshape(values.shape[:2])
    ones, voids = int((grid == 1).sum()), int((grid == 255).sum())
    if ones >= voids:
        return True
    if ones < 0.1 * voids:
        return False

    def touching(label):
        padded = np.pad(grid == label, 1)
        near = padded[:-2, 1:-1] | padded[2:, 1:-1] | padded[1:-1, :-2] | padded[1:-1, 2:]
        return int((near & (grid == 1)).sum())

    return touching(0) < 0.1 * ones and touching(1) >= 0.5 * ones


def same_aspect(mask_hw: tuple[int, int], photo_hw: tuple[int, int]) -> bool:
    """True when MASK_HW is PHOTO_HW scaled, allowing one pixel of rounding."""
    (h, w), (big_h, big_w) = mask_hw, photo_hw
    return abs(w - big_w * h / big_h) <= 1 or abs(h - big_h * w / big_w) <= 1


def fit_mask(mask: np.ndarray, photo: Photo) -> tuple[np.ndarray, str | None]:
    """MASK sized to PHOTO: rescaled (nearest) at the same aspect ratio, else `BadFile`.

    A mask that matches the photo's stored pixels rather than its EXIF-rotated
    view (only detectable when the rotation swaps width and height) is rotated
    with the photo. Same-shape masks are taken to follow the displayed view.
    """
    return fit_to_size(mask, (photo.height, photo.width), photo.orientation)


def fit_to_size(mask: np.ndarray, size: tuple[int, int],
                orientation: int = 1) -> tuple[np.ndarray, str | None]:
    """MASK at SIZE (height, width) of a photo with this EXIF orientation, as `fit_mask`."""
    height, width = int(size[0]), int(size[1])
    note = None
    if not same_aspect(mask.shape, (height, width)):
        if orientation in _TRANSPOSING and same_aspect(mask.shape, (width, height)):
            mask = np.ascontiguousarray(photo_pixels.orient(mask, orientation))
            note = f"mask follows the unrotated photo; EXIF orientation {orientation} applied to it"
        else:
            raise BadFile(
                f"mask is {mask.shape[1]}x{mask.shape[0]} but the photo is "
                f"{width}x{height}: different aspect ratio"
            )
    if mask.shape != (height, width):
        resized = f"mask {mask.shape[1]}x{mask.shape[0]} resized to {width}x{height}"
        note = f"{note}; {resized}" if note else resized
        # NEAREST_EXACT samples at pixel centres; plain NEAREST takes each block's top-left pixel,
        # which moves the mask up to half a (target) pixel down and right of its photo.
        mask = cv2.resize(mask, (width, height), interpolation=cv2.INTER_NEAREST_EXACT)
    return mask, note
