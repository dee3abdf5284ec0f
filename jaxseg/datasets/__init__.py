"""Person-segmentation datasets as TFDS builders (array_record) with random-access reading.

Each example: `image` uint8 HxWx3 RGB at original size, `mask` uint8 HxWx1
(0 background, 1 person), `id` and `source` strings. Manual data: the folder
named by `$JAXSEG_MANUAL_DIR` holds `portraits/` and `ccp/` laid out like the
public archives; without it the archives are downloaded. Prepared data goes to
`data_dir` (default `$TFDS_DATA_DIR`, else ~/tensorflow_datasets), with a
`build_report.json` listing every skipped, excluded or converted file.
"""
import collections.abc
import contextlib
import operator
import os
import pathlib

import numpy as np
import tensorflow_datasets as tfds

from jaxseg.datasets.base import REPORT_FILE, BadDataError
from jaxseg.datasets.ccp_person import CcpPerson
from jaxseg.datasets.person_folder import PersonFolder, config_for
from jaxseg.datasets.portrait_segmentation import PortraitSegmentation
from jaxseg.mixture import DATASETS
from jaxseg.workdir import exclusive_lock, is_storage_url

__all__ = ["DATASETS", "MANUAL_SUBDIRS", "REPORT_FILE", "BadDataError", "Source", "build_report", "builder",
           "data_source", "prepare", "split_sizes"]

_BUILDERS = {"portrait_segmentation": PortraitSegmentation, "ccp_person": CcpPerson, "person_folder": PersonFolder}
# Subfolder of $JAXSEG_MANUAL_DIR holding each downloadable dataset.
MANUAL_SUBDIRS = {"portrait_segmentation": "portraits", "ccp_person": "ccp"}


def builder(name: str, *, data_dir: str | None = None, folder: str | None = None,
            on_bad: str = "skip") -> tfds.core.DatasetBuilder:
    """Builder for NAME (folder required for person_folder), not yet prepared.

    FOLDER is ignored by the other datasets, so that one training mixture can
    pass the same arguments to each of its datasets.
    """
    if name not in _BUILDERS:
        raise ValueError(f"unknown dataset {name!r}; choose from {DATASETS}")
    # No shell expands --data_dir=~/d or --config.data.data_dir=~/d: TFDS downloaded into ~/d
    # but built into ./~/d, and the build report's path read as the home folder's.
    data_dir = os.path.expanduser(data_dir) if data_dir else data_dir
    config = None
    if name == "person_folder":
        if not folder:
            raise ValueError("person_folder needs folder=: a folder with images/ and masks/")
        config = config_for(folder)
    return _BUILDERS[name](data_dir=data_dir, config=config, on_bad=on_bad)


def prepare(name: str, *, data_dir: str | None = None, folder: str | None = None, on_bad: str = "skip",
            manual_dir: str | None = None) -> tfds.core.DatasetBuilder:
    """Prepare once (cached), with manual dir = manual_dir or $JAXSEG_MANUAL_DIR/<subfolder>; returns the builder.

    A manual_dir that holds the dataset's subfolder (portraits/, ccp/) rather than its layout is
    read as $JAXSEG_MANUAL_DIR is: the folder of both datasets.
    """
    ds_builder = builder(name, data_dir=data_dir, folder=folder, on_bad=on_bad)
    if not ds_builder.data_path.exists():
        with _one_build_at_a_time(ds_builder.data_path):
            # Made again once the lock is held: a builder made before another process finished
            # the data would skip the build without reading what it built.
            ds_builder = builder(name, data_dir=data_dir, folder=folder, on_bad=on_bad)
            _download_and_prepare(ds_builder, name, manual_dir)
    else:
        _download_and_prepare(ds_builder, name, manual_dir)
    return ds_builder


