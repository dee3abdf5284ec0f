"""`person_folder`: a user's own photos and person masks, paired by file name."""
import collections
import dataclasses
import hashlib
import os
import pathlib
import re
import unicodedata

import numpy as np
import tensorflow_datasets as tfds

from jaxseg import photo_pixels
from jaxseg.datasets import base, image_io

SPLITS = ("train", "validation", "test")
# A mask may repeat its photo's stem with one of these suffixes: a.jpg <- a_mask.png, or a
# jaxseg.predict cutout a_cutout.png.
MASK_SUFFIX = re.compile(r"[_-](mask|matte|label|seg|gt|cutout)$", re.IGNORECASE)


@dataclasses.dataclass
class PersonFolderConfig(tfds.core.BuilderConfig):
    """Config for one folder; its name fingerprints the folder (see `config_for`)."""

    folder: str = ""


# Folder names that look like a split but are not one of SPLITS: refused rather than ignored.
_SPLIT_LIKE = {"val": "validation", "valid": "validation", "dev": "validation", "eval": "validation",
               "training": "train", "testing": "test"}


def layout(folder: pathlib.Path) -> dict[str, pathlib.Path]:
    """Split name -> directory holding that split's images/ and masks/."""
    if not _is_utf8(str(folder.resolve())):  # TFDS stores the folder in its dataset info, as text
        raise ValueError(f"{folder}: the folder's path is not valid UTF-8 text; rename it")
    if folder.exists() and not folder.is_dir():
        raise ValueError(f"{folder}: a file, not a folder of images/ and masks/")
    misnamed = [f"{d.name}/ (name it {_SPLIT_LIKE.get(d.name.lower(), d.name.lower())}/)"
                for d in sorted(folder.iterdir()) if d.is_dir() and d.name not in SPLITS
                and (d.name.lower() in SPLITS or d.name.lower() in _SPLIT_LIKE)]
    if misnamed:
        raise ValueError(f"{folder}: split folders must be named {', '.join(SPLITS)}; found "
                         + ", ".join(misnamed))
    split_dirs = {name: folder / name for name in SPLITS if (folder / name).is_dir()}
    if split_dirs and (folder / "images").exists():
        raise ValueError(f"{folder}: has both images/ and split folders {sorted(split_dirs)}; use one layout")
    if not split_dirs and (folder / "images").is_dir():
        split_dirs = {"train": folder}
    if not split_dirs:
        raise ValueError(f"{folder}: expected images/ and masks/, or train/ validation/ test/ folders holding them")
    for directory in split_dirs.values():
        # Else the split was said to "hold no photos or masks", with them in plain sight.
        loose = [f.name for f in _entries(directory) if f.suffix.lower() in photo_pixels.IMAGE_SUFFIXES]
        if loose and not (directory / "images").is_dir():
            raise ValueError(f"{directory}: holds image files ({', '.join(loose[:3])}"
                             f"{', ...' if len(loose) > 3 else ''}) but no images/ folder; put the "
                             "photos in images/ and their masks in masks/ inside it")
        # Else each photo would be "image without mask", one line each, and the cause unsaid.
        if (directory / "images").is_dir() and not (directory / "masks").is_dir():
            others = sorted(f"{d.name}/" for d in _entries(directory) if d.is_dir() and d.name != "images")
            raise ValueError(f"{directory}: images/ without a masks/ folder beside it"
                             + (f" (found {', '.join(others)})" if others else "")
                             + "; put the masks in masks/")
    return split_dirs


def _entries(folder: pathlib.Path) -> list[pathlib.Path]:
    """FOLDER's entries that the build reads, sorted: none where it is not a folder, and no
    hidden ones (photo_pixels.is_hidden)."""
    if not folder.is_dir():
        return []
    return sorted(f for f in folder.iterdir()
                  if not photo_pixels.is_hidden(pathlib.PurePath(f.name)))


def config_for(folder: str | pathlib.Path) -> PersonFolderConfig:
    """Config whose name hashes FOLDER's resolved path and its files' names, sizes and mtimes.

    Two folders, or one folder after a change, so never share prepared data.
    """
    root = pathlib.Path(folder).expanduser().resolve()
    splits = layout(root)  # first: it refuses a path that is not text
    digest = hashlib.sha256(str(root).encode())
    for split, directory in sorted(splits.items()):
        for sub in ("images", "masks"):
            for f in _entries(directory / sub):
                # The linked file's size and time, so that editing a link's target is a change;
                # a dangling link (lstat) or a name in another encoding (raw bytes) is reported
                # by the build (pair_files) instead of stopping it here.
                try:
                    stat = f.stat()
                except OSError:
                    stat = f.lstat()
                digest.update(f"{split}/{sub}/".encode() + os.fsencode(f.name)
                              + f"\0{stat.st_size}\0{stat.st_mtime_ns}\n".encode())
    name = re.sub(r"[^\w.-]", "_", root.name or "root")
    return PersonFolderConfig(name=f"{name}-{digest.hexdigest()[:12]}", folder=str(root),
                              description=f"Photos and masks from {root}")


