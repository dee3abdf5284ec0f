"""Shared machinery of the person-segmentation builders: splits, build report, checks.

A build runs in two passes. `_split_generators` lists the photo/mask pairs,
validates every pair (in threads: decoding releases the GIL) and records each
skipped, excluded or converted file in a `Report`; only then are the splits
known to be non-empty (TFDS cannot write an empty split). `_generate_examples`
then writes the validated pairs, reading each photo file once more.
"""
import collections
import concurrent.futures
import dataclasses
import hashlib
import inspect
import json
import logging
import os
import pathlib
import shutil
import socket
import urllib.parse
import urllib.request
from collections.abc import Iterator, Mapping

import numpy as np
import tensorflow_datasets as tfds
from etils import epath

from jaxseg import photo_pixels
from jaxseg.workdir import write_text_whole
from jaxseg.datasets import image_io

ON_BAD = ("skip", "error")
REPORT_FILE = "build_report.json"


def hash_split(key: str, fractions: Mapping[str, float]) -> str:
    """Split for KEY from a stable hash: same answer on every run, whatever other keys exist.

    FRACTIONS maps split names to their share, in order; the last takes the rest.
    """
    u = int.from_bytes(hashlib.sha256(key.encode()).digest()[:8], "big") / 2**64
    upper = 0.0
    for name, share in fractions.items():
        upper += share
        if u < upper:
            return name
    return name


# Files a BadDataError's message names; `files` holds them all. An empty photo folder dropped
# every one of 1887 portrait masks, and the message's 1888 lines scrolled its headline away.
MAX_NAMED = 20


class BadDataError(ValueError):
    """Bad files met with on_bad='error' (or nothing usable left, or a split or slice of none);
    the message names them (the first MAX_NAMED)."""

    def __init__(self, dataset: str, entries: list[dict], headline: str = "bad file(s) with on_bad='error'"):
        self.files = [e["file"] for e in entries]
        lines = "".join(f"\n  {e['file']}: {e['reason']}" for e in entries[:MAX_NAMED])
        if len(entries) > MAX_NAMED:
            lines += f"\n  ... and {len(entries) - MAX_NAMED} more"
        super().__init__(f"{dataset}: {len(entries)} {headline}:{lines}" if entries
                         else f"{dataset}: {headline}")


@dataclasses.dataclass
class Report:
    """What a build kept and dropped, with file names relative to the source folder.

    `skipped`: bad files (unreadable, mismatched, unpaired in a user folder):
    these are what `on_bad` governs. `excluded`: files that the dataset's own
    definition leaves out (e.g. masks whose photo the authors lost). `warnings`:
    examples that were kept after a conversion or fix.
    """

    dataset: str
    root: pathlib.Path
    on_bad: str
    counts: dict = dataclasses.field(default_factory=dict)
    skipped: list = dataclasses.field(default_factory=list)
    excluded: list = dataclasses.field(default_factory=list)
    warnings: list = dataclasses.field(default_factory=list)
    fingerprint: str = ""  # of the source folder's files (source_fingerprint); "" when not taken

    def add(self, kind: str, path: pathlib.Path, text: str) -> None:
        """Record PATH under KIND ('skipped', 'excluded' or 'warnings')."""
        file = pathlib.Path(path).relative_to(self.root).as_posix()
        key = "note" if kind == "warnings" else "reason"
        getattr(self, kind).append({"file": file, key: text})

    def write(self, path: pathlib.Path, split_sizes: dict[str, int]) -> None:
        """Store the report as JSON at PATH."""
        counts = dict(self.counts, examples=split_sizes, skipped=len(self.skipped),
                      excluded=len(self.excluded), warnings=len(self.warnings))
        report = dict(dataset=self.dataset, source_dir=str(self.root), on_bad=self.on_bad, counts=counts,
                      skipped=self.skipped, excluded=self.excluded, warnings=self.warnings)
        if self.fingerprint:
            report["source_fingerprint"] = self.fingerprint
        write_text_whole(pathlib.Path(path), json.dumps(report, indent=1))


