"""Data-parallel training: `python -m jaxseg.train --config configs/default.py --workdir DIR`.

The train state (model parameters, batch statistics, optimiser state and step) is one pytree,
replicated over a 1-D device mesh; each batch is sharded over the mesh axis 'data' and XLA inserts
the gradient all-reduce and BatchNorm's cross-device statistics. Running the same command again
resumes from the workdir's latest checkpoint (resume order: workdir > train.init_checkpoint >
scratch); the batch at step s depends only on (seed, s), so a resumed run is exact.
"""
from __future__ import annotations

import contextlib
import errno
import json
import logging
import os
import signal
import sys
import time
import traceback

import jax
import numpy as np
from flax import nnx

from jaxseg import (checkpointing, config_check, datasets, distributed, host_memory, inference,
                    input_pipeline, metric_writer, mixture, preprocess, sharding, train_step)
from jaxseg.arg_types import refuse_positional, run_absl
from jaxseg.workdir import (STOPPED_EXIT_STATUS, WorkdirBusy, local_folder_problem, training_lock,
                            workdir_path, write_text_whole)

log = logging.getLogger("jaxseg.train")


class DataUnavailable(OSError):
    """The training data could not be prepared (downloaded, read or written)."""


def _data_dir(config):
    return config.data.data_dir or None


def train_sources(config):
    """(sources, weights) of the training mixture."""
    used = dict.fromkeys(n for spec in (config.data.train, config.data.eval)
                         for n, _ in mixture.parse_mixture(spec))  # each prepared once
    try:
        prepared = distributed.main_process_first(lambda: [
            datasets.prepare(n, data_dir=_data_dir(config), folder=config.data.folder or None)
            for n in used])
    # No manual dir and no network, or a data dir that is a file or read-only: the builders'
    # messages say what to do, and a traceback would bury them.
    except OSError as e:
        raise DataUnavailable(str(e)) from None
    for builder in prepared:
        # A user's folder with misnamed masks trains on what pairs: say what did not, and where
        # the list is (the shipped datasets' known exclusions are not skips).
        if (skipped := builder.report()["skipped"]) and distributed.is_main_process():
            log.warning("%s: %d file(s) skipped, not trained or validated on (%s; all with their "
                        "reasons in %s)", builder.name, len(skipped), ", ".join(
                            f"{s['file']}: {s['reason']}" for s in skipped[:3]) + (
                            ", ..." if len(skipped) > 3 else ""),
                        builder.data_path / datasets.REPORT_FILE)
    names_weights = mixture.parse_mixture(config.data.train)
    sources = [datasets.data_source(name, config.data.train_split, data_dir=_data_dir(config),
                                    folder=config.data.folder or None) for name, _ in names_weights]
    return sources, [w for _, w in names_weights]


def validation_evaluators(config, mesh):
    """{dataset name: Evaluator} over the validation split of each evaluation dataset."""
    from jaxseg.evaluate import Evaluator

    out = {}
    for name, _ in mixture.parse_mixture(config.data.eval):
        source = datasets.data_source(name, config.data.eval_split, data_dir=_data_dir(config),
                                      folder=config.data.folder or None)
        source = input_pipeline.Head(source, config.eval.max_examples)
        out[name] = Evaluator(source, mesh=mesh, image_size=config.data.image_size,
                              batch_size=config.eval.batch_size, threshold=config.eval.threshold,
                              num_workers=config.data.num_workers)
    return out


