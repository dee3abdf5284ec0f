"""Prediction on images, folders and videos: `python -m jaxseg.predict INPUT... --output DIR`.

Images are grouped by canvas bucket (their size rounded up to 64 pixels); the model runs at its
own size, compiled once per batch size, and the probability map comes back to each image's own
size, compiled once per bucket and batch size, by the shared resolution rule (jaxseg.resolution),
or along the photo's edges with --refine (jaxseg.refine), exactly as the evaluator scores it.
"""
from __future__ import annotations

import collections
import contextlib
import dataclasses
import functools
import io
import os
import pathlib
import struct
import sys
import zlib

import cv2
import jax
import jax.numpy as jnp
import numpy as np

from jaxseg import photo_pixels, refine, resolution
from jaxseg.inference import person_probabilities
from jaxseg.workdir import (complete_or_absent, escape_unencodable_stdout, local_folder_problem,
                            local_output_folder, remove_stale_partials)

VIDEO_SUFFIXES = {".mp4", ".avi", ".mov", ".mkv", ".webm", ".m4v", ".3gp", ".mpg", ".mpeg",
                  ".wmv", ".flv", ".mts", ".m2ts"}
MEDIA_SUFFIXES = photo_pixels.IMAGE_SUFFIXES | VIDEO_SUFFIXES
MODES = ("mask", "cutout", "overlay", "background")
BUCKET = 64
# Photos decoded and predicted at once end a chunk at this many pixels (a chunk holds about 7
# bytes per pixel: 450 MB here), however few they are: 32 photos of 12 megapixels held together
# peaked at 3.2 GB (1.2 GB with this bound).
CHUNK_PIXELS = 64_000_000


def _png_chunk(kind: bytes, data: bytes) -> bytes:
    return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))


# Every output carries a mark: a PNG text chunk right after the header chunk, or a trailing MPEG-4
# 'free' box (players skip it). A rerun replaces its own earlier outputs, and only those: a file
# named like an output that this tool did not write (img_mask.png as a ground-truth mask) stays.
OUTPUT_MARK = b"jaxseg.predict"
_PNG_HEADER_END = 33  # 8-byte signature + IHDR (length, type, 13 bytes, CRC)
_PNG_MARK = _png_chunk(b"tEXt", b"Software\0" + OUTPUT_MARK)
_MP4_MARK = struct.pack(">I", 8 + len(OUTPUT_MARK)) + b"free" + OUTPUT_MARK


def written_by_predict(path: pathlib.Path) -> bool:
    """Whether PATH is a file this tool wrote (it carries the output mark); only .png and .mp4
    files can be, and no other file is opened."""
    if path.suffix not in (".png", ".mp4"):
        return False
    try:
        with open(path, "rb") as f:
            if path.suffix == ".png":
                f.seek(_PNG_HEADER_END)
                return f.read(len(_PNG_MARK)) == _PNG_MARK
            f.seek(0, os.SEEK_END)
            f.seek(max(0, f.tell() - len(_MP4_MARK)))
            return f.read() == _MP4_MARK
    except OSError:  # a folder, or unreadable: not ours to replace
        return False


class Predictor:
    """Batched person probabilities at each input's own size: the model compiled once per batch
    rows (a power of two up to `batch_size`), the way back to the inputs' sizes once per canvas
    bucket and batch rows.

    `flip_tta` averages in the mirrored image; `refined` upsamples along each photo's own edges
    (jaxseg.refine) instead of plainly.
    """

    def __init__(self, model, image_size: int, *, batch_size: int = 8, flip_tta: bool = False,
                 refined: bool = False):
        from flax import nnx

        self.graphdef, self.state = nnx.split(model)
        self.image_size = image_size
        self.batch_size = batch_size
        self.flip_tta = flip_tta
        self.refined = refined

    def probabilities(self, images: list[np.ndarray]) -> list[np.ndarray]:
        """float32 (H, W) P(person) for each uint8 RGB image (all sizes mixed freely)."""
        out: list[np.ndarray | None] = [None] * len(images)
        buckets = collections.defaultdict(list)
        for i, image in enumerate(images):
            buckets[resolution.canvas_for([image.shape[:2]], BUCKET)].append(i)
        for canvas, members in buckets.items():
            for start in range(0, len(members), self.batch_size):
                chunk = members[start:start + self.batch_size]
                # Padded to a power of two rather than the full batch: a lone 12-megapixel
                # photo would otherwise carry seven blank ones through the full-size upsampling
                # (twice the time and memory), at one compilation per power instead of one.
                pad = min(self.batch_size, 1 << (len(chunk) - 1).bit_length()) - len(chunk)
                batch = np.stack([resolution.resize_image(images[i], self.image_size)
                                  for i in chunk] + [np.zeros((self.image_size,) * 2 + (3,), np.uint8)] * pad)
                sizes = np.array([images[i].shape[:2] for i in chunk] + [(1, 1)] * pad, np.int32)
                # The photos themselves go to the device only when refinement reads them.
                full = (np.stack([resolution.pad_to_canvas(images[i], canvas) for i in chunk]
                                 + [np.zeros((*canvas, 3), np.uint8)] * pad)
                        if self.refined else None)
                batch = jnp.asarray(batch)
                probs = _model_probabilities(self.graphdef, self.state, batch,
                                             flip_tta=self.flip_tta)
                probs = np.asarray(_at_sizes(batch, probs, jnp.asarray(sizes), full,
                                             refined=self.refined, canvas=canvas))
                for row, i in enumerate(chunk):
                    h, w = images[i].shape[:2]
                    out[i] = probs[row, :h, :w]
        return out


