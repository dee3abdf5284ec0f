"""Exact data-parallel evaluation: `python -m jaxseg.evaluate [--workdir DIR] --dataset NAME --split S`.

Per image, inside one jitted step over the mesh, the prediction is compared with the ground truth
at the model's resolution and at the image's own resolution (probabilities upsampled before
thresholding, optionally along the photo's edges: jaxseg.refine); the step returns integer counts
per image, padded rows are zero and dropped, and all metrics derive from the int64 sums of those
counts (jaxseg.metrics).
"""
from __future__ import annotations

import collections
import functools
import json
import math
import os
import pathlib
import re
import sys

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from jaxseg import input_pipeline, metrics, refine, resolution, sharding
from jaxseg.arg_types import refuse_positional, run_absl
from jaxseg.inference import person_probabilities, weights_digest
from jaxseg.workdir import (escape_unencodable_stdout, output_file_problem, workdir_path,
                            write_text_whole)

# Thresholds at which per-pixel counts are kept for the threshold sweep and calibration.
SWEEP_THRESHOLDS = tuple(round(0.05 * i, 2) for i in range(20))
# A batch row's evaluation holds about this many bytes per canvas pixel at its peak (the sweep's
# masks and the boundary windows at full resolution; measured on CPU), and a batch may take this
# much of a device's memory, or of the host's for CPU devices, which all share it. A folder of
# 12-megapixel phone photos needs one row at a time; the datasets here fit 16 rows many times.
EVAL_BYTES_PER_CANVAS_PIXEL = 200
EVAL_MEMORY_BUDGET = 4 * 2**30