class _Preemption:
    """Turns SIGTERM, and a first Ctrl-C, into a flag checked at step boundaries (all processes
    agree on it), so the run saves where it is and stops; a second Ctrl-C stops it at once."""

    def __init__(self, mesh):
        self.requested = False
        self.reason = ""
        self._mesh = mesh
        self._gathered = None  # the processes' flags as of the previous check, still on devices
        self._previous = {sig: signal.signal(sig, self._handle)
                          for sig in (signal.SIGTERM, signal.SIGINT)}

    def _handle(self, signum, frame):
        del frame
        again = self.requested
        # Before the message: a Ctrl-C pressed again as it was written ran this handler inside
        # this one, found no request yet, and was taken for the first.
        self.reason = self.reason or signal.Signals(signum).name
        self.requested = True
        if signum == signal.SIGINT:
            if again:
                raise KeyboardInterrupt
            if jax.process_index() == 0:  # os.write: print() in a handler can re-enter stderr
                os.write(sys.stderr.fileno(), b"\nCtrl-C: saving a checkpoint after this step, "
                         b"then stopping (press again to stop at once, losing the steps since "
                         b"the last checkpoint)\n")

    def should_stop(self) -> bool:
        """Whether to stop after this step. With several processes: whether any had a request
        by the previous check, so that all stop at the same step; reading that gather one step
        late lets the host dispatch the next step while this one runs (waiting for a gather of
        this step would wait for the step itself)."""
        if jax.process_count() == 1:
            return self.requested
        previous = self._gathered
        self._gathered = sharding.any_process_flag(self.requested, self._mesh)
        return previous is not None and bool(previous)

    def restore(self):
        for sig, previous in self._previous.items():
            signal.signal(sig, previous)


def _meta(config, step: int, extra: dict | None = None) -> dict:
    return {"config": json.loads(config.to_json()), "step": int(step), "seed": config.seed,
            "global_batch": config.train.batch_size, "data_train": config.data.train,
            **(extra or {})}


def _folder_data(config) -> dict:
    """{'person_folder': the name of its prepared data} where the run reads a person_folder (the
    name hashes the folder's path and its files' names, sizes and times), else {}: recorded with
    each checkpoint, so that a resume on a folder changed since says so."""
    names = {n for spec in (config.data.train, config.data.eval) for n, _ in mixture.parse_mixture(spec)}
    if "person_folder" not in names:
        return {}
    return {"person_folder": datasets.config_for(config.data.folder).name}


# Model fields that set the shapes of the parameters (the others may change on resume).
_SHAPE_FIELDS = ("depth", "base_features", "norm", "residual", "upsample", "num_classes",
                 "attention_gates")


def _shape_changes(stored, config) -> list[str]:
    """'model.FIELD=STORED (this config: VALUE)' for each shape field in which a stored config
    (read by config_from_json, which fills in the fields it knows were added since) differs
    from this one; any other field a stored config lacks counts as unchanged."""
    return [f"model.{k}={stored.model[k]!r} (this config: {config.model[k]!r})"
            for k in _SHAPE_FIELDS if stored.model.get(k, config.model[k]) != config.model[k]]


def _check_resumable(config, ckpts) -> dict:
    """Refuses a resume whose model shape or EMA setting differs from the checkpoint's, naming
    the fields to set back (other state mismatches surface when restoring, in _initial_state).
    Returns the checkpoint's metadata."""
    meta, _ = ckpts.read_meta("latest")
    stored = inference.config_from_json(meta["config"])
    changed = _shape_changes(stored, config)
    if changed:
        raise config_check.ConfigError(
            f"the workdir's checkpoints hold a model with {', '.join(changed)}: resume with "
            f"those values, or train a model of this shape in a new workdir")
    saved = train_step.ema_decay(stored)
    if (saved > 0) != (train_step.ema_decay(config) > 0):
        raise config_check.ConfigError(
            f"the workdir's checkpoints were written with train.ema_decay={saved}, this config has "
            f"{train_step.ema_decay(config)}: resume with EMA {'on' if saved > 0 else 'off'} "
            f"(--config.train.ema_decay=...), or use a new workdir with "
            f"--config.train.init_checkpoint=OLD_WORKDIR")
    return meta


def _unfit_state(config, meta: dict, workdir) -> str:
    """Why the checkpoint of META does not restore onto CONFIG's train state, in one line: the
    optim fields changed since (one turns a part of the optimiser's state on or off, as
    grad_clip_norm 0 does), instead of orbax's diff of the two trees."""
    changed = _changed_fields(meta.get("config", {}), json.loads(config.to_json()), ("optim",))
    # The workdir's config.json holds the old values until the run starts.
    what = ", ".join(changed) if changed else "an optim or train setting (see its config.json)"
    return (f"the workdir's checkpoint does not fit this config's optimiser state, changed since "
            f"it was written by {what}: resume with the old values, or use a new workdir with "
            f"--config.train.init_checkpoint={workdir} to start from its weights only")