# Two jits for every Predictor, each keyed by what its computation depends on: predictors of one
# model share compilations, and none is kept alive by the cache (a static `self` was, state and
# all). The model's compiles once per batch rows, whatever the photos' sizes; only the way back to
# each canvas bucket compiles per bucket. With the model in that jit every bucket compiled it
# again: eight photos of eight buckets took 11.5 s with the pretrained ensemble on the 2-core CI
# machine (5.7 s at one size), 5.4 s now; 21.0 s with --flip_tta --refine, 13.3 s now.
@functools.partial(jax.jit, static_argnames=("graphdef", "flip_tta"))
def _model_probabilities(graphdef, state, images, *, flip_tta: bool):
    from flax import nnx

    return person_probabilities(nnx.merge(graphdef, state), images, flip_tta=flip_tta)


@functools.partial(jax.jit, static_argnames=("refined", "canvas"))
def _at_sizes(images, probs, sizes, full_images, *, refined: bool, canvas: tuple[int, int]):
    return refine.full_resolution(images, probs, full_images, sizes, canvas,
                                  (refine.RADIUS, refine.EPS) if refined else None)


def parse_colour(text: str) -> tuple[int, int, int]:
    """'#00ff00', '0,255,0' or a name (white, black, green, blue, red, gray) -> RGB."""
    names = {"white": (255, 255, 255), "black": (0, 0, 0), "green": (0, 255, 0),
             "blue": (0, 0, 255), "red": (255, 0, 0), "gray": (128, 128, 128)}
    if text.lower() in names:
        return names[text.lower()]
    if text.startswith("#") and len(text) == 7:
        try:
            return tuple(int(text[i:i + 2], 16) for i in (1, 3, 5))
        except ValueError:
            pass
    parts = text.split(",")
    if len(parts) == 3 and all(p.strip().isdigit() and int(p) <= 255 for p in parts):
        return tuple(int(p) for p in parts)
    raise ValueError(f"not a colour: {text!r} (use a name, #rrggbb or r,g,b from 0 to 255)")


def read_background(text: str, max_pixels: int) -> tuple[int, int, int] | np.ndarray:
    """--background: a colour (parse_colour), else an image file's RGB; ValueError says why not.

    A colour first: a folder or file named like one where the command runs (photos sorted into
    white/ and green/) must not take the place of the colour asked for, or of the default."""
    try:
        return parse_colour(text)
    except ValueError as e:
        not_a_colour = e
    path = pathlib.Path(text).expanduser()  # as --output, when not expanded by a shell
    try:
        is_dir = path.is_dir()
    except OSError as e:  # in a folder this user may not enter (another's home): not False
        raise ValueError(f"cannot reach it ({e.strerror})") from None
    if is_dir:
        raise ValueError("a folder, not an image or a colour")
    if path.is_file():
        return read_image(path, max_pixels)[0]
    if path.suffix.lower() in photo_pixels.IMAGE_SUFFIXES:
        raise ValueError("no such image file")
    raise not_a_colour


