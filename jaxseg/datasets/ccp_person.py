"""`ccp_person`: Clothing Co-Parsing street-fashion photos as person masks."""
import pathlib

import numpy as np

from jaxseg.datasets import base, image_io

PHOTOS = "photos"
ANNOTATIONS = "annotations/pixel-level"
# No official split: a stable hash of the id decides.
FRACTIONS = {"train": 0.8, "validation": 0.1, "test": 0.1}


class CcpPerson(base.PersonSegBuilder):
    """Full-body street-fashion photos of Clothing Co-Parsing (Yang et al. 2014); person = label != 0.

    Only the photos with a pixel-level annotation are used (the others carry
    image-level tags only); only the main subject is labelled. Splits
    train/validation/test are 80/10/10 by a stable hash of the id (the 4-digit
    file stem). The empty annotation 0536 and any other all-background
    annotation are excluded and listed in the build report.
    """

    HOMEPAGE = "https://github.com/bearpaw/clothing-co-parsing"
    URL = "https://github.com/bearpaw/clothing-co-parsing/archive/refs/heads/master.zip"
    ARCHIVE_DIR = "clothing-co-parsing-master"
    LAYOUT = (PHOTOS, ANNOTATIONS)
    MANUAL_DOWNLOAD_INSTRUCTIONS = (
        "Unpack the clothing-co-parsing archive (or a copy laid out like it, with photos/ and "
        "annotations/pixel-level/) into the manual dir."
    )
    CITATION = """@inproceedings{yang2014clothing,
  title={Clothing Co-Parsing by Joint Image Segmentation and Labeling},
  author={Yang, Wei and Luo, Ping and Lin, Liang},
  booktitle={CVPR}, year={2014}
}"""

    def _candidates(self, root: pathlib.Path, report: base.Report) -> list[base.Candidate]:
        photos = {p.stem: p for p in sorted((root / PHOTOS).glob("*.jpg"))}
        annotations = {p.stem: p for p in sorted((root / ANNOTATIONS).glob("*.mat"))}
        candidates = []
        for id_ in sorted(photos.keys() | annotations.keys()):
            if id_ in photos and id_ in annotations:
                split = base.hash_split(id_, FRACTIONS)
                candidates.append(base.Candidate(id_, split, photos[id_], annotations[id_]))
            elif id_ in annotations:
                report.add("excluded", annotations[id_], "annotation without photo")
            else:
                report.add("excluded", photos[id_], "photo without pixel-level annotation")
        report.counts.update(
            photos=len(photos),
            annotations=len(annotations),
            photos_without_annotation=len(photos.keys() - annotations.keys()),
            annotations_without_photo=len(annotations.keys() - photos.keys()),
        )
        return candidates

    def _read_mask(self, path: pathlib.Path) -> tuple[np.ndarray, str | None]:
        return (image_io.read_mat_mask(path, "groundtruth") != 0).astype(np.uint8), None