def _initial_state(config, ckpts, graphdef, state, mesh, init=None):
    """Resume order: the workdir's latest checkpoint > INIT, the (model, step) of
    train.init_checkpoint (`_starting_model`) > scratch. Returns (state, step, stopped):
    STOPPED where the checkpoint resumed from was saved by a stop (SIGTERM, Ctrl-C)."""
    rep = sharding.replicated(mesh)
    if ckpts.latest_step() is not None:
        try:
            meta = _check_resumable(config, ckpts)
            try:
                restored, meta, step = ckpts.restore("latest",
                                                     checkpointing.abstract_like(state, rep))
            except ValueError:  # another optimiser structure, e.g. gradient clipping turned off
                raise config_check.ConfigError(
                    _unfit_state(config, meta, ckpts.latest.directory.parent)) from None
        except checkpointing.UnreadableCheckpoint as e:  # read by either
            # Without it checkpoints/ holds none to resume from: the run starts as a new one does.
            afresh = ("" if e.fallback is not None else ": move it out of there to start afresh "
                      "(from train.init_checkpoint if set, else from scratch)")
            raise config_check.ConfigError(f"cannot resume: {e}{afresh}") from None
        log.info("resumed from %s at step %d", ckpts.latest.directory, step)
        _warn_about_resume_changes(config, meta)
        return restored, step, bool(meta.get("preempted"))
    state = sharding.replicate(state, mesh)
    if init is not None:
        # The checkpoint's evaluated model (its EMA when it kept one) starts both models here.
        model, step = init
        nodes = nnx.merge(graphdef, state)
        for name in ("model", "ema"):
            if name in nodes:
                nnx.update(nodes[name], nnx.state(model))
        log.info("initialised the model from %s (step %d)", config.train.init_checkpoint, step)
        state = sharding.replicate(nnx.state(nodes), mesh)
    return state, 0, False


def _warn_about_resume_changes(config, meta: dict) -> None:
    """Warns about config changes that make a resumed run differ from an uninterrupted one
    (on process 0 only)."""
    if not distributed.is_main_process():  # every process reads the same meta: say it once
        return
    if meta.get("global_batch", config.train.batch_size) != config.train.batch_size:
        # The data position is step x batch composition: another batch moves it.
        log.warning("resumed with train.batch_size=%d, written with %d: the data position "
                    "is recomputed at the new batch, so this epoch covers its examples "
                    "unevenly (some once more or less)",
                    config.train.batch_size, meta["global_batch"])
    for field, stored in (("seed", meta.get("seed")), ("data.train", meta.get("data_train"))):
        value = config.seed if field == "seed" else config.data.train
        if stored is not None and stored != value:
            log.warning("resumed with %s=%r, written with %r: from here the batches and their "
                        "augmentation differ from those of the run that wrote the checkpoint",
                        field, value, stored)
    steps = meta.get("config", {}).get("train", {}).get("num_steps")
    if steps is not None and steps != config.train.num_steps:
        log.warning("resumed with train.num_steps=%d, written with %d: the learning-rate "
                    "schedule now spans %d steps, so the rate at the resumed step differs "
                    "from the one the run had (a finished cosine rises again)",
                    config.train.num_steps, steps, config.train.num_steps)
    written, now = meta.get("person_folder"), _folder_data(config).get("person_folder")
    if written and now and written != now:  # a changed folder is rebuilt without a word
        log.warning("resumed on person_folder data %s, written with %s: %s is another folder, or "
                    "files were added to it, removed or changed since the checkpoint, so from "
                    "here the run trains and validates on other examples; best/ compares "
                    "validation IoU measured on another validation set", now, written,
                    config.data.folder)
    stored, current = meta.get("config", {}), json.loads(config.to_json())
    # model: the fields that leave the parameters' shapes (those are refused in _check_resumable).
    changed = _changed_fields(stored, current, ("data", "loss", "optim", "eval", "model"))
    changed += _changed_fields(stored.get("train", {}), current["train"], ("ema_decay",), "train.")
    if changed:
        log.warning("resumed with %s: from here the run trains (and validates) otherwise than the "
                    "one that wrote the checkpoint%s", ", ".join(changed),
                    "; best/ compares validation IoU measured in other ways (another validation "
                    "set, threshold or prediction)"
                    if any(config_check.changes_validation(c.split("=", 1)[0]) for c in changed)
                    else "")