@dataclasses.dataclass
class Renderer:
    """Turns (RGB image, probability map) into the requested output."""

    mode: str = "mask"
    threshold: float = 0.5
    soft: bool = False
    background: np.ndarray | tuple[int, int, int] | None = None
    # The background image scaled for the last size asked for: a video's frames, or a camera's
    # photos, share it (scaling a 24-megapixel image took 4x the rest of a 1080p frame's render).
    _cover: tuple = dataclasses.field(default=(None, None), init=False, repr=False, compare=False)

    def alpha(self, probs: np.ndarray) -> np.ndarray:
        """Person opacity in [0, 1]: the probability (soft) or the thresholded mask."""
        return probs if self.soft else (probs >= self.threshold).astype(np.float32)

    def render(self, image: np.ndarray, probs: np.ndarray,
               image_alpha: np.ndarray | None = None) -> np.ndarray:
        """uint8 output: mask (H,W), cutout RGBA, overlay RGB or background RGB.

        `image_alpha` (uint8 H,W), the photo's own transparency, limits the person's opacity in
        cutouts and background replacements: what was invisible in the photo stays invisible.
        """
        a = self.alpha(probs)
        if self.mode == "mask":
            return np.round(a * 255).astype(np.uint8)
        if image_alpha is not None:
            a = a * (image_alpha.astype(np.float32) / 255)
        if self.mode == "cutout":
            return np.dstack([image, np.round(a * 255).astype(np.uint8)])
        if self.mode == "overlay":
            tint = np.array([255, 0, 160], np.float32)
            out = image.astype(np.float32)
            out = out * (1 - 0.5 * a[..., None]) + tint * 0.5 * a[..., None]
            return np.clip(np.round(out), 0, 255).astype(np.uint8)
        if self.mode == "background":
            bg = self.background_for(image.shape[:2])
            # Rounded, as the alpha is: truncated, a soft edge came out darker by half a level on
            # average (a white photo over white turned 254 along it).
            out = image.astype(np.float32) * a[..., None] + bg * (1 - a[..., None])
            return np.clip(np.round(out), 0, 255).astype(np.uint8)
        raise ValueError(f"unknown mode {self.mode!r}; use one of {MODES}")

    def background_for(self, size) -> np.ndarray:
        """float32 (H, W, 3) background for a photo of SIZE: the colour, or the background
        image scaled to cover the photo, keeping its aspect, and cropped at its centre."""
        size = tuple(size)
        if isinstance(self.background, np.ndarray):
            if self._cover[0] != size:
                bh, bw = self.background.shape[:2]
                scale = max(size[0] / bh, size[1] / bw)
                h, w = max(size[0], round(bh * scale)), max(size[1], round(bw * scale))
                interp = cv2.INTER_AREA if scale < 1 else cv2.INTER_LINEAR
                cover = cv2.resize(self.background, (w, h), interpolation=interp)
                top, left = (h - size[0]) // 2, (w - size[1]) // 2
                self._cover = size, cover[top:top + size[0], left:left + size[1]].astype(np.float32)
            return self._cover[1]
        colour = self.background if self.background is not None else (0, 255, 0)
        return np.broadcast_to(np.array(colour, np.float32), (*size, 3))


class InputError(ValueError):
    """An input that cannot be processed (unreadable, too large, not an image)."""


@contextlib.contextmanager
def _pil_without_size_limit():
    """PIL's decompression-bomb guard off (an error above ~179M pixels): it would pre-empt
    read_image's own size check with a misleading "not a readable image" and cap --max_pixels."""
    from PIL import Image

    limit, Image.MAX_IMAGE_PIXELS = Image.MAX_IMAGE_PIXELS, None
    try:
        yield Image
    finally:
        Image.MAX_IMAGE_PIXELS = limit


def pixels_problem(width: int, height: int, max_pixels: int) -> str | None:
    """Why an image, or a video's frame, of WIDTH x HEIGHT is refused (over --max_pixels), or
    None."""
    if width * height > max_pixels:
        return f"{width}x{height} = {width * height} pixels exceeds --max_pixels={max_pixels}"
    return None


def read_image(path: pathlib.Path, max_pixels: int) -> tuple[np.ndarray, np.ndarray | None]:
    """(RGB uint8 image in sRGB, its transparency as uint8 or None if opaque), shown as a viewer
    shows it, by the rules the dataset builders read photos with (photo_pixels.decode_photo);
    refused before decoding when too large."""
    try:
        data = path.read_bytes()
        with _pil_without_size_limit() as Image, Image.open(io.BytesIO(data)) as im:
            w, h = im.size
    except Exception as e:  # PIL raises many types for non-images and damaged files
        raise InputError(f"not a readable image ({e.__class__.__name__})") from None
    if problem := pixels_problem(w, h, max_pixels):
        raise InputError(problem)
    try:
        with _pil_without_size_limit():
            image, alpha, _ = photo_pixels.decode_photo(data)
    except photo_pixels.PhotoError as e:
        raise InputError(str(e)) from None
    return image, alpha


def write_image(path: pathlib.Path, array: np.ndarray) -> None:
    """Writes RGB/RGBA/gray uint8 as a PNG carrying the output mark; OSError when it cannot."""
    try:
        png = photo_pixels.encode_png(array)
    except photo_pixels.PhotoError as e:  # a write that failed, as the caller reports them
        raise OSError(str(e)) from None
    path.parent.mkdir(parents=True, exist_ok=True)
    with complete_or_absent(path) as partial:
        partial.write_bytes(png[:_PNG_HEADER_END] + _PNG_MARK + png[_PNG_HEADER_END:])


def _mirror_name(folder: pathlib.Path) -> str:
    """The name FOLDER's outputs go under in --output: its name as given, links not followed
    ("." and ".." have none of their own)."""
    return pathlib.Path(os.path.abspath(folder)).name


