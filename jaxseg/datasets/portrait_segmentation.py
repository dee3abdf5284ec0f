"""`portrait_segmentation`: the Shen et al. 2016 portraits (AutoPortraitMatting archive)."""
import pathlib

import numpy as np

from jaxseg.datasets import base, image_io

PHOTOS = "data/images_data_crop"
MASKS = "data/images_mask"
LISTS = {"train": "data/trainlist.mat", "test": "data/testlist.mat"}
# Photos outside the official test list are divided by a stable hash of the id.
TRAIN_FRACTIONS = {"train": 0.9, "validation": 0.1}


def _ids(values: np.ndarray) -> set[str]:
    """The 5-digit ids of a list file's numbers (or digit strings); `BadFile` where it holds other
    values (a cell array, NaN: a traceback, or a line that named no file)."""
    try:
        numbers = values.astype(np.float64)
    except (ValueError, TypeError) as e:
        raise image_io.BadFile(f"holds values that are not ids (whole numbers): {e}") from None
    if not (np.isfinite(numbers) & (numbers >= 0) & (numbers == np.round(numbers))).all():
        raise image_io.BadFile("holds values that are not ids (whole numbers of 0 or more)")
    return {f"{int(i):05d}" for i in numbers.ravel()}


class PortraitSegmentation(base.PersonSegBuilder):
    """Flickr head-and-shoulder portraits with hand-made person masks (Shen et al. 2016).

    Splits: `test` is the authors' test list (testlist.mat); `train` and
    `validation` divide the authors' train list plus the photos in neither list,
    about 90/10 by a stable hash of the id. Masks whose photo is missing, photos
    without a mask, listed ids without a photo and empty masks are excluded and
    counted in the build report. Ids are the 5-digit file stems.
    """

    HOMEPAGE = "https://github.com/bio-punk/AutoPortraitMatting"
    URL = "https://github.com/bio-punk/AutoPortraitMatting/archive/refs/heads/master.zip"
    ARCHIVE_DIR = "AutoPortraitMatting-master"
    LAYOUT = (PHOTOS, MASKS, *LISTS.values())
    MANUAL_DOWNLOAD_INSTRUCTIONS = (
        "Unpack the AutoPortraitMatting archive (or a copy laid out like it, with data/images_data_crop, "
        "data/images_mask, data/trainlist.mat and data/testlist.mat) into the manual dir."
    )
    CITATION = """@article{shen2016portrait,
  title={Automatic Portrait Segmentation for Image Stylization},
  author={Shen, Xiaoyong and Hertzmann, Aaron and Jia, Jiaya and Paris, Sylvain
          and Price, Brian and Shechtman, Eli and Sachs, Ian},
  journal={Computer Graphics Forum},
  volume={35}, number={2}, pages={93--102}, year={2016}
}"""

    def _candidates(self, root: pathlib.Path, report: base.Report) -> list[base.Candidate]:
        photos = {p.stem: p for p in sorted((root / PHOTOS).glob("*.jpg"))}
        masks = {p.stem.removesuffix("_mask"): p for p in sorted((root / MASKS).glob("*_mask.mat"))}
        listed = {}
        for split, path in LISTS.items():
            try:
                listed[split] = _ids(image_io.read_mat(root / path, f"{split}list"))
            except image_io.BadFile as e:  # without the list no split can be built: say which
                raise image_io.BadFile(f"{root / path}: {e}") from e
        candidates = []
        for id_ in sorted(photos.keys() | masks.keys()):
            if id_ in photos and id_ in masks:
                split = "test" if id_ in listed["test"] else base.hash_split(id_, TRAIN_FRACTIONS)
                candidates.append(base.Candidate(id_, split, photos[id_], masks[id_]))
            elif id_ in masks:
                lists = [f"{split}list" for split, ids in listed.items() if id_ in ids]
                where = f" (id in {', '.join(lists)})" if lists else ""
                report.add("excluded", masks[id_], f"mask without photo{where}")
            else:
                report.add("excluded", photos[id_], "photo without mask")
        for split, ids in listed.items():
            for id_ in sorted(ids - photos.keys() - masks.keys()):
                report.add("excluded", root / PHOTOS / f"{id_}.jpg", f"in {split}list but no photo and no mask")
        unlisted = (photos.keys() & masks.keys()) - listed["train"] - listed["test"]
        report.counts.update(
            photos=len(photos),
            masks=len(masks),
            masks_without_photo=len(masks.keys() - photos.keys()),
            photos_without_mask=len(photos.keys() - masks.keys()),
            listed_without_photo={split: len(ids - photos.keys()) for split, ids in listed.items()},
            unlisted_photos=len(unlisted),
        )
        return candidates

    def _read_mask(self, path: pathlib.Path) -> tuple[np.ndarray, str | None]:
        return image_io.binarize(image_io.read_mat_mask(path, "mask"))