def fitting_batch_size(batch_size: int, canvas: tuple[int, int], mesh) -> int:
    """BATCH_SIZE, lowered to a multiple of the device count (at least one row per device) so
    that one batch's evaluation fits EVAL_MEMORY_BUDGET."""
    rows = max(1, EVAL_MEMORY_BUDGET // (canvas[0] * canvas[1] * EVAL_BYTES_PER_CANVAS_PIXEL))
    if mesh.devices.flat[0].platform == "cpu":
        rows = max(1, rows // sharding.local_device_count(mesh))
    return min(batch_size, rows * mesh.devices.size)


def _counts(probs_full, batch, canvas, threshold, tolerance):
    """Original-resolution counts and sweep counts for (B, H, W) canvas probabilities."""
    valid = batch["valid"] > 0
    region = resolution.region_mask(batch["size"], canvas) & valid[:, None, None]
    target = batch["full_mask"] > 0
    counts = metrics.per_image_counts(probs_full >= threshold, target, region, tolerance)
    above = [(probs_full >= t) & region for t in SWEEP_THRESHOLDS]
    counts["sweep_person"] = jnp.stack(
        [jnp.sum(a & target, axis=(1, 2), dtype=jnp.int32) for a in above], axis=1)
    counts["sweep_pixels"] = jnp.stack(
        [jnp.sum(a, axis=(1, 2), dtype=jnp.int32) for a in above], axis=1)
    return counts


def _model_step(graphdef, flip_tta, refinement, state, batch, *, canvas, threshold, tol_model,
                tol_full):
    model = nnx.merge(graphdef, state)
    probs = person_probabilities(model, batch["image"], flip_tta=flip_tta)
    valid = batch["valid"] > 0
    model_region = jnp.broadcast_to(valid[:, None, None], probs.shape)
    at_model = metrics.per_image_counts(probs >= threshold, batch["mask"][..., 0] > 0,
                                        model_region, tol_model)
    full = refine.full_resolution(batch["image"], probs, batch.get("full_image"), batch["size"],
                                  canvas, refinement)
    return {"model": at_model, "full": _counts(full, batch, canvas, threshold, tol_full),
            "info": _info(batch)}


def _predictions_step(batch, *, canvas, threshold, tol_full):
    return {"full": _counts(batch["prediction"], batch, canvas, threshold, tol_full),
            "info": _info(batch)}


def _info(batch):
    # Passed through the step so that they are gathered in the same row order as the counts.
    return {k: batch[k] for k in ("id", "index", "regions", "valid")}


def _gather(tree):
    """Global per-image arrays -> full numpy arrays on every process."""
    if jax.process_count() == 1:
        return jax.device_get(tree)
    from jax.experimental import multihost_utils

    return multihost_utils.process_allgather(tree, tiled=True)


class Evaluator:
    """Evaluates models (or prediction folders) on one source with exact, device-count-free counts."""

    def __init__(self, source, *, mesh, image_size: int, batch_size: int, threshold: float = 0.5,
                 num_workers: int = 2, canvas: tuple[int, int] | None = None):
        if not len(source):
            raise ValueError("nothing to evaluate: the split has no examples")
        self.source = source
        self.mesh = mesh
        self.image_size = image_size
        self.threshold = threshold
        self.canvas = canvas or resolution.canvas_for(input_pipeline.example_sizes(source))
        self.batch_size = fitting_batch_size(batch_size, self.canvas, mesh)
        self.batches = input_pipeline.EvalBatches(
            source, local_batch=sharding.local_batch_size(self.batch_size, mesh),
            image_size=image_size,
            canvas=self.canvas, process_index=jax.process_index(),
            process_count=jax.process_count(), num_workers=num_workers)
        self.tol_model = metrics.boundary_tolerance(image_size, image_size)
        self.tol_full = metrics.boundary_tolerance(*self.canvas)
        rep, data = sharding.replicated(mesh), sharding.data_sharded(mesh)
        self._model_step = jax.jit(
            functools.partial(_model_step, canvas=self.canvas, threshold=threshold,
                              tol_model=self.tol_model, tol_full=self.tol_full),
            static_argnums=(0, 1, 2), in_shardings=(rep, data),
            out_shardings=data)

    def evaluate_model(self, model, *, flip_tta: bool = False, refined: bool = False,
                       refine_radius: int = refine.RADIUS, refine_eps: float = refine.EPS) -> dict:
        """Metrics of an NNX model at original and model resolution, with per-image records.

        `refined`: original-resolution probabilities follow the photo's edges (jaxseg.refine,
        with this radius in model pixels and this regulariser).
        """
        graphdef, state = nnx.split(model)
        state = sharding.replicate(state, self.mesh)
        refinement = (int(refine_radius), float(refine_eps)) if refined else None
        outputs = [self._model_step(graphdef, flip_tta, refinement, state, batch)
                   for batch in self._global_batches(self.batches.iterate(full_image=refined))]
        return self._result(outputs)

    def evaluate_predictions(self, predictions_dir: str | pathlib.Path) -> dict:
        """Metrics of another model's masks or probability maps, one PNG per photo
        (`prediction_files`). The folder is read as soft maps, cut at the evaluator's threshold,
        when any of its files is soft (`is_soft`): then a map holding only 0 and 1/255 (a
        person-free photo) is not taken for a 0/1 mask. Otherwise its files are masks. Where files
        of 0 and 1 alone outnumber the soft ones, `predictions_warning` says so: one antialiased
        file among 0/1 masks reads them all as near-0 probabilities. It also says when no value of
        any soft map reaches the threshold while the photos hold people (label maps of 0, 1, 2,
        or 8-bit values in 16-bit files): nothing is then scored as a person."""
        predictions_dir = pathlib.Path(predictions_dir)
        files = prediction_files(predictions_dir,
                                 [self.source[i]["id"] for i in range(len(self.source))])
        soft_files, zero_one_files = [], []
        highest = (-1.0, "", 0, 0.0)  # (probability, file, value, bit depth's top) of the largest
        for path in files.values():
            values = read_prediction_values(path)
            if is_soft(values):
                soft_files.append(path.name)
            elif values.max() == 1:
                zero_one_files.append(path.name)
            top, depth = int(values.max()), soft_depth(values)
            if top / depth > highest[0]:
                highest = (top / depth, path.name, top, depth)
        soft = bool(soft_files)
        step = jax.jit(functools.partial(_predictions_step, canvas=self.canvas,
                                         threshold=self.threshold, tol_full=self.tol_full),
                       in_shardings=sharding.data_sharded(self.mesh),
                       out_shardings=sharding.data_sharded(self.mesh))
        outputs = [step(batch) for batch in self._global_batches(
            self._with_predictions(files, soft))]
        result = self._result(outputs)
        result["predictions_read_as"] = "soft maps" if soft else "masks"
        if soft and len(zero_one_files) > len(soft_files):
            result["predictions_warning"] = (
                f"{len(zero_one_files)} file(s) hold only 0 and 1, as 0/1 masks do (e.g. "
                f"{zero_one_files[0]}), and were read as soft maps of near-0 probabilities, "
                f"because {len(soft_files)} file(s) hold other values (e.g. {soft_files[0]}); "
                "if they are masks, save every prediction as a 0/255 mask")
        elif soft and highest[0] < self.threshold and any(
                r["tp"] + r["fn"] for r in result["per_image"]):
            # Else IoU 0 without a word: every file read as probabilities that never reach it.
            _, name, top, depth = highest
            result["predictions_warning"] = (
                f"no value of any file reaches the threshold {self.threshold:g} (the highest is "
                f"{top} of {depth:g}, in {name}), so nothing was scored as a person: soft maps are "
                "scaled by their bit depth (255, or 65535 for 16 bits); if they are label maps "
                "(0, 1, 2, ...), save every prediction as a 0/255 mask, and 8-bit values in 8-bit "
                "files")
        return result

    def _with_predictions(self, files: dict, soft: bool):
        for batch in self.batches:
            masks = []
            for row, size in zip(batch["id"], batch["size"]):
                example_id = input_pipeline.decode_id(row)
                pred = np.zeros(self.canvas, np.float32)
                if example_id:
                    path = files[example_id]
                    values = read_prediction_values(path)
                    try:
                        pred[: size[0], : size[1]] = prediction_probabilities(
                            values, tuple(size), soft=soft)
                    except ValueError as e:  # another aspect ratio
                        raise ValueError(f"{path.name}: {e}") from None
                masks.append(pred)
            yield dict(batch, prediction=np.stack(masks))

    def _global_batches(self, batches):
        for batch in batches:
            yield sharding.to_global(batch, self.mesh)

    def _result(self, outputs) -> dict:
        host = _gather(outputs)
        info = [o["info"] for o in host]
        merged = {k: np.concatenate([o["full"][k] for o in host]) for k in host[0]["full"]}
        valid = np.concatenate([i["valid"] for i in info]) > 0
        # Valid rows in id order, so that float means do not depend on the process count; rows
        # arrive interleaved by process, so ids that repeat (a split of several folders' photos)
        # are ordered by their place in the source.
        all_ids = [input_pipeline.decode_id(r) for r in np.concatenate([i["id"] for i in info])]
        index = np.concatenate([i["index"] for i in info])
        rows = np.array(sorted(np.flatnonzero(valid), key=lambda r: (all_ids[r], index[r])),
                        dtype=np.int64)
        full = {k: v[rows] for k, v in merged.items()}
        ids = [all_ids[r] for r in rows]
        regions = np.concatenate([i["regions"] for i in info])[rows]
        result = metrics.metrics_from_counts(full)
        if "model" in host[0]:
            at_model = {k: np.concatenate([o["model"][k] for o in host])[rows]
                        for k in host[0]["model"]}
            result["model_resolution"] = metrics.metrics_from_counts(at_model)
        else:
            result["model_resolution"] = None
        ious, dices = metrics.image_iou(full), metrics.image_dice(full)
        pixels = full["tp"] + full["fp"] + full["fn"] + full["tn"]
        area = (full["tp"] + full["fn"]) / np.maximum(pixels, 1)
        result["per_image"] = [
            {"id": ids[i], "iou": float(ious[i]), "dice": float(dices[i]),
             "person_fraction": float(area[i]), "regions": int(regions[i]),
             "tp": int(full["tp"][i]), "fp": int(full["fp"][i]), "fn": int(full["fn"][i])}
            for i in range(len(ids))]
        result["threshold_sweep"] = {
            "thresholds": list(SWEEP_THRESHOLDS),
            "person": np.sum(full["sweep_person"].astype(np.int64), axis=0).tolist(),
            "pixels": np.sum(full["sweep_pixels"].astype(np.int64), axis=0).tolist()}
        result["num_images"] = int(valid.sum())
        result["threshold"] = self.threshold
        result["canvas"] = list(self.canvas)
        result["boundary_tolerance_px"] = {"original": self.tol_full, "model": self.tol_model}
        return result


def prediction_files(predictions_dir: pathlib.Path, ids: list[str]) -> dict[str, pathlib.Path]:
    """Each id's prediction PNG (any case of .png): `<id>.png`, or the stem with a mask suffix
    (`<id>_mask.png` or `<id>_cutout.png`, as jaxseg.predict names them), by person_folder's
    pairing rule. FileNotFoundError names ids without one (and where their files are instead),
    ValueError ids with several."""
    if not predictions_dir.is_dir():
        raise FileNotFoundError(f"no folder {predictions_dir}")
    wanted = set(ids)
    named = _named_for(predictions_dir, wanted)
    found = {i: [p for p in paths if p.suffix.lower() == ".png"] for i, paths in named.items()}
    # Sorted, each once: a TFDS split's order is shuffled, and a split of several folders may
    # repeat an id (named, and counted, once per folder).
    missing = sorted(i for i in wanted if not found.get(i))
    if missing:
        raise FileNotFoundError(
            f"{len(missing)} of {len(wanted)} ids have no prediction <id>.png, <id>_mask.png or "
            f"<id>_cutout.png in {predictions_dir}: " + ", ".join(missing[:20])
            + (" ..." if len(missing) > 20 else "") + _elsewhere(predictions_dir, named, missing))
    several = sorted(i for i in wanted if len(found[i]) > 1)
    if several:
        raise ValueError(f"{len(several)} ids have several predictions, keep one of: " + "; ".join(
            " or ".join(p.name for p in found[i]) for i in several[:5])
            + ("; ..." if len(several) > 5 else ""))
    return {i: found[i][0] for i in ids}


def _named_for(folder: pathlib.Path, wanted: set[str]) -> dict[str, list[pathlib.Path]]:
    """The entries directly in FOLDER by the id their stem names (`<id>` itself, else the stem
    without a mask suffix), whatever their suffix."""
    import unicodedata

    from jaxseg.datasets.person_folder import MASK_SUFFIX

    named = collections.defaultdict(list)
    for path in sorted(folder.iterdir()):
        # One Unicode form, as person_folder's ids: a name written on macOS is decomposed.
        stem = unicodedata.normalize("NFC", path.stem)
        named[stem if stem in wanted else MASK_SUFFIX.sub("", stem)].append(path)
    return named


def _elsewhere(folder: pathlib.Path, named: dict, missing: list[str]) -> str:
    """Where the MISSING ids' predictions are instead, for the error: files of another format
    beside them, or a subfolder (jaxseg.predict writes a folder's outputs to OUTPUT/<its name>/)."""
    suffixes = sorted({p.suffix.lower() or "no suffix" for i in missing for p in named.get(i, [])
                       if p.is_file()})
    if suffixes:
        return (f"; the files named for them are {', '.join(suffixes)}, and predictions are "
                "read from PNG files only")
    for sub in sorted(p for p in folder.iterdir() if p.is_dir()):
        try:
            inside = _named_for(sub, set(missing))
        except OSError:  # one it may not list (a volume's lost+found): the error as it was
            continue
        held = sum(any(p.suffix.lower() == ".png" for p in inside.get(i, [])) for i in missing)
        if held:
            return f"; {held} of them are in {sub.name}/: pass --predictions {sub}"
    return ""


def read_prediction_values(path: pathlib.Path) -> np.ndarray:
    """A prediction image's values as ground-truth masks are read (`image_io.read_mask_image`:
    palettes by colour, colour masks by their brightest channel, a cutout by its alpha)."""
    from jaxseg.datasets import image_io
    from jaxseg.datasets.person_folder import named_as_cutout

    try:
        return image_io.read_mask_image(path, cutout=named_as_cutout(path))
    except image_io.BadFile as e:
        raise ValueError(f"cannot read prediction {path.name}: {e}") from None


def is_soft(values: np.ndarray) -> bool:
    """True for a probability map: more than two distinct levels."""
    low, high = values.min(), values.max()
    return bool(((values != low) & (values != high)).any())


def soft_depth(values: np.ndarray) -> float:
    """The value of probability 1 in a soft map: 65535 for 16 bits, else 255."""
    return 65535.0 if values.dtype == np.uint16 or values.max() > 255 else 255.0


def prediction_probabilities(values: np.ndarray, size: tuple[int, int], *, soft: bool) -> np.ndarray:
    """float32 P(person) at `size` (height, width) from a prediction image's values.

    Soft maps are scaled by their bit depth (255, or 65535 for 16 bits), so that --threshold
    cuts them; masks are binarized like ground truth (`image_io.binarize`: 0/1, 0/255, 0/65535,
    other values above half the range, or above 0 when they are all small). Other sizes are
    resized (nearest); another aspect ratio is a ValueError.
    """
    from jaxseg.datasets import image_io

    if not soft:
        probs = image_io.binarize(values)[0]
    else:
        probs = values / soft_depth(values)
    return image_io.fit_to_size(probs.astype(np.float32), size)[0]  # BadFile is a ValueError


def folder_pair_key(images: str, masks: str) -> str:
    """A short stable name for a pair of --images/--masks folders (by their resolved paths)."""
    import hashlib

    pair = f"{pathlib.Path(images).resolve()}\0{pathlib.Path(masks).resolve()}"
    return hashlib.sha256(pair.encode()).hexdigest()[:16]


def folder_root(images: str, masks: str) -> pathlib.Path:
    """A person_folder root with `images/` and `masks/` for two arbitrary folders.

    Sibling folders named images/ and masks/ are used in place when their parent is a plain
    folder of the two (no split folders beside them); otherwise a root of two symlinks is made
    under $TFDS_DATA_DIR (stable per pair of paths, so prepared data is reused).
    """
    images_dir, masks_dir = pathlib.Path(images).resolve(), pathlib.Path(masks).resolve()
    for flag, d in (("--images", images_dir), ("--masks", masks_dir)):
        if not d.is_dir():
            raise FileNotFoundError(f"{flag}: not a folder: {d}")
        if not any(p.is_file() for p in d.rglob("*")):
            raise FileNotFoundError(f"{flag}: no files in {d}")
    if images_dir == masks_dir:  # each photo would be paired with itself as its mask
        raise ValueError(f"--images and --masks are the same folder ({images_dir}): photos and "
                         "masks are paired by file name, so put the masks in a folder of their own")
    if (images_dir.parent == masks_dir.parent and images_dir.name == "images"
            and masks_dir.name == "masks" and _single_split_folder(images_dir.parent)):
        return images_dir.parent
    base = pathlib.Path(os.environ.get("TFDS_DATA_DIR", "~/tensorflow_datasets")).expanduser()
    root = base / "jaxseg_folder_pairs" / folder_pair_key(images, masks)
    root.mkdir(parents=True, exist_ok=True)
    for name, target in (("images", images_dir), ("masks", masks_dir)):
        link = root / name
        if not link.is_symlink():
            link.symlink_to(target, target_is_directory=True)
    return root


def _single_split_folder(folder: pathlib.Path) -> bool:
    """Whether person_folder reads FOLDER as its images/ and masks/ alone."""
    from jaxseg.datasets import person_folder

    try:
        return person_folder.layout(folder) == {"train": folder}
    except ValueError:  # split folders beside images/, or misnamed ones
        return False


def _source_for(flags_):
    """(dataset, split, source, the user's folder or None, its files not scored or None)."""
    from jaxseg import config_check, datasets, distributed
    from jaxseg.datasets import image_io

    # As the results record it for jaxseg.report: --data_dir=~/d (no shell expands it) was built
    # in ./~/d, and the results named ~/d.
    data_dir = str(workdir_path(flags_.data_dir)) if flags_.data_dir else None
    if flags_.images or flags_.masks:
        if not (flags_.images and flags_.masks):
            raise ValueError("--images and --masks go together")
        root = folder_root(flags_.images, flags_.masks)
        # Prepared once: each prepare() fingerprints every file of the folder again.
        prepared = datasets.prepare("person_folder", data_dir=data_dir, folder=str(root))
        splits = prepared.info.splits
        build = prepared.report()
        skipped = build["skipped"]
        if skipped and distributed.is_main_process():  # say what is not scored, and why
            print(f"{len(skipped)} file(s) of the folder are not scored:\n"
                  + "\n".join(f"  {s['file']}: {s['reason']}" for s in skipped[:20])
                  + ("\n  ..." if len(skipped) > 20 else ""), file=sys.stderr)
        # Photos given as --masks (the two swapped) scored IoU 0.14 without a word.
        odd = [w for w in build["warnings"]
               if w["note"].startswith(image_io.ODD_MASK_VALUES)]
        if odd and distributed.is_main_process():
            print(f"{len(odd)} mask(s) hold values other than 0/1/255 (first: {odd[0]['file']}: "
                  f"{odd[0]['note']}): check that --masks names the masks", file=sys.stderr)
        # A folder without split subfolders has one split, `train`: use it whatever --split
        # names, but cut as asked (test[:10], the default split sliced, scored the whole folder).
        split = flags_.split
        if not config_check.split_names(split) <= set(splits):
            only = next(iter(splits))
            split = (re.sub(r"^\s*[^\[]*", only, split, count=1)
                     if len(splits) == 1 and "+" not in split else only)
        return "person_folder", split, datasets.Source(prepared, split), str(root), skipped
    if not flags_.dataset:
        raise ValueError("say what to evaluate on: --dataset NAME --split SPLIT, or --images/--masks")
    if flags_.dataset == "person_folder":
        raise ValueError("person_folder scores your own folders: pass --images DIR --masks DIR")
    return flags_.dataset, flags_.split, datasets.data_source(flags_.dataset, flags_.split,
                                                             data_dir=data_dir), None, None


def main(argv):
    """Entry point: evaluate a checkpoint, the pretrained model, or a folder of predictions."""
    refuse_positional(argv)
    from absl import app, flags
    from absl import logging as absl_logging

    absl_logging.set_verbosity(absl_logging.WARNING)  # orbax logs every restore at INFO
    escape_unencodable_stdout()  # a results path that is not UTF-8 in the last line

    from jaxseg import distributed, inference

    f = flags.FLAGS
    # No shell expands --images=~/x (nor --masks=, --predictions=): they were looked for in ./~/x.
    for name in ("images", "masks", "predictions"):
        f[name].value = os.path.expanduser(f[name].value)
    if f.predictions and (f.flip_tta or f.refine):
        raise app.UsageError("--flip_tta and --refine change how a model predicts; "
                             "they do not apply to --predictions")
    if f.predictions and (f.workdir or f.members or f["checkpoint"].present):
        raise app.UsageError("--workdir, --checkpoint and --members choose the model to run; "
                             "--predictions scores another model's masks instead")
    if (f.images or f.masks) and f.dataset:
        raise app.UsageError("--dataset and --images/--masks each name what to score: "
                             "pass one or the other")
    # Below about 1e-6 the filter's float32 window variances lose their precision; NaN would
    # make every refined probability NaN (no pixel a person, without a word), and inf a box blur.
    if f.refine_radius < 1 or not (math.isfinite(f.refine_eps) and f.refine_eps >= 1e-6):
        raise app.UsageError(f"--refine_radius={f.refine_radius} must be >= 1 and "
                             f"--refine_eps={f.refine_eps:g} a finite number >= 1e-6")
    if not f.refine and (f["refine_radius"].present or f["refine_eps"].present):
        # Ignored without a word: the results (and their file name) were the unrefined ones.
        raise app.UsageError("--refine_radius and --refine_eps set how --refine refines: add "
                             "--refine, or leave them out")
    if not 0 < f.threshold < 1:
        raise app.UsageError(f"--threshold={f.threshold} must be between 0 and 1")
    distributed.initialize(f.coordinator_address, f.num_processes, f.process_id)
    # Else refused only once the whole split has been scored. By the process that writes it
    # (another host's disk may lack its folder), once joined: a process refusing before it joins
    # leaves the others waiting out the start-up timeout.
    if f.output and distributed.is_main_process() and (
            problem := output_file_problem(workdir_path(f.output))):
        distributed.exit_with_error(f"error: --output {f.output}: {problem}")
    try:
        # Process 0 prepares the data (and a folder pair's links) before the others read it:
        # several processes building into one TFDS_DATA_DIR at once collide.
        dataset, split, source, folder, not_scored = distributed.main_process_first(
            lambda: _source_for(f))
    # An unknown dataset or split, missing folders, or a data folder that cannot be made or
    # written (--data_dir or $TFDS_DATA_DIR naming a file, a read-only folder).
    except (ValueError, OSError) as e:
        distributed.exit_with_error(f"error: {e}")
    mesh = sharding.make_mesh()
    batch = -(-f.batch_size // mesh.devices.size) * mesh.devices.size
    if f.predictions:
        image_size, model, described = 0, None, {"source": str(f.predictions),
                                                 "checkpoint_step": None}
    else:
        model, config, described = inference.load_or_exit(f.workdir or None, f.checkpoint,
                                                          f.members)
        image_size = config.data.image_size
    # epath, as for the default under a workdir: pathlib made gs://b/r.json a local gs:/b/r.json.
    output = workdir_path(f.output) if f.output else _default_output(f, dataset, split)
    # The default path too, once a missing --workdir has been named (beside a --predictions
    # folder on a read-only share, say): it failed only once the whole split had been scored.
    if not f.output and distributed.is_main_process() and (
            problem := output_file_problem(output)):
        distributed.exit_with_error(f"error: the default results file {output}: {problem}; "
                                    "pass --output")
    try:
        evaluator = Evaluator(source, mesh=mesh, image_size=max(image_size, 32),
                              batch_size=batch, threshold=f.threshold)
    except ValueError as e:  # an empty split
        distributed.exit_with_error(f"error: {dataset} {split}: {e}")
    # Each process scores its share of the split, and the shares are summed: processes that
    # differ here (a workdir each host holds its own copy of, another copy of the data, other
    # flags) summed counts of other models or examples into one result without a word.
    differ = distributed.disagreement(_must_agree(f, dataset, split, evaluator, model))
    if differ:
        distributed.exit_with_error(
            f"error: the processes of this evaluation differ in {differ}: start every process "
            "with the same command, on the same data and checkpoint")
    if evaluator.batch_size < batch and distributed.is_main_process():
        canvas = evaluator.canvas
        print(f"note: batch {evaluator.batch_size} instead of {batch}: the largest photo needs a "
              f"{canvas[1]}x{canvas[0]} canvas", file=sys.stderr)
    try:
        if model is None:
            try:
                result = evaluator.evaluate_predictions(f.predictions)
            # Missing or unreadable prediction masks, a folder that may not be listed.
            except (ValueError, OSError) as e:
                distributed.exit_with_error(f"error: --predictions {f.predictions}: {e}")
        else:
            result = evaluator.evaluate_model(model, flip_tta=f.flip_tta, refined=f.refine,
                                              refine_radius=f.refine_radius,
                                              refine_eps=f.refine_eps)
    except KeyboardInterrupt:  # the results are written once the whole split is scored
        raise KeyboardInterrupt(f"nothing written to {output}; rerun the same command to "
                                "score the split") from None
    result.update(dataset=dataset, split=split, model=described["source"],
                  checkpoint_step=described["checkpoint_step"], flip_tta=bool(f.flip_tta),
                  refine=bool(f.refine), members=f.members or None)
    if f.refine:
        result.update(refine_radius=f.refine_radius, refine_eps=f.refine_eps)
    if "predictions_warning" in result and distributed.is_main_process():
        print(f"warning: --predictions {f.predictions}: {result['predictions_warning']}",
              file=sys.stderr)
    if (result.get("predictions_read_as") == "masks" and f.threshold != 0.5
            and distributed.is_main_process()):  # the option was taken without a word
        print(f"note: --threshold {f.threshold:g} cuts soft maps only; --predictions "
              f"{f.predictions} holds masks, scored as they are", file=sys.stderr)
    if folder:  # where jaxseg.report finds the photos again for its overlays
        result.update(folder=folder, not_scored=not_scored)
    if f.data_dir:  # and the prepared data
        result["data_dir"] = str(workdir_path(f.data_dir))
    if distributed.is_main_process():
        summary = {k: result[k] for k in ("iou", "mean_image_iou", "miou", "dice", "precision",
                                          "recall", "pixel_accuracy", "boundary_f1",
                                          "iou_without_edge_errors")}
        # Printed before the file is written: a failed write must not lose the figures.
        print(json.dumps({"dataset": dataset, "split": split, "num_images": result["num_images"],
                          **{k: round(v, 4) for k, v in summary.items()}}), flush=True)
        try:
            output.parent.mkdir(parents=True, exist_ok=True)
            write_text_whole(output, json.dumps(result, indent=1) + "\n")
        except OSError as e:
            raise SystemExit(f"error: could not write {output} ({e.strerror or e}): "
                             "give --output a writable path") from None
        print(f"wrote {output}")


def _must_agree(f, dataset: str, split: str, evaluator: Evaluator, model) -> dict[str, str]:
    """What every process of an evaluation must hold alike, as text (distributed.disagreement):
    the model's weights (None for --predictions), the options that change the figures, and the
    data (its size and canvas)."""
    weights = None if model is None else weights_digest(model)
    return {"the model": json.dumps([weights, f.members, bool(f.predictions)]),
            "the options": json.dumps([f.flip_tta, f.refine, f.refine_radius, f.refine_eps,
                                       evaluator.threshold, evaluator.batch_size]),
            "the data": json.dumps([dataset, split, len(evaluator.source),
                                    list(evaluator.canvas)])}


# Where results of the pretrained model go when no workdir is given (read by jaxseg.report too).
PRETRAINED_RUN_DIR = "runs/pretrained"


def _default_output(f, dataset: str, split: str) -> pathlib.Path:
    # Every option that changes the figures has its part in the name, so that no result replaces
    # another's: what the name keeps after dataset and split is the report's row label.
    suffix = ""
    if not f.predictions:
        suffix += ("_flip" if f.flip_tta else "") + ("_refine" if f.refine else "")
        suffix += f"_members{f.members}" if f.members else ""
        if f.refine and (f.refine_radius, f.refine_eps) != (refine.RADIUS, refine.EPS):
            suffix += f"_r{f.refine_radius}_eps{f.refine_eps:g}"
    if f.threshold != 0.5:
        suffix += f"_t{f.threshold:g}"
    if f.images:  # one file per pair of folders, named after the photos' folder
        name = re.sub(r"[^A-Za-z0-9._-]+", "_", pathlib.Path(f.images).resolve().name)
        suffix += f"_{name}-{folder_pair_key(f.images, f.masks)[:8]}"
    if f.predictions:
        # Absolute and normalised: '.' (run inside the folder) has no name and is its own parent.
        predictions = pathlib.Path(os.path.abspath(f.predictions))
        return predictions.parent / f"{predictions.name}_{dataset}_{split}{suffix}.json"
    base = (workdir_path(f.workdir) if f.workdir else pathlib.Path(PRETRAINED_RUN_DIR)) / "eval"
    return base / f"{f.checkpoint}_{dataset}_{split}{suffix}.json"


def _define_flags():
    from absl import flags

    flags.DEFINE_string("workdir", "", "Training workdir; empty = the pretrained model.")
    flags.DEFINE_string("checkpoint", "best", "'best' (the latest where there is none), "
                        "'latest' or a step number.")
    flags.DEFINE_integer("members", 0, "Pretrained ensemble: use its first N members "
                         "(0 = all; fewer is faster).")
    flags.DEFINE_string("dataset", "", "portrait_segmentation or ccp_person (for a folder of "
                        "your own: --images and --masks).")
    flags.DEFINE_string("split", "test", "Split to evaluate.")
    flags.DEFINE_string("images", "", "Folder of photos (with --masks) instead of --dataset.")
    flags.DEFINE_string("masks", "", "Folder of masks paired with --images by file stem.")
    flags.DEFINE_string("predictions", "", "Score any model's <id>.png (or <id>_mask.png, "
                        "<id>_cutout.png; any case of .png) masks or soft maps instead.")
    flags.DEFINE_string("output", "", "Metrics JSON path (default: WORKDIR/eval/, "
                        "runs/pretrained/eval/ for the pretrained model, or beside the "
                        "--predictions folder).")
    flags.DEFINE_string("data_dir", "", "TFDS data dir (default $TFDS_DATA_DIR).")
    flags.DEFINE_integer("batch_size", 16, "Global batch (rounded up to the device count; "
                         "lowered where large photos would not fit in memory).",
                         lower_bound=1)
    flags.DEFINE_float("threshold", 0.5, "Probability threshold for the person class.")
    flags.DEFINE_bool("flip_tta", False, "Average predictions with the mirrored image.")
    flags.DEFINE_bool("refine", False, "Upsample along the photo's edges (guided filter).")
    flags.DEFINE_integer("refine_radius", refine.RADIUS, "Refinement radius in model pixels.")
    flags.DEFINE_float("refine_eps", refine.EPS, "Refinement regulariser (larger = smoother).")
    from jaxseg import distributed

    distributed.define_flags()


if __name__ == "__main__":
    _define_flags()
    run_absl(main)