def _outputs_inside(folder: pathlib.Path, output: pathlib.Path) -> pathlib.Path | None:
    """The part of FOLDER's tree holding this tool's outputs (earlier runs' ones are not inputs).

    An output folder strictly inside FOLDER is skipped whole. When OUTPUT is FOLDER itself (or an
    ancestor), only the subfolder that FOLDER's outputs go to, `output/<folder name>`, is; where
    that is FOLDER itself (output = its parent) no subtree is skipped, and the outputs there,
    beside their inputs, are told apart by name instead (_is_earlier_output).
    """
    name = _mirror_name(folder)
    folder = folder.resolve()
    inside = output if folder in output.parents else output / name
    return None if inside == folder else inside


def _is_earlier_output(f: pathlib.Path, stems_beside: set[str]) -> bool:
    """Whether F is named as this tool's output of a file beside it (x_mask.png next to x.jpg)."""
    base, sep, mode = f.stem.rpartition("_")
    return bool(sep) and mode in MODES and base in stems_beside and f.suffix in (".png", ".mp4")


def _files_under(folder: pathlib.Path) -> tuple[list[pathlib.Path], list]:
    """(files, unlisted): every file in FOLDER's tree, linked folders followed (pathlib's rglob
    leaves them out), each real folder once, so that a link loop ends; and [(folder, why)] for
    those of the tree (FOLDER itself included) that could not be listed."""
    found, visited, unlisted = [], set(), []
    # os.walk passes over such a folder without a word unless told.
    for root, dirs, files in os.walk(folder, followlinks=True,
                                     onerror=lambda e: unlisted.append(
                                         (pathlib.Path(e.filename), e.strerror))):
        # Real folders before links to them, each group by name: a folder keeps its own name in
        # the outputs, and which name a twice-reached folder gets does not depend on the listing.
        dirs.sort(key=lambda name: (os.path.islink(os.path.join(root, name)), name))
        real = os.path.realpath(root)
        if real in visited:
            dirs.clear()
            continue
        visited.add(real)
        found += [pathlib.Path(root, name) for name in files]
    return found, unlisted


def _sort_listed(paths) -> tuple[list, list, list]:
    """(files, links to missing files, [(path, why)] for those that cannot be looked at) among
    PATHS, each sorted by name, files real ones before links: a photo reached twice (best.jpg a
    link to portrait.jpg beside it) keeps its own name in the outputs, as a folder does. A folder
    that may be listed but not entered (`chmod -R 644` takes its search permission) names files
    that no one may open or even stat."""
    files, dangling, unreachable = [], [], []
    for p in sorted(paths):
        try:
            if p.is_file():
                files.append(p)
            elif p.is_symlink() and not p.exists():
                dangling.append(p)
        except PermissionError as e:
            unreachable.append((p, f"cannot be read ({e.strerror})"))
    return sorted(files, key=pathlib.Path.is_symlink), dangling, unreachable