# Fields that change neither the batches, the model's training nor its validation IoU: where data
# is read from, and how fast. data.train has its own warning above.
_RESUME_NEUTRAL = {"data.data_dir", "data.folder", "data.num_workers", "data.prefetch",
                   "data.train", "eval.batch_size"}


def _changed_fields(stored: dict, current: dict, sections, prefix: str = "") -> list[str]:
    """'field=new (written with old)' for each field of SECTIONS that differs between the stored
    and the current config, both as JSON (fields absent from the stored one are new defaults,
    not changes)."""
    changed = []
    for key in sections:
        if key not in stored or key not in current:
            continue
        name = prefix + key
        old, new = stored[key], current[key]
        if isinstance(old, dict) and isinstance(new, dict):
            changed += _changed_fields(old, new, sorted(new), name + ".")
        elif name not in _RESUME_NEUTRAL and old != new:
            changed.append(f"{name}={new!r} (written with {old!r})")
    return changed


def _starting_model(config, workdir):
    """(model, step) of train.init_checkpoint where the run starts from it (the workdir holds no
    checkpoint yet), else None.

    Opening and loading checkpoints meets the other processes in orbax's barriers: every process
    first checks that all of them agree on the config, then on the workdir's latest checkpoint
    (as `_must_agree` does later), or a process that alone loaded it met the others in barriers
    of other names (an AssertionError, or a hang) instead of the line naming what differs.
    Each host may hold train.init_checkpoint at a path of its own (`_shared_config`): all check
    that each finds a checkpoint there before loading it, and that they loaded the same weights
    and step after."""
    _refuse_disagreement({"the config": _shared_config(config)})
    if not config.train.init_checkpoint:
        return None
    latest = _latest_step(workdir)
    _refuse_disagreement({"the workdir's latest checkpoint": str(latest)})
    if latest is not None:
        return None
    _refuse_disagreement({"whether train.init_checkpoint holds a checkpoint": str(
        _latest_step(config.train.init_checkpoint) is not None)})
    model, step = _init_model(config)
    _refuse_disagreement({"the model of train.init_checkpoint": json.dumps(
        [inference.weights_digest(model), step])})
    return model, step


def _latest_step(workdir):
    """The latest checkpoint step in WORKDIR, None where it holds none (or does not exist)."""
    ckpts = checkpointing.Checkpoints(workdir, read_only=True)  # creates no folder
    try:
        return ckpts.latest_step()
    finally:
        ckpts.close()


def _init_model(config):
    """(model, step) of train.init_checkpoint, refused in one line when it is missing or holds
    a model of another shape (its arrays would not fit this one's)."""
    path = config.train.init_checkpoint
    try:
        model, init_config, step = inference.load_from_workdir(path)
    except FileNotFoundError as e:
        raise config_check.ConfigError(f"train.init_checkpoint={path}: {e} (name a training "
                                       "workdir)") from None
    changed = _shape_changes(init_config, config)
    if changed:
        raise config_check.ConfigError(
            f"train.init_checkpoint={path} holds a model with {', '.join(changed)}: it can only "
            f"start a model of the same shape")
    return model, step


# Config fields that may differ between hosts: where each reads its data, and how fast.
_PER_HOST = ("data_dir", "folder", "num_workers", "prefetch")


def _must_agree(config, sources, evaluators, ckpts) -> dict[str, str]:
    """What every process of a run must hold alike, as text (distributed.disagreement): the
    config but for _PER_HOST fields, the sizes of the training and validation data (and each
    validation set's canvas), and the workdir's latest checkpoint."""
    return {"the config": _shared_config(config),
            "the training data": json.dumps([len(s) for s in sources]),
            "the validation data": json.dumps({n: [len(e.source), list(e.canvas)]
                                               for n, e in evaluators.items()}),
            "the workdir's latest checkpoint": str(ckpts.latest_step())}