def source_fingerprint(root: pathlib.Path, paths: tuple[str, ...]) -> str:
    """Hash of the names and sizes of the files at ROOT's PATHS (folders walked): files added,
    removed or replaced (a fixed photo, an empty file filled) change it. Not their times, which
    a copy of the same files (unzip, cp -r) changes."""
    digest = hashlib.sha256()
    for top in paths:
        folder = root / top
        for f in sorted(folder.rglob("*")) if folder.is_dir() else [folder]:
            try:
                size = f.stat().st_size
            except OSError:  # a dangling link: the build reports it
                size = -1
            digest.update(os.fsencode(f.relative_to(root).as_posix()) + f"\0{size}\n".encode())
    return digest.hexdigest()[:16]


def _unreachable(url: str) -> str | None:
    """Why URL's host cannot be reached, or None. Offline, TFDS's downloader tries ten times
    with growing waits, about 3.5 minutes, before it fails; this asks once. Not asked where a
    proxy is set: the download goes through it, not to the host."""
    parts = urllib.parse.urlsplit(url)
    if parts.scheme not in ("http", "https"):
        return None
    # A no_proxy list alone (getproxies' "no" entry) sends the download straight to the host.
    proxies = urllib.request.getproxies()
    if ((proxies.get(parts.scheme) or proxies.get("all"))
            and not urllib.request.proxy_bypass(parts.hostname)):
        return None
    port = parts.port or (443 if parts.scheme == "https" else 80)
    try:
        socket.create_connection((parts.hostname, port), timeout=15).close()
    except OSError as e:
        return f"{parts.hostname} cannot be reached: {e.strerror or e}"
    return None


def _downloads(download_dir, url: str) -> list[epath.Path]:
    """The archives of URL that TFDS holds in DOWNLOAD_DIR (files beside an .INFO naming the URL,
    in the folder itself or a dataset's subfolder): it builds from them offline, and reuses them
    on every later build."""
    root = epath.Path(download_dir)
    found = []
    for info in (*root.glob("*.INFO"), *root.glob("*/*.INFO")):
        try:
            urls = json.loads(info.read_text()).get("urls", ())
        except (OSError, ValueError, AttributeError):
            continue
        if url in urls and info.with_suffix("").exists():
            found.append(info.with_suffix(""))
    return found


@dataclasses.dataclass(frozen=True)
class Candidate:
    """A photo/mask pair found in the source folder, not yet validated."""

    id: str
    split: str
    photo: pathlib.Path
    mask: pathlib.Path


@dataclasses.dataclass(frozen=True)
class _Example:
    id: str
    split: str
    photo: image_io.Photo
    mask_png: bytes  # masks are small once PNG-compressed, so they stay in memory


# Where the same photo lies in several splits, the most held-out one keeps it.
_HELD_OUT_RANK = {"test": 0, "validation": 1}


def _without_repeats_of_held_out(examples: list[_Example], report: Report) -> list[_Example]:
    """EXAMPLES less those whose photo file is byte-identical to one in a more held-out split
    (test, then validation), each recorded as excluded: a test photo seen in training would
    inflate the test score."""
    by_content = collections.defaultdict(list)
    for example in examples:
        by_content[example.photo.digest].append(example)
    dropped = set()
    for group in by_content.values():
        keeper = min(group, key=lambda e: _HELD_OUT_RANK.get(e.split, len(_HELD_OUT_RANK)))
        for example in group:
            if example.split != keeper.split:
                dropped.add(id(example))
                report.add("excluded", example.photo.path,
                           f"the same photo as {keeper.split} id {keeper.id}")
    return [example for example in examples if id(example) not in dropped]