def collect_inputs(inputs, output: pathlib.Path) -> tuple[list, list, list, int, list]:
    """(images, videos, problems, passed_over, unmarked): [(path, relative output stem)], how many
    files of the input folders (each file once, however it was reached) were not taken: neither
    images nor videos by their suffix, or
    earlier outputs (the output folder's tree where it lies inside an input folder, files named
    as outputs of a file beside them: x_mask.png next to x.jpg, as --output at an input folder's
    parent writes them, and files carrying the output mark, wherever an earlier run put them).
    Hidden files and folders are left out; files named one by one are always taken. `unmarked`:
    the passed-over images and videos that do not carry the mark but are named as outputs or lie
    where outputs go (a user's own photos/photos/ with --output photos, say), which the run should
    name."""
    images, videos, problems, unmarked = [], [], [], []
    output = output.resolve()
    seen = set()  # an input named twice (a.jpg a.jpg, or photos photos/) is taken once
    passed = set()  # and a file passed over is counted once
    empty_folders = set()  # and a folder without media named once

    def first_time(f: pathlib.Path, met: set) -> bool:
        key = os.path.realpath(f)  # not Path.resolve, which raises on a link to itself
        new = key not in met
        met.add(key)
        return new

    for raw in inputs:
        path = pathlib.Path(raw)
        try:
            is_dir = path.is_dir()  # raises in a folder without search permission
        except PermissionError as e:
            if first_time(path, seen):
                problems.append((path, f"cannot be read ({e.strerror})"))
            continue
        if is_dir:
            skip = _outputs_inside(path, output)
            found, unlisted = _files_under(path)
            files, dangling, unreachable = _sort_listed(
                p for p in found if not photo_pixels.is_hidden(p.relative_to(path)))
            # Links whose target is gone (into a disk not mounted, say), photos that cannot be
            # looked at and folders that cannot be listed are inputs that cannot be read: named
            # as missing ones are, not left out without a word. A volume's lost+found is root's,
            # without the user's photos.
            unread = [(f, "a link to a missing file") for f in dangling] + unreachable
            unread = [(f, why) for f, why in unread if f.suffix.lower() in MEDIA_SUFFIXES]
            unread += [(d, f"could not list this folder ({why})") for d, why in unlisted
                       if not photo_pixels.is_hidden(d.relative_to(path))
                       and d.name != "lost+found"]
            problems += [(f, why) for f, why in unread if first_time(f, seen)]
            stems = collections.defaultdict(set)
            for f in files:
                if f.suffix.lower() in MEDIA_SUFFIXES:
                    stems[f.parent].add(f.stem)
            mirror = pathlib.Path(_mirror_name(path))
            media = len(unread)  # the folder's images and videos, whether new or named before
            earlier_outputs = 0  # its files carrying the output mark, passed over
            for f in files:
                kind = f.suffix.lower()
                named_as_output = _is_earlier_output(f, stems[f.parent])
                in_outputs = skip is not None and skip in f.resolve().parents
                # Marked: an output of an earlier run, to this --output or another.
                marked = kind in MEDIA_SUFFIXES and written_by_predict(f)
                if in_outputs or named_as_output or kind not in MEDIA_SUFFIXES or marked:
                    new = first_time(f, passed)
                    if marked:
                        earlier_outputs += 1
                    elif kind in MEDIA_SUFFIXES and new:  # named as an output or lying among them
                        unmarked.append(f)
                    continue
                media += 1
                if first_time(f, seen):
                    (videos if kind in VIDEO_SUFFIXES else images).append(
                        (f, mirror / f.relative_to(path).with_suffix("")))
            if not media and first_time(path, empty_folders):
                problems.append((path, "no images or videos in this folder" + (
                    f", only {earlier_outputs} earlier output(s) of jaxseg.predict"
                    if earlier_outputs else "")))
        elif path.is_file():
            if first_time(path, seen):
                (videos if path.suffix.lower() in VIDEO_SUFFIXES else images).append(
                    (path, pathlib.Path(path.stem)))
        else:
            problems.append((path, "no such file or folder"))
    return images, videos, problems, len(passed), unmarked


def output_path(output: pathlib.Path, stem: pathlib.Path, mode: str, suffix: str) -> pathlib.Path:
    """`output/stem_mode.suffix`."""
    return output / stem.parent / f"{stem.name}_{mode}{suffix}"


def claim_output(target: pathlib.Path, path: pathlib.Path, inputs_resolved, claimed: dict):
    """Reserves TARGET for PATH; the reason it cannot be written, or None.

    An output never replaces an input, a file this tool did not write, or the output of another
    input of the same run (a.jpg and a.png in one folder both map to a_mask.png). Claim only inputs
    that were read, so that an unreadable a.jpg leaves a_mask.png to a.png; release the claim if
    writing fails.
    """
    resolved = target.resolve()
    if resolved in inputs_resolved:
        return f"output {target} would overwrite an input"
    if resolved in claimed:
        return f"output {target} is already the output of {claimed[resolved]}"
    if os.path.lexists(target) and not written_by_predict(target):
        return (f"output {target} exists and was not written by jaxseg.predict: not replaced "
                "(move it, or choose another --output)")
    claimed[resolved] = path
    return None


def without_written(items, output, mode, suffix, inputs_resolved, claimed, problems) -> list:
    """ITEMS less those whose output, of MODE and SUFFIX, an earlier run wrote (--skip_existing),
    which are claimed as outputs written in this run are; a claim refused goes to PROBLEMS.

    An output carrying the mark is whole: each is renamed into place once written in full
    (complete_or_absent). Inputs sharing an output (a.jpg and a.png) are all kept: which one
    wrote it is known only by reading them (an unreadable a.jpg leaves it to a.png)."""
    shared = collections.Counter(output_path(output, stem, mode, suffix) for _, stem in items)
    todo = []
    for path, stem in items:
        target = output_path(output, stem, mode, suffix)
        if shared[target] > 1 or not written_by_predict(target):
            todo.append((path, stem))
        elif why := claim_output(target, path, inputs_resolved, claimed):
            problems.append((path, why))
    return todo


@contextlib.contextmanager
def counted_write(target: pathlib.Path, written: list):
    """Appends TARGET to WRITTEN once the block has put a new file there: as the block ends, or
    as a Ctrl-C stops it after the file was renamed into place (whole all the same; writes sync
    the folder after the rename, where a Ctrl-C most often lands)."""
    before = _file_id(target)
    try:
        yield
    except KeyboardInterrupt:
        if _file_id(target) != before:
            written.append(target)
        raise
    written.append(target)