def _is_utf8(name: str) -> bool:
    """Whether a file name decoded from the file system is text (no undecodable bytes)."""
    try:
        name.encode("utf-8")
    except UnicodeEncodeError:
        return False
    return True


def named_as_cutout(path: pathlib.Path) -> bool:
    """Whether a mask file is named as jaxseg.predict names cutouts (`a_cutout.png`): its alpha is
    the person, even where it is all opaque."""
    match = MASK_SUFFIX.search(unicodedata.normalize("NFC", path.stem))
    return bool(match) and match.group(1).lower() == "cutout"


def pair_files(directory: pathlib.Path) -> tuple[list[tuple[str, pathlib.Path, pathlib.Path]],
                                                  list[tuple[pathlib.Path, str]]]:
    """Pair DIRECTORY/images/* with DIRECTORY/masks/* by stem: (stem, image, mask) list, bad (file, reason) list."""
    bad = []

    def listing(sub: str) -> dict[str, list[pathlib.Path]]:
        by_stem = collections.defaultdict(list)
        for f in _entries(directory / sub):
            if f.is_dir():
                bad.append((f, f"folder inside {sub}/ (not read)"))
            elif f.suffix.lower() not in photo_pixels.IMAGE_SUFFIXES:
                bad.append((f, f"not an image file (extension {f.suffix or 'none'!r})"))
            elif not _is_utf8(f.name):  # its id could not be stored
                bad.append((f, "file name is not valid UTF-8 (rename it)"))
            else:
                # One spelling per name: macOS writes é decomposed, most tools composed.
                by_stem[unicodedata.normalize("NFC", f.stem)].append(f)
        return by_stem

    images = listing("images")
    masks = collections.defaultdict(list)
    for stem, files in listing("masks").items():
        masks[stem if stem in images else MASK_SUFFIX.sub("", stem)].extend(files)
    pairs = []
    for stem in sorted(images.keys() | masks.keys()):
        found = images.get(stem, []) + masks.get(stem, [])
        if len(images.get(stem, [])) == len(masks.get(stem, [])) == 1:
            pairs.append((stem, *found))
            continue
        if stem not in images:
            reason = "mask without image"
        elif stem not in masks:
            reason = "image without mask"
        else:
            reason = "ambiguous pairing between " + ", ".join(f"{f.parent.name}/{f.name}" for f in found)
        bad += [(f, reason) for f in found]
    return pairs, bad


class PersonFolder(base.PersonSegBuilder):
    """A user's folder of photos (images/) and person masks (masks/), paired by file stem.

    Layout: FOLDER/images/ and FOLDER/masks/, which become the single split
    `train` (so training code needs no special case); or FOLDER/train/,
    FOLDER/validation/, FOLDER/test/ (any of them), each holding images/ and
    masks/, which become those splits. A mask pairs with the photo of the same
    stem, optionally with a suffix such as `_mask` (`a.jpg` <- `a_mask.png`);
    jpg (jpeg, jfif, jpe), png, bmp, webp and tif(f) are read. Ids are the photo stems.

    Masks may be 0/1, 0/255, 16-bit, 1-bit, colour or palette images (any
    bright channel of the colour, palettes by their colours, VOC's void of 255
    as background), or cutouts whose alpha carries the person over a uniform
    colour or the photo's own (RGBA/LA); other values are thresholded with a
    warning (image_io.read_mask_image, binarize). A mask at the photo's aspect
    ratio but another size is resized (nearest pixel centres). Bad files (unreadable,
    truncated, empty, not images, unpaired, different aspect ratio) are skipped
    and listed in the build report, or stop the build with on_bad='error'.
    Empty masks are kept (photos without people) with a warning.
    """

    EXCLUDE_EMPTY = False

    def _locate(self, dl_manager) -> pathlib.Path:
        if not self.builder_config:
            raise ValueError("person_folder needs a folder: use jaxseg.datasets.builder('person_folder', folder=...)")
        return pathlib.Path(self.builder_config.folder)

    def _candidates(self, root: pathlib.Path, report: base.Report) -> list[base.Candidate]:
        candidates = []
        for split, directory in layout(root).items():
            pairs, bad = pair_files(directory)
            for path, reason in bad:
                report.add("skipped", path, reason)
            candidates += [base.Candidate(stem, split, image, mask) for stem, image, mask in pairs]
        report.counts.update(pairs=len(candidates))
        return candidates

    def _intended_splits(self, root: pathlib.Path, candidates: list[base.Candidate]) -> set[str]:
        return set(layout(root))  # a split folder of unpaired files too

    def _read_mask(self, path: pathlib.Path) -> tuple[np.ndarray, str | None]:
        return image_io.binarize(image_io.read_mask_image(path, cutout=named_as_cutout(path)))