@contextlib.contextmanager
def _one_build_at_a_time(data_path):
    """Holds an exclusive lock beside a dataset's folder while it is built: two processes building
    one dataset into one data dir at once collide (the second's final rename fails), as a sweep's
    parallel trials or two commands started together on a fresh machine do. The second waits,
    then finds the data built. Storage URLs (gs://...) are not locked."""
    if is_storage_url(data_path):
        yield
        return
    folder = pathlib.Path(data_path)
    folder.parent.mkdir(parents=True, exist_ok=True)
    with exclusive_lock(folder.parent / f".{folder.name}.build.lock", wait=True,
                        unguarded="two processes building it at once may collide"):
        yield


def _download_and_prepare(ds_builder, name: str, manual_dir: str | None) -> None:
    """Builds NAME unless it is built, from manual_dir or $JAXSEG_MANUAL_DIR/<subfolder>."""
    if manual_dir is None and os.environ.get("JAXSEG_MANUAL_DIR") and name in MANUAL_SUBDIRS:
        manual_dir = pathlib.Path(os.environ["JAXSEG_MANUAL_DIR"]) / MANUAL_SUBDIRS[name]
    elif manual_dir is not None and name in MANUAL_SUBDIRS:
        shared = pathlib.Path(manual_dir) / MANUAL_SUBDIRS[name]
        if not ds_builder.find_layout(pathlib.Path(manual_dir)) and shared.is_dir():
            manual_dir = shared  # else both datasets of one --manual_dir were downloaded
    ds_builder.download_and_prepare(download_config=tfds.download.DownloadConfig(manual_dir=manual_dir))


class Source(collections.abc.Sequence):
    """Random access to one prepared split, in a fixed order.

    `src[i]` -> dict(image=uint8 HxWx3, mask=uint8 HxWx1 of 0/1, id=str, source=str).
    Reads array_record through `as_data_source` (files stay open; decoding is
    NumPy/OpenCV, no TensorFlow).
    """

    def __init__(self, ds_builder: tfds.core.DatasetBuilder, split: str):
        self.name = ds_builder.name
        self.split = split
        # One line for what array_record would only meet with a traceback ("Paths sequence can
        # not be of 0 length"): a slice that rounds to nothing, as train[80%:] of 2 photos does.
        try:
            size = ds_builder.info.splits[split].num_examples
        # An unknown split, a slice past the split's end; NotImplementedError: a slice of 'all'.
        except (ValueError, NotImplementedError) as e:
            raise BadDataError(self.name, [], f"split {split!r}: {e}") from None
        if not size:
            raise BadDataError(self.name, [], f"split {split!r} holds no examples (the splits "
                               f"hold {ds_builder.split_sizes()}): take a larger slice")
        self._records = ds_builder.as_data_source(split=split)

    def __len__(self) -> int:
        return len(self._records)

    def __getitem__(self, index: int) -> dict[str, np.ndarray | str]:
        i = operator.index(index)
        i += len(self) if i < 0 else 0
        if not 0 <= i < len(self):
            raise IndexError(f"index {index} out of range for {len(self)} examples")
        example = self._records[i]
        return dict(image=example["image"], mask=example["mask"],
                    id=example["id"].decode(), source=example["source"].decode())

    def __repr__(self) -> str:
        return f"Source({self.name!r}, split={self.split!r}, {len(self)} examples)"


def data_source(name: str, split: str, *, data_dir: str | None = None, folder: str | None = None,
                on_bad: str = "skip") -> Source:
    """Random-access source over a prepared split (prepared first if needed); fixed order."""
    return Source(prepare(name, data_dir=data_dir, folder=folder, on_bad=on_bad), split)


def split_sizes(name: str, *, data_dir: str | None = None, folder: str | None = None) -> dict[str, int]:
    """Number of examples per split (prepares the data first if needed)."""
    return prepare(name, data_dir=data_dir, folder=folder).split_sizes()


def build_report(name: str, *, data_dir: str | None = None, folder: str | None = None) -> dict:
    """The build report (skipped/excluded files with reasons, warnings, counts) stored with the data."""
    return prepare(name, data_dir=data_dir, folder=folder).report()