def _file_id(path: pathlib.Path) -> tuple[int, int] | None:
    # A new file renamed over an old one has another inode: the old one was still there when the
    # new one was made.
    try:
        st = os.stat(path)
    except OSError:
        return None
    return st.st_dev, st.st_ino


def predict_images(predictor, renderer, items, output, *, max_pixels, inputs_resolved, progress,
                   claimed=None, written=None):
    """Processes image files in chunks; returns [(path, problem)] for the skipped ones. The
    outputs are appended to WRITTEN as they are written in full."""
    problems = []
    claimed = {} if claimed is None else claimed
    written = [] if written is None else written
    chunk = max(predictor.batch_size * 4, 16)

    def render_and_write(loaded):
        probs = predictor.probabilities([image for _, _, image, _ in loaded])
        for (path, target, image, alpha), p in zip(loaded, probs):
            try:
                with counted_write(target, written):
                    write_image(target, renderer.render(image, p, alpha))
            except OSError as e:
                claimed.pop(target.resolve())
                problems.append((path, f"could not write {target} ({e.strerror or e})"))

    loaded, pixels, read = [], 0, 0
    for number, (path, stem) in enumerate(items, 1):
        read += 1
        target = output_path(output, stem, renderer.mode, ".png")
        try:
            image, alpha = read_image(path, max_pixels)
        except InputError as e:
            problems.append((path, str(e)))
        else:
            why = claim_output(target, path, inputs_resolved, claimed)
            if why:
                problems.append((path, why))
            else:
                loaded.append((path, target, image, alpha))
                pixels += image.shape[0] * image.shape[1]
        # A chunk's photos and probability maps are all held at once: about 7 bytes per pixel.
        if len(loaded) >= chunk or pixels >= CHUNK_PIXELS or number == len(items):
            if loaded:
                render_and_write(loaded)
            progress.update(read)
            loaded, pixels, read = [], 0, 0
    return problems


def mpeg4_rate(fps: float) -> float:
    """FPS as precisely as the MPEG-4 writer can store it.

    MPEG-4 counts time in at most 65535 units a second, and OpenCV gives the writer the rate in
    thousandths where it is uneven: a phone's slow motion, whose variable rate averages 119.533
    fps, could not be written at all (119533 units). Fewer decimals are kept above 65.535 fps:
    119.53 fps is 0.003% off, 1.5 ms a minute.
    """
    digits = next((d for d in (3, 2, 1) if round(fps * 10 ** d) <= 65535), 0)
    return round(fps, digits)


def predict_video(predictor, renderer, path, target, *, max_pixels, progress=None):
    """Writes the rendered video (same frame rate and size; mp4v codec; audio is dropped);
    returns the number of frames written and notes for the user. Frames over MAX_PIXELS are
    refused, as larger images are.

    MPEG-4 frames have even sizes: an odd width or height loses its last column or row. That, and
    a video that ends before the frame count its header gives, are the notes (returned, not
    printed, so that they do not land on the line of a progress bar still open).
    """
    for name, file in (("the video's", path), ("its output's", target)):
        try:
            str(file).encode("utf-8")
        except UnicodeEncodeError:  # OpenCV crashes the process on such a name
            raise InputError(f"{name} path {file} is not UTF-8 text, which OpenCV cannot open: "
                             "rename it") from None
    capture = cv2.VideoCapture(str(path))
    if not capture.isOpened():
        raise InputError("could not open the video")
    fps = mpeg4_rate(capture.get(cv2.CAP_PROP_FPS) or 25.0)
    width = int(capture.get(cv2.CAP_PROP_FRAME_WIDTH))
    height = int(capture.get(cv2.CAP_PROP_FRAME_HEIGHT))
    announced = int(capture.get(cv2.CAP_PROP_FRAME_COUNT))
    problem = ("the video has no frame size" if width < 2 or height < 2
               else pixels_problem(width, height, max_pixels))
    if problem:
        capture.release()
        raise InputError(problem)
    even_w, even_h = width - width % 2, height - height % 2
    target.parent.mkdir(parents=True, exist_ok=True)
    frames = 0
    # Written beside the target and renamed when complete: a run stopped halfway leaves no
    # unmarked, truncated video where the next run would refuse to replace it.
    with complete_or_absent(target) as partial:
        writer = cv2.VideoWriter(str(partial), cv2.VideoWriter_fourcc(*"mp4v"), fps,
                                 (even_w, even_h))
        try:
            if not writer.isOpened():
                raise InputError(f"could not open {target} for writing as MPEG-4 at "
                                 f"{even_w}x{even_h}, {fps:g} fps")
            while True:
                batch = []
                while len(batch) < predictor.batch_size:
                    ok, frame = capture.read()
                    if not ok:
                        break
                    batch.append(cv2.cvtColor(frame[:even_h, :even_w], cv2.COLOR_BGR2RGB))
                if not batch:
                    break
                for frame, p in zip(batch, predictor.probabilities(batch)):
                    out = renderer.render(frame, p)
                    if out.ndim == 2:
                        out = np.dstack([out] * 3)
                    elif out.shape[2] == 4:  # video has no alpha: cut out onto black
                        out = np.round(out[..., :3] * (out[..., 3:] / 255.0)).astype(np.uint8)
                    writer.write(cv2.cvtColor(out, cv2.COLOR_RGB2BGR))
                frames += len(batch)
                if progress is not None:
                    progress.total = max(announced, frames)  # headers may give none, or too few
                    progress.update(len(batch))
        finally:
            capture.release()
            writer.release()
        if frames == 0:  # no empty video left behind
            raise InputError("the video has no readable frames")
        with open(partial, "ab") as f:
            f.write(_MP4_MARK)
    notes = []
    if (even_w, even_h) != (width, height):
        notes.append(f"{path}: {width}x{height} frames written as {even_w}x{even_h} "
                     "(MPEG-4 needs even sizes)")
    if frames < announced:
        notes.append(f"{path}: only {frames} of the {announced} frames its header gives could be "
                     "read; the output is that much shorter")
    return frames, notes