def _shared_config(config) -> str:
    """The config but for its _PER_HOST fields, and with whether train.init_checkpoint is set in
    place of its path, as text."""
    shared = json.loads(config.to_json())
    for field in _PER_HOST:
        shared["data"].pop(field, None)
    # Each host may hold its own copy at a path of its own: `_starting_model` compares the
    # model loaded from it instead.
    shared["train"]["init_checkpoint"] = bool(config.train.init_checkpoint)
    return json.dumps(shared, sort_keys=True)


def _refuse_disagreement(items: dict[str, str]) -> None:
    """ConfigError naming what of ITEMS differs between the processes (a cross-process
    operation: every process calls it at the same point)."""
    differ = distributed.disagreement(items)
    if differ:
        raise config_check.ConfigError(
            f"the processes of this run differ in {differ}: start every process with the "
            "same config, on the same data, in one workdir that all of them share")


def validate(evaluators, state, graphdef, eval_config) -> dict:
    """Validation metrics per dataset, and `val_iou`: their mean original-resolution IoU.

    Predictions are made as `eval_config` says (flip TTA, refinement), so that `best/` is chosen
    by the figure that will be reported.
    """
    model = train_step.inference_model(nnx.merge(graphdef, state))
    out = {}
    for name, evaluator in evaluators.items():
        result = evaluator.evaluate_model(model, flip_tta=eval_config.flip_tta,
                                          refined=eval_config.refine)
        out[f"{name}/iou"] = result["iou"]
        out[f"{name}/model_res_iou"] = result["model_resolution"]["iou"]
    out["val_iou"] = float(np.mean([out[f"{n}/iou"] for n in evaluators]))
    return out


@nnx.jit
def _probabilities(model, images):
    return inference.person_probabilities(model, images)


def prediction_overlays(state, graphdef, source, count: int, image_size: int,
                        threshold: float) -> np.ndarray:
    """(count, S, S*2, 3) uint8: each validation photo beside its tinted prediction, cut at
    `threshold` as validation cuts it.

    At model resolution and without eval.flip_tta / eval.refine: a quick look at what the model
    learnt; refinement acts only at the photo's own size, which these small images do not have.
    """
    from jaxseg.predict import Renderer

    # A host copy of the replicated state: works the same on every process and device count.
    model = train_step.inference_model(nnx.merge(graphdef, jax.device_get(state)))
    examples = [source[i] for i in range(min(count, len(source)))]
    images = np.stack([preprocess.model_input(ex, image_size)[0] for ex in examples])
    probs = np.asarray(_probabilities(model, images))
    overlay = Renderer(mode="overlay", threshold=threshold)
    return np.stack([np.concatenate([im, overlay.render(im, p)], axis=1)
                     for im, p in zip(images, probs)])