class PersonSegBuilder(tfds.core.GeneratorBasedBuilder, skip_registration=True):
    """Base of the builders: image, mask, id and source per example, stored as array_record."""

    VERSION = tfds.core.Version("1.2.5")
    RELEASE_NOTES = {"1.0.0": "Initial release.",
                     "1.1.0": "A photo byte-identical to one of a more held-out split is excluded "
                              "(3 portraits of the train list repeat test photos); photos with "
                              "a colour profile are stored in sRGB; masks get their own EXIF "
                              "orientation.",
                     "1.2.0": "A photo whose colour profile cannot be used is stored as sRGB "
                              "instead of skipped.",
                     "1.2.1": "A grey 0/1 mask with a (smaller) void of 255 pixels reads the "
                              "void as background (it read 255 as the person and 1 as "
                              "background).",
                     "1.2.2": "A mask at another size than its photo is resized at pixel "
                              "centres (it moved up to half a pixel down and right); a small "
                              "person inside a wider void band of 255 stays the person; a "
                              "palette mask's index 255 beside other labels (VOC void) is "
                              "background; a cutout over the photo's own colours is read by "
                              "its alpha (it was read by its brightness).",
                     "1.2.3": "A two-level 16-bit mask of 0 and another top value (0/1000, "
                              "12-bit 0/4095) marks the person (it read as empty); a cutout "
                              "of a photo without a person (all-zero alpha) reads as empty; "
                              "masks named like jaxseg.predict cutouts (x_cutout.png) pair "
                              "with their photos.",
                     "1.2.4": "A soft 16-bit mask is cut at half its own depth (a 12-bit matte "
                              "at 2047; it was cut at 32767 and read as empty); a PNG's EXIF "
                              "orientation placed after its pixels is ignored, as prediction "
                              "ignores it (it turned the stored photo and mask); the build "
                              "report's warnings leave out photos excluded as repeats; a mask "
                              "named as a cutout (a_cutout.png) that is all opaque marks the "
                              "whole photo (it was read by the photo's brightness).",
                     "1.2.5": "A floating-point mask of 0-1 (a 32-bit TIFF matte) is cut at "
                              "0.5 (it was cut at 0, so a faint halo was person); one holding "
                              "NaN or infinite values is skipped as a bad file (it stopped the "
                              "build)."}
    HOMEPAGE = ""
    CITATION = ""
    URL = ""  # public archive of the dataset
    ARCHIVE_DIR = ""  # top folder inside the archive
    LAYOUT: tuple[str, ...] = ()  # paths a source folder must contain
    # In the curated datasets an empty annotation is a labelling error, not a
    # photo without people.
    EXCLUDE_EMPTY = True

    def __init__(self, *, on_bad: str = "skip", **kwargs):
        """ON_BAD: 'skip' bad files and list them in the report, or 'error' out naming them."""
        if on_bad not in ON_BAD:
            raise ValueError(f"on_bad must be one of {ON_BAD}, not {on_bad!r}")
        self.on_bad = on_bad
        self._manual_dir_asked = None  # the build's, named where TFDS gives _locate none (missing)
        kwargs.setdefault("file_format", "array_record")
        super().__init__(**kwargs)

    @tfds.core.utils.classproperty
    @classmethod
    def code_path(cls) -> epath.Path:
        """The builder's source file, as TFDS's own fallback computes it.

        TFDS locates it (to look for a checksums file) via `importlib_resources`, which
        tensorflow-datasets 4.9.10 only declares for Python < 3.9: on 3.12 preparing would fail
        with ModuleNotFoundError."""
        return epath.Path(inspect.getfile(cls))

    def _info(self) -> tfds.core.DatasetInfo:
        return tfds.core.DatasetInfo(
            builder=self,
            description=self.__doc__,
            features=tfds.features.FeaturesDict({
                "image": tfds.features.Image(shape=(None, None, 3)),
                "mask": tfds.features.Image(shape=(None, None, 1), encoding_format="png"),
                "id": tfds.features.Text(),
                "source": tfds.features.Text(),
            }),
            supervised_keys=("image", "mask"),
            homepage=self.HOMEPAGE,
            citation=self.CITATION,
        )

    def _candidates(self, root: pathlib.Path, report: Report) -> list[Candidate]:
        """Pairs to validate; records the dataset-level counts and exclusions in REPORT."""
        raise NotImplementedError

    def _intended_splits(self, root: pathlib.Path, candidates: list[Candidate]) -> set[str]:
        """The splits the source means to have: each must keep a usable example."""
        return {c.split for c in candidates}

    def _read_mask(self, path: pathlib.Path) -> tuple[np.ndarray, str | None]:
        """The 0/1 person mask stored at PATH, and a note when its values needed fixing."""
        raise NotImplementedError

    def find_layout(self, folder: pathlib.Path) -> pathlib.Path | None:
        """FOLDER, or the archive's top folder inside it, where it holds the dataset's layout."""
        for root in (folder, folder / self.ARCHIVE_DIR):
            if all((root / p).exists() for p in self.LAYOUT):
                return root
        return None

    def lacking(self, *folders: pathlib.Path) -> str:
        """What the first of FOLDERS (or the archive's top folder inside one) nearest to holding
        the layout lacks of it: 'F lacks data/testlist.mat'. Listing the whole layout left the
        user to find the one file missing from a folder that held the rest."""
        missing = {root: [p for p in self.LAYOUT if not (root / p).exists()]
                   for folder in folders for root in (folder, folder / self.ARCHIVE_DIR)}
        root = min(missing, key=lambda r: len(missing[r]))
        return f"{root} lacks {', '.join(missing[root])}"

    def _locate(self, dl_manager: tfds.download.DownloadManager) -> pathlib.Path:
        """Source folder: the manual dir when it holds the dataset, else the downloaded archive."""
        try:
            manual = pathlib.Path(dl_manager.manual_dir)
        except AssertionError:  # TFDS's way of saying: no manual dir, or an empty one
            manual = None
        if manual:
            if root := self.find_layout(manual):
                return root
            reason = self.lacking(manual)
        elif self._manual_dir_asked:
            # A mistyped $JAXSEG_MANUAL_DIR was met with "no manual dir", as if it were unset.
            reason = f"the manual dir {self._manual_dir_asked} does not exist or is empty"
        else:
            reason = None
        logging.warning("%s: %s; downloading %s", self.name, reason or "no manual dir", self.URL)
        offline = (f"to build offline, point the manual dir at a folder holding {', '.join(self.LAYOUT)} "
                   "($JAXSEG_MANUAL_DIR/<portraits|ccp> or --manual_dir; see README)")
        if reason:
            offline = f"{reason}; {offline}"
        try:
            # Not where TFDS has it from an earlier download: it builds from that offline.
            if not _downloads(dl_manager.download_dir, self.URL) and (why := _unreachable(self.URL)):
                raise ConnectionError(why)
            extracted = pathlib.Path(os.fspath(dl_manager.download_and_extract(self.URL)))
        except Exception as e:  # network errors come in many types
            # An archive that is no zip (a full disk is not its fault): TFDS would reuse it on every build.
            if (isinstance(e, tfds.core.download.extractor.ExtractError)
                    and not isinstance(e.__cause__, OSError)):
                self._forget_download(dl_manager)
                raise FileNotFoundError(
                    f"{self.name}: the archive downloaded from {self.URL} cannot be unpacked ({e}); "
                    f"it was deleted, so that the next build downloads it again; {offline}") from e
            raise FileNotFoundError(
                f"{self.name}: could not download {self.URL} ({type(e).__name__}: {e}); {offline}") from e
        if root := self.find_layout(extracted):
            return root
        self._forget_download(dl_manager, extracted)
        raise FileNotFoundError(f"{self.name}: {self.URL} did not unpack to the expected layout "
                                f"{self.LAYOUT}; the archive was deleted, so that the next build "
                                f"downloads it again; {offline}")

    def _forget_download(self, dl_manager: tfds.download.DownloadManager,
                         extracted: pathlib.Path | None = None) -> None:
        """Deletes the archive of self.URL that TFDS downloaded (and EXTRACTED, its unpacked copy):
        TFDS reuses both on every later build, so one that is not the dataset (a proxy's error page
        saved as the zip, a truncated file) failed every build alike until found and deleted by hand."""
        for archive in _downloads(dl_manager.download_dir, self.URL):
            archive.unlink(missing_ok=True)
            archive.with_name(archive.name + ".INFO").unlink(missing_ok=True)
        if extracted is not None:
            shutil.rmtree(extracted, ignore_errors=True)

    def _check(self, candidate: Candidate) -> tuple[_Example | None, list[tuple[str, pathlib.Path, str]]]:
        """Validate one pair: the example to write (or None) and report events."""
        try:
            photo = image_io.probe_photo(candidate.photo)
        except image_io.BadFile as e:
            return None, [("skipped", candidate.photo, str(e))]
        try:
            mask, value_note = self._read_mask(candidate.mask)
            mask, size_note = image_io.fit_mask(mask, photo)
        except image_io.BadFile as e:
            return None, [("skipped", candidate.mask, str(e))]
        events = [("warnings", candidate.photo, note) for note in photo.notes]
        events += [("warnings", candidate.mask, note) for note in (value_note, size_note) if note]
        if not mask.any():
            if self.EXCLUDE_EMPTY:
                return None, [("excluded", candidate.mask, "empty annotation (no person pixels)")]
            events.append(("warnings", candidate.mask, "empty mask (no person pixels)"))
        return _Example(candidate.id, candidate.split, photo, photo_pixels.encode_png(mask)), events

    def _split_generators(self, dl_manager: tfds.download.DownloadManager):
        root = self._locate(dl_manager)
        self._report = Report(self.name, root, self.on_bad)
        if self.LAYOUT:  # a person_folder's files are in its config's name (config_for)
            self._report.fingerprint = source_fingerprint(root, self.LAYOUT)
        candidates = self._candidates(root, self._report)
        with concurrent.futures.ThreadPoolExecutor(os.cpu_count()) as pool:
            checked = list(pool.map(self._check, candidates))
        kept = _without_repeats_of_held_out([example for example, _ in checked if example],
                                            self._report)
        kept_ids = {id(example) for example in kept}
        for example, events in checked:
            for kind, path, text in events:
                # Notes are about stored examples: a repeat's are gone with it.
                if kind != "warnings" or id(example) in kept_ids:
                    self._report.add(kind, path, text)
        splits = collections.defaultdict(list)
        for example in kept:
            splits[example.split].append(example)
        if self.on_bad == "error" and self._report.skipped:
            raise BadDataError(self.name, self._report.skipped)
        dropped = self._report.skipped + self._report.excluded
        if not splits and not dropped:
            raise BadDataError(self.name, [], f"no photos or masks found in {root}")
        if not splits:
            raise BadDataError(self.name, dropped,
                               f"file(s) dropped and no usable example left in {root}")
        # A split whose every file was dropped would vanish, and training on it fail later
        # with TFDS's "Unknown split" and no word of why.
        if emptied := sorted(self._intended_splits(root, candidates) - splits.keys()):
            names = ", ".join(emptied)
            raise BadDataError(self.name, dropped, (
                f"file(s) dropped, leaving split(s) {names} without any usable example in {root}"
                if dropped else f"split(s) {names} hold no photos or masks in {root}"))
        return {name: self._generate_examples(examples) for name, examples in sorted(splits.items())}

    def _generate_examples(self, examples: list[_Example]) -> Iterator[tuple[str, dict]]:
        for example in examples:
            yield example.id, {
                "image": image_io.photo_bytes(example.photo),
                "mask": example.mask_png,
                "id": example.id,
                "source": self.name,
            }

    def split_sizes(self) -> dict[str, int]:
        """Number of examples per prepared split."""
        return {name: split.num_examples for name, split in self.info.splits.items()}

    def _download_and_prepare(self, dl_manager, download_config):
        self._manual_dir_asked = download_config.manual_dir
        super()._download_and_prepare(dl_manager, download_config)
        self._report.write(self.data_path / REPORT_FILE, self.split_sizes())

    def download_and_prepare(self, **kwargs):
        """Prepare once; with on_bad='error', data prepared earlier must have skipped nothing.

        Data prepared earlier from a manual dir whose files changed since (source_fingerprint)
        is used as it is, with a warning saying so."""
        prepared = self.data_path.exists()
        super().download_and_prepare(**kwargs)
        if prepared:
            self._warn_if_source_changed(kwargs.get("download_config"))
        if self.on_bad == "error" and (skipped := self.report()["skipped"]):
            raise BadDataError(self.name, skipped)

    def _warn_if_source_changed(self, download_config) -> None:
        """A warning where the manual dir's files differ from those the prepared data was built
        from: a photo fixed, added or removed after the build was not in the data, without a word."""
        manual = download_config and download_config.manual_dir
        root = self.find_layout(pathlib.Path(manual)) if manual and self.LAYOUT else None
        report = self.report()
        built_from = report.get("source_fingerprint")
        if root and built_from and built_from != source_fingerprint(root, self.LAYOUT):
            logging.warning("%s: the files of %s differ from those the data prepared in %s was "
                            "built from (%s): it is used as it was built; delete that folder to "
                            "rebuild from them", self.name, root, self.data_path, report["source_dir"])

    def report(self) -> dict:
        """The build report stored with the prepared data."""
        return json.loads((self.data_path / REPORT_FILE).read_text())