def ignored_option_notes(*, mode: str, soft: bool, background_given: bool,
                         threshold_given: bool) -> list[str]:
    """What the run will not do that its options may lead a user to expect."""
    notes = []
    if background_given and mode != "background":
        notes.append(f"--background is used by --mode background only; --mode {mode} ignores it")
    if threshold_given and soft:
        notes.append("--threshold is ignored with --soft (the probability itself is the alpha)")
    return notes


def video_note(mode: str) -> str:
    """What the videos a run writes in MODE lack that a user may expect of them."""
    return ("videos are written without their audio"
            + ("; video has no transparency, so cutouts of videos are on black"
               if mode == "cutout" else ""))


def _existing_note(existing: int) -> str:
    return (f"; skipped {existing} input(s) whose output was already there (--skip_existing)"
            if existing else "")


# Exit status when some inputs were skipped (the others were processed); 1 stays for usage errors.
EXIT_SKIPPED = 2


def main(argv):
    """Entry point: collect inputs, load the model, write outputs, report problems.

    Exits with EXIT_SKIPPED after processing everything else when any input was skipped.
    """
    from absl import flags
    from absl import logging as absl_logging
    from tqdm import tqdm

    absl_logging.set_verbosity(absl_logging.WARNING)  # orbax logs every restore at INFO
    escape_unencodable_stdout()  # a file name that is not UTF-8 in the summary line

    from jaxseg import inference

    f = flags.FLAGS
    inputs = argv[1:]
    if not inputs:
        raise SystemExit("usage: python -m jaxseg.predict INPUT... --output DIR [--mode mask]")
    if not 0 < f.threshold < 1:
        raise SystemExit(f"error: --threshold={f.threshold} must be between 0 and 1, both excluded")
    output = local_output_folder(f.output)
    images, videos, problems, passed_over, unmarked = collect_inputs(inputs, output)
    if unmarked:
        shown = ", ".join(str(f) for f in unmarked[:5]) + (" ..." if len(unmarked) > 5 else "")
        print(f"note: passed over {len(unmarked)} file(s) named like outputs of a file beside "
              f"them, or where outputs go, but not written by this tool: {shown}; name them as "
              "inputs to predict on them", file=sys.stderr)
    for note in ignored_option_notes(mode=f.mode, soft=f.soft,
                                     background_given=f["background"].present,
                                     threshold_given=f["threshold"].present):
        print(f"note: {note}", file=sys.stderr)
    background = None
    if f.mode == "background":
        try:
            background = read_background(f.background, f.max_pixels)
        except ValueError as e:  # InputError is one
            raise SystemExit(f"error: --background {f.background}: {e}") from None
    renderer = Renderer(mode=f.mode, threshold=f.threshold, soft=f.soft, background=background)
    model, config, described = inference.load_or_exit(f.workdir or None, f.checkpoint, f.members)
    problem = local_folder_problem(output) if images or videos else None  # before predicting
    if problem:
        raise SystemExit(f"error: --output {output}: {problem}")
    # A run killed outright (SIGKILL, out of memory) left its unfinished outputs there, hidden.
    stale = sum(map(remove_stale_partials, {output / stem.parent for _, stem in images + videos}))
    if stale:
        print(f"note: removed {stale} partial file(s) that killed runs left in {output}",
              file=sys.stderr)
    predictor = Predictor(model, config.data.image_size, batch_size=f.batch_size,
                          flip_tta=f.flip_tta, refined=f.refine)
    inputs_resolved = {p.resolve() for p, _ in images + videos}
    claimed = {}
    refused = []  # by --skip_existing's claims
    existing = len(images) + len(videos)
    if f.skip_existing:  # neither read nor predicted again
        images = without_written(images, output, f.mode, ".png", inputs_resolved, claimed,
                                 refused)
        videos = without_written(videos, output, f.mode, ".mp4", inputs_resolved, claimed,
                                 refused)
    existing -= len(images) + len(videos) + len(refused)
    written = []  # the outputs written in full, counted for a Ctrl-C's line
    try:
        with tqdm(total=len(images), desc="images", unit="img", disable=not images) as progress:
            image_problems = predict_images(
                predictor, renderer, images, output, max_pixels=f.max_pixels,
                inputs_resolved=inputs_resolved, progress=progress, claimed=claimed,
                written=written)
        video_problems = []
        for path, stem in videos:
            target = output_path(output, stem, f.mode, ".mp4")
            why = claim_output(target, path, inputs_resolved, claimed)
            if why:
                video_problems.append((path, why))
                continue
            try:
                with tqdm(desc=path.name, unit="frame") as progress, \
                        counted_write(target, written):
                    _, notes = predict_video(predictor, renderer, path, target,
                                             max_pixels=f.max_pixels, progress=progress)
                for note in notes:
                    print(f"note: {note}", file=sys.stderr)
            except (InputError, OSError) as e:
                claimed.pop(target.resolve())
                video_problems.append((path, str(e) if isinstance(e, InputError)
                                       else f"could not write {target} ({e.strerror or e})"))
    except KeyboardInterrupt:  # each output is whole or absent (complete_or_absent)
        # Outputs of an earlier run this one had not replaced yet (it was run with other
        # options, say): --skip_existing would keep them, a silent mix of old and new.
        older = sum(written_by_predict(target) and target not in written for target in
                    [output_path(output, stem, f.mode, ".png") for _, stem in images]
                    + [output_path(output, stem, f.mode, ".mp4") for _, stem in videos])
        advice = (f"{older} output(s) of an earlier run are not replaced yet: rerun the same "
                  "command to replace them (--skip_existing would keep them)" if older else
                  "rerun with --skip_existing to write the rest")
        raise KeyboardInterrupt(f"{len(written)} of {len(images) + len(videos)} outputs written "
                                f"to {output}{_existing_note(existing)}; {advice}") from None
    if len(video_problems) < len(videos):  # said of videos written only: all may be refused
        print(f"note: {video_note(f.mode)}", file=sys.stderr)
    # Missing paths (already in `problems`) are neither images nor videos: not subtracted.
    done = len(images) + len(videos) - len(image_problems) - len(video_problems)
    problems += refused + image_problems + video_problems
    print(f"model: {described['source']} (step {described['checkpoint_step']}); "
          f"wrote {done} outputs to {output}{_existing_note(existing)}"
          + (f"; passed over {passed_over} files in the input folders (not images or videos, "
             f"or earlier outputs)" if passed_over else ""))
    for path, why in problems:
        print(f"skipped {path}: {why}", file=sys.stderr)
    if problems:
        # Scripts must notice skipped inputs; every other input's output is already written.
        print(f"{len(problems)} input(s) skipped", file=sys.stderr)
        sys.exit(EXIT_SKIPPED)