def train_and_evaluate(config, workdir: str) -> dict:
    """Trains to config.train.num_steps (or a stop by SIGTERM or Ctrl-C), validating and
    checkpointing on the way.

    Returns the last logged training metrics and validation results.
    """
    workdir = workdir_path(workdir)
    if workdir.exists() and not workdir.is_dir():
        raise config_check.ConfigError(f"--workdir {workdir} is a file: name a folder")
    try:
        mesh = sharding.make_mesh(config.num_devices or None)
    except ValueError as e:  # more devices than there are, or no equal share per process
        raise config_check.ConfigError(f"num_devices={config.num_devices}: {e}") from None
    config_check.validate(config, mesh.devices.size)
    # Before anything is made in the workdir: a missing init_checkpoint left it holding empty
    # checkpoint folders and a lock.
    init = _starting_model(config, workdir)
    # One line, not orbax's traceback at the first save (workdir/checkpoints a file, say).
    for folder in (workdir, workdir / checkpointing.LATEST_DIR, workdir / checkpointing.BEST_DIR):
        problem = local_folder_problem(folder)
        if problem:
            raise config_check.ConfigError(f"--workdir {workdir}: {folder}: {problem}")
    sources, weights = train_sources(config)  # a run without data writes no files in the workdir
    folder_data = _folder_data(config)  # the folder as just prepared, recorded with each save
    evaluators = validation_evaluators(config, mesh)  # an empty validation slice, too
    main = distributed.is_main_process()
    # Whatever stops the run (an error in setup or in the loop, SIGTERM, the end), what it opened
    # is closed: an open checkpoint manager or log writer buries the error in shutdown noise.
    with contextlib.ExitStack() as cleanup:
        if main:  # the processes of one run share the workdir
            try:
                cleanup.enter_context(training_lock(workdir))
            except WorkdirBusy as e:
                raise config_check.ConfigError(f"--workdir {workdir}: {e}") from None
        ckpts = checkpointing.Checkpoints(workdir, keep=config.train.keep_checkpoints)
        cleanup.callback(ckpts.close)
        # Before the first step: processes that differ here train replicas that silently drift
        # apart (another seed, other examples, one resuming and one starting afresh), or hang in
        # a collective that only some of them reach (another batch, step count or validation).
        _refuse_disagreement(_must_agree(config, sources, evaluators, ckpts))
        graphdef, state = train_step.create_train_state(config)
        state, start, stopped = _initial_state(config, ckpts, graphdef, state, mesh, init)
        if start >= config.train.num_steps:
            if main:
                log.warning("the workdir is at step %d, not before train.num_steps=%d: nothing to "
                            "train (raise --config.train.num_steps to go on; the learning-rate "
                            "schedule then spans the new total)", start, config.train.num_steps)
            return {"step": start}
        # A stop at an evaluation step saved it unvalidated (saving first): validated here, or
        # its validation record and its bid for best/ were never made.
        revalidate = stopped and start % config.train.eval_every == 0
        writer = metric_writer.MetricWriter(workdir, enabled=main, resume_step=start,
                                            revalidate=revalidate)
        cleanup.callback(writer.close)
        step_fn = train_step.make_train_step(graphdef, config, mesh)
        num_steps = config.train.num_steps
        if main:
            write_text_whole(workdir / "config.json", config.to_json(indent=2))

        if main and (note := mixture.rounding_note(config.data.train, config.train.batch_size)):
            log.warning(note)
        batches = input_pipeline.TrainBatches(
            sources, weights, global_batch=config.train.batch_size, image_size=config.data.image_size,
            aug=config.data.aug, seed=config.seed, start_step=start,
            slots=sharding.local_batch_slice(config.train.batch_size, mesh),
            num_workers=config.data.num_workers, prefetch=config.data.prefetch)
        cleanup.callback(batches.close)
        train_iter = input_pipeline.prefetch_to_mesh(batches, mesh, size=config.data.prefetch)
        preemption = _Preemption(mesh)
        cleanup.callback(preemption.restore)

        progress = None
        if main:
            from tqdm import tqdm

            progress = tqdm(total=num_steps, initial=start, desc="train", unit="step", dynamic_ncols=True)
            cleanup.callback(progress.close)

        def validate_step(step, state) -> dict:
            """Validates STATE, logs it and offers it to best/: the validation results."""
            with host_memory.large_blocks_mapped():
                val = validate(evaluators, state, graphdef, config.eval)
                if main and config.train.num_logged_images:
                    first = next(iter(evaluators.values()))
                    writer.images(step, "validation/predictions", prediction_overlays(
                        state, graphdef, first.source, config.train.num_logged_images,
                        config.data.image_size, config.eval.threshold))
            writer.scalars(step, val, kind="validation")
            ckpts.save_best(step, state, _meta(config, step, {"validation": val, **folder_data}),
                            val["val_iou"])
            return val

        last = {"step": start}
        if revalidate:
            last.update(validate_step(start, state))
        pending = None  # the previous step's metrics, read one step late to keep the device busy
        window_start, window_steps = time.perf_counter(), 0
        step = start
        while step < num_steps:
            batch = next(train_iter)
            state, metrics = step_fn(state, batch)
            if pending is not None:
                _check_finite(pending, step - 1, ckpts)
            pending = metrics
            step += 1
            window_steps += 1
            if progress is not None:
                progress.update(1)
            stop = preemption.should_stop() and step < num_steps
            # A preempted run logs its last step too, so the summary's loss is that step's.
            if step % config.train.log_every == 0 or step == num_steps or stop:
                values = {k: float(v) for k, v in jax.device_get(metrics).items() if k != "finite"}
                elapsed = time.perf_counter() - window_start
                values["images_per_second"] = window_steps * config.train.batch_size / elapsed
                writer.scalars(step, values)
                if progress is not None:
                    progress.set_postfix(loss=f"{values['loss']:.4f}")
                last.update(values, step=step)
                window_start, window_steps = time.perf_counter(), 0
            # A stop saves first and at once (a preempted machine may be killed within
            # seconds); the resumed run validates the step it stopped at before going on.
            if (step % config.train.eval_every == 0 or step == num_steps) and not stop:
                _check_finite(pending, step - 1, ckpts)
                last.update(validate_step(step, state))
                window_start, window_steps = time.perf_counter(), 0
            if step % config.train.checkpoint_every == 0 or step == num_steps or stop:
                _check_finite(pending, step - 1, ckpts)
                extra = {**folder_data, "preempted": True} if stop else folder_data
                ckpts.save(step, state, _meta(config, step, extra), force=True)
            if stop:
                # Committed before the message, and before the signal handler goes: a second
                # signal during the asynchronous save must not kill it half-written.
                ckpts.wait()
                log.warning("%s: saved step %d to %s; rerun the same command to resume",
                            preemption.reason or "a stop signal to another process", step,
                            ckpts.latest.directory)
                last["preempted"] = True
                break
        ckpts.wait()
        last["step"] = step
        last["best_step"] = ckpts.best_step()
        return last