def _define_flags():
    from absl import flags

    flags.DEFINE_string("output", None, "Output folder.", required=True)
    flags.DEFINE_enum("mode", "mask", MODES, "What to write.")
    flags.DEFINE_string("background", "green", "Colour (a name, #rrggbb or r,g,b) for "
                        "--mode=background, else an image file (scaled to cover the photo, "
                        "centre-cropped; ./white for a file named like a colour).")
    flags.DEFINE_float("threshold", 0.5, "Person probability threshold.")
    flags.DEFINE_bool("soft", False, "Use the probability as alpha instead of a hard mask.")
    flags.DEFINE_string("workdir", "", "Training workdir; empty = the pretrained model.")
    flags.DEFINE_string("checkpoint", "best", "'best' (the latest where there is none), "
                        "'latest' or a step number.")
    flags.DEFINE_integer("members", 0, "Pretrained ensemble: use its first N members "
                         "(0 = all; fewer is faster).")
    flags.DEFINE_integer("batch_size", 8, "Images per compiled batch.", lower_bound=1)
    flags.DEFINE_bool("flip_tta", False, "Average with the mirrored image.")
    flags.DEFINE_bool("refine", False, "Upsample along the photo's edges (guided filter).")
    flags.DEFINE_bool("skip_existing", False, "Skip inputs whose output (of this --mode) an "
                      "earlier run wrote, whatever its options: resumes a stopped run.")
    flags.DEFINE_integer("max_pixels", 80_000_000, "Refuse larger images and video "
                         "frames (decompression bombs).", lower_bound=1)


if __name__ == "__main__":
    from jaxseg.arg_types import run_absl

    _define_flags()
    run_absl(main)