def _check_finite(metrics, step: int, ckpts) -> None:
    if not bool(jax.device_get(metrics["finite"])):
        last = ckpts.latest_step()
        kept = ("no checkpoint was written before it" if last is None
                else f"the last good checkpoint (step {last}) is intact")
        raise FloatingPointError(
            f"non-finite loss or gradient at step {step + 1}; the state was not updated and "
            f"{kept}. Lower optim.learning_rate, keep optim.grad_clip_norm on, or check the data.")


def main(argv):
    """Entry point: flags -> distributed init -> train_and_evaluate."""
    refuse_positional(argv)
    from absl import flags
    from absl import logging as absl_logging

    absl_logging.set_verbosity(absl_logging.WARNING)  # orbax logs every save step at INFO

    FLAGS = flags.FLAGS
    host_memory.reuse_freed_memory()  # before distributed.initialize or JAX start threads
    distributed.initialize(FLAGS.coordinator_address, FLAGS.num_processes, FLAGS.process_id)
    # absl's WARNING verbosity is the root logger's level; jaxseg's own INFO lines (resumed
    # from, initialised from) still go through on process 0.
    logging.getLogger("jaxseg").setLevel(
        logging.INFO if distributed.is_main_process() else logging.WARNING)
    if not FLAGS.workdir:  # pathlib would make "" the current folder
        distributed.exit_with_error("error: --workdir: give the run's folder")
    config = FLAGS.config
    try:
        # A --config file that failed to load stands in as an object raising on use (None where
        # its get_config() returned None).
        config.to_dict()
    except (OSError, AttributeError) as e:
        if not (problem := config_check.config_file_problem(e, _config_file(sys.argv))):
            raise  # not a file that failed to load: a bug, whose traceback says where
        distributed.exit_with_error(f"error: --config: {problem}")
    try:
        result = train_and_evaluate(config, FLAGS.workdir)
    except KeyboardInterrupt:  # a second Ctrl-C, or one before the first step
        raise KeyboardInterrupt("stopped at once; rerun the same command to go on from the "
                                "latest checkpoint, if one was saved") from None
    except (config_check.ConfigError, FloatingPointError, datasets.BadDataError,
            DataUnavailable, checkpointing.UnreadableCheckpoint) as e:
        distributed.exit_with_error(f"error: {e}")
    except checkpointing.SaveError as e:
        if not e.from_storage:  # perhaps a bug, whose trace helps
            traceback.print_exception(e.__cause__)
        message = (f"error: {e}; the checkpoints saved before it are intact: rerun the same "
                   "command to resume from the latest once the cause is fixed")
        if jax.process_count() > 1:
            distributed.exit_with_error(message)  # its failure hook exits at once
        # Orbax's threads of the failed save never finish: a normal exit would wait for them.
        print(message, file=sys.stderr, flush=True)
        os._exit(1)
    except OSError as e:
        # The workdir's small files (its lock, config.json, metrics) on a full disk, as a rerun
        # after a save that failed there meets first.
        if e.errno not in (errno.ENOSPC, errno.EDQUOT):
            raise  # not storage running out: a bug perhaps, whose traceback says where
        distributed.exit_with_error(
            f"error: {e.strerror} (writing {e.filename or 'in --workdir ' + FLAGS.workdir}); the "
            "checkpoints saved before it are intact: free space, then rerun the same command to "
            "resume from the latest")
    if distributed.is_main_process():
        print(json.dumps({k: v for k, v in result.items()}, indent=1, default=float))
        if not result.get("preempted"):
            print(finished_note(FLAGS.workdir, config, result["best_step"]), file=sys.stderr)
    return STOPPED_EXIT_STATUS if result.get("preempted") else 0


def finished_note(workdir: str, config, best_step: int) -> str:
    """Where a finished run keeps its model and logs, and the command that scores it on a test
    split: the summary above it is JSON alone, for scripts."""
    names = " or ".join(name for name, _ in mixture.parse_mixture(config.data.eval))
    dataset = ("--images DIR --masks DIR" if config.data.folder
               else f"--dataset D --split test (D: {names})")
    return (f"done: the best checkpoint by validation IoU is step {best_step} in "
            f"{workdir_path(workdir) / checkpointing.BEST_DIR}; score it with: python -m "
            f"jaxseg.evaluate --workdir {workdir} {dataset}; logs: {workdir}/metrics.jsonl and "
            f"TensorBoard's {workdir}/tensorboard")


_DEFAULT_CONFIG = "configs/default.py"


def _define_flags():
    from absl import flags
    from ml_collections import config_flags

    config_flags.DEFINE_config_file("config", _DEFAULT_CONFIG, "Training config file.")
    flags.DEFINE_string("workdir", None, "Where checkpoints and logs go.", required=True)
    from jaxseg import distributed

    distributed.define_flags()


def _parse_flags(argv):
    """absl's flag parsing, with an unknown --config.a.b field or section, or a --config file
    that cannot be loaded, as a one-line error."""
    from absl import app

    with _config_errors_as_one_line(argv):
        return app.parse_flags_with_usage(argv)


def _config_file(argv) -> str:
    """The config file that ARGV's --config names (ml_collections reads the first), or the
    default."""
    for i, arg in enumerate(argv):
        if arg in ("--config", "-config") and i + 1 < len(argv):
            return argv[i + 1]
        if arg.startswith(("--config=", "-config=")):
            return arg.split("=", 1)[1]
    return _DEFAULT_CONFIG


@contextlib.contextmanager
def _config_errors_as_one_line(argv):
    # ml_collections raises AttributeError or KeyError for an unknown --config.a.b, AttributeError
    # or SyntaxError for a config file without get_config() or not Python, and KeyError for an
    # override of a config file whose get_config() returned None, which absl shows as a
    # traceback: while parsing, or already while defining the flag when --config is left at its
    # default.
    try:
        yield
    except (AttributeError, KeyError, SyntaxError) as e:
        if problem := config_check.config_file_problem(e, _config_file(argv)):
            raise SystemExit(f"error: --config: {problem}") from None
        unknown = config_check.unknown_field(e, argv)
        if not unknown:  # not an override's unknown name: a bug
            raise
        name, suggestion = unknown
        hint = f"; did you mean {suggestion!r}?" if suggestion else ""
        raise SystemExit(f"FATAL Flags parsing error: the config has no field {name!r}{hint}") from None


if __name__ == "__main__":
    with _config_errors_as_one_line(sys.argv):
        _define_flags()
    run_absl(main, flags_parser=_parse_flags)
