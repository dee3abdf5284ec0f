"""Trains the U-Net on an accelerator from a packed array file (launch/make_array_file.py).

For machines with JAX but no TFDS/TensorFlow/OpenCV: the whole training set lives on the device,
batches are drawn in the config's mixture proportions and augmented there (jaxseg.device_augment),
and the step is jaxseg's own (jaxseg.train_step, with its weight EMA when --ema_decay > 0). The
number of steps is fitted to a wall-clock budget by timing a short calibration run first, so the
cosine schedule completes. Validation IoU (model resolution, per dataset) is measured at a few
points; the best of the trained and EMA weights by mean validation IoU is written as one .npz
(flat key -> array) plus a JSON with the config and figures, each time it improves, so a run cut
short by --deadline_s or by the machine still leaves its best model behind. Both files are
replaced atomically (written to a temporary file in --out, then renamed), and an --out that
already holds a model_state.npz is refused: a new run must not replace an earlier run's best.

`python launch/gpu_array_train.py --data FILE.npz --out NEW_RUN_DIR [options]` from the repository
root (which this script puts on sys.path itself).
"""
import argparse
import difflib
import io
import json
import pathlib
import sys
import time
import zipfile

# `python launch/gpu_array_train.py` puts launch/, not the repository root, on sys.path: without
# this, `configs` and `jaxseg` would only import with PYTHONPATH=. set.
sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[1]))

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from PIL import Image

from configs import default
from jaxseg import config_check, device_augment, losses, mixture, sharding, train_step
from jaxseg.arg_types import at_least, number, positive_number
from jaxseg.workdir import complete_or_absent, output_file_problem, write_text_whole


def decode(buf, offsets):
    """Decodes concatenated image bytes into one uint8 array."""
    return np.stack([np.asarray(Image.open(io.BytesIO(buf[a:b].tobytes())))
                     for a, b in zip(offsets[:-1], offsets[1:])])


def config_for(size, num_steps, args):
    """The default config at this size, width, batch and EMA, bf16 compute."""
    c = default.get_config()
    c.data.image_size = size
    c.model.base_features = args.base_features
    c.model.residual = args.residual
    c.model.compute_dtype = "bfloat16"
    c.train.batch_size = c.eval.batch_size = args.batch_size
    c.train.num_steps = num_steps
    c.train.ema_decay = args.ema_decay
    c.loss.boundary_weight = args.boundary_weight
    c.optim.learning_rate = args.learning_rate
    c.optim.warmup_steps = min(300, num_steps // 10)
    for assignment in args.set:
        if "=" not in assignment:
            raise ValueError(f"--set {assignment}: expected FIELD=VALUE, e.g. "
                             f"--set {assignment or 'data.aug.copy_paste'}=0.5")
        field, value = assignment.split("=", 1)
        c.update_from_flattened_dict({field: parse_like(c, field, value)})
    return c


# Fields this script sets from the data and its own flags: overriding them would make the
# schedule or the batch shape disagree with the training loop.
OWN_FIELDS = ("data.image_size", "train.batch_size", "train.num_steps", "eval.batch_size")
# The fields (and sections, ending in '.') that this script reads; --set refuses the others
# (data.eval, train.eval_every, ...), which it would silently ignore.
READ_FIELDS = ("model.", "loss.", "optim.", "data.aug.", "data.train", "seed", "eval.threshold",
               "train.ema_decay")


def parse_like(config, field: str, text: str):
    """`text` as the type of the config's current value of the dotted `field`.

    Raises KeyError for an unknown field (its message names it, the known fields of its section and
    the closest one) and ValueError for a section, a sequence, a field this script sets itself, or
    text that does not convert.
    """
    if field in OWN_FIELDS:
        raise ValueError(f"--set {field}: set by this script (use its flags or the array file)")
    current, path = config, []
    for part in field.split("."):
        if not hasattr(current, "keys"):  # e.g. data.aug.copy_paste.x: a value, not a section
            raise UnknownFieldError(f"--set {field}: unknown field: {'.'.join(path)} is a value, "
                                    f"not a section")
        if part not in current:
            known = sorted(current.keys())
            close = difflib.get_close_matches(part, known, n=1)
            where = f"in {'.'.join(path)}" if path else "at the top level"
            raise UnknownFieldError(
                f"--set {field}: unknown field '{part}' {where}"
                + (f" (did you mean {'.'.join(path + close)}?)" if close else "")
                + f"; known: {', '.join(known)}")
        current = current[part]
        path.append(part)
    if isinstance(current, bool):
        if text.lower() not in ("true", "false"):
            raise ValueError(f"--set {field}={text}: expected true or false")
        _check_read(field)
        return text.lower() == "true"
    if not isinstance(current, (int, float, str)):
        raise ValueError(f"--set {field}: only single numbers, strings and booleans can be set")
    _check_read(field)
    return type(current)(text)


def _check_read(field: str) -> None:
    if not any(field == f or (f.endswith(".") and field.startswith(f)) for f in READ_FIELDS):
        raise ValueError(
            f"--set {field}: not read by this script, which trains on the array file and "
            f"validates on its validation rows at model resolution; it reads "
            + ", ".join(f + "*" if f.endswith(".") else f for f in READ_FIELDS))


class UnknownFieldError(KeyError):
    """A --set field the config does not have; str() is the message itself, without quotes."""

    def __str__(self):
        return str(self.args[0])


def main():
    """Calibrates, trains for the budget with validation checkpoints, saves the best weights."""
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("--data", required=True, help="array file from launch/make_array_file.py")
    p.add_argument("--out", required=True,
                   help="new folder for model_state.npz and summary.json (one that already holds a "
                        "model_state.npz is refused)")
    # Typed: a negative --num_steps trained nothing and saved nothing, yet exited 0.
    p.add_argument("--budget_s", type=positive_number, default=420,
                   help="training seconds to plan for")
    p.add_argument("--num_steps", type=at_least(0), default=0,
                   help="train this many steps (0: fitted to --budget_s by a calibration run)")
    p.add_argument("--deadline_s", type=number, default=0,
                   help="stop training this many seconds after start, planned or not (0 = never)")
    p.add_argument("--batch_size", type=int, default=64)
    p.add_argument("--base_features", type=int, default=16)
    p.add_argument("--residual", action="store_true")
    p.add_argument("--learning_rate", type=float, default=3e-3)
    p.add_argument("--ema_decay", type=float, default=0.999)
    p.add_argument("--boundary_weight", type=float, default=0.0,
                   help="extra cross-entropy weight near mask edges (config loss.boundary_weight)")
    p.add_argument("--num_validations", type=int, default=4)
    p.add_argument("--set", action="append", default=[], metavar="FIELD=VALUE",
                   help="override a config field this script reads (model.*, loss.*, optim.*, "
                        "data.aug.*, data.train, seed, eval.threshold, train.ema_decay), e.g. "
                        "--set data.aug.copy_paste=0.5 (repeatable)")
    args = p.parse_args()
    try:  # a typo or an impossible value must fail here, not after the data is decoded
        config_check.validate(config_for(256, 1000, args), jax.device_count())
    except config_check.ConfigError as e:
        p.error(str(e))
    except (KeyError, ValueError) as e:
        p.error(str(e) if str(e).startswith("--set") else f"--set: {e}")
    if args.num_validations < 1:
        p.error("--num_validations must be at least 1: validation picks the weights that are saved")
    out = pathlib.Path(args.out)
    if out.exists() and not out.is_dir():
        p.error(f"--out {out} is a file, not a folder")
    # Created after the data is decoded and the step compiled: minutes of a rented machine.
    if problem := output_file_problem(out / "model_state.npz"):
        p.error(f"--out {out}: {problem}")
    if (out / "model_state.npz").exists():
        # The best-so-far tracking starts afresh in every run: its first validation would replace
        # the earlier run's (possibly better) weights.
        p.error(f"--out {out} already holds a model_state.npz from an earlier run: use a new --out "
                f"(or move that run away first)")
    t0 = time.time()
    not_an_array_file = (f"--data {args.data}: not an array file of launch/make_array_file.py "
                         "(or a copy of one cut short)")
    try:
        z = np.load(args.data)
    except OSError as e:
        p.error(f"--data {args.data}: cannot read it ({e.strerror or e})")
    except (ValueError, zipfile.BadZipFile):  # another kind of file, or a truncated zip
        p.error(not_an_array_file)
    if not isinstance(z, np.lib.npyio.NpzFile):  # a single .npy array
        p.error(not_an_array_file)
    if str(z.get("mask_resize", "")) != "centre":
        # A model trained on them learns to predict half a model pixel low (model.output_shift).
        p.error(f"--data {args.data}: its masks were resized by each block's top-left pixel (an "
                "array file made before they were resized at pixel centres): make it again with "
                "launch/make_array_file.py")
    images = decode(z["image_bytes"], z["image_offsets"])
    masks = (decode(z["mask_bytes"], z["mask_offsets"]) > 127).astype(np.uint8)[..., None]
    size, split, source = int(z["size"]), z["split"], z["source"]
    names = [str(n) for n in z["source_names"]]
    print(f"decoded {len(images)} examples at {size}px in {time.time() - t0:.1f}s; "
          f"device {jax.devices()[0].device_kind}", flush=True)
    mesh = sharding.make_mesh()
    # Fields that do not depend on the number of steps: the mixture, threshold, seed, augmentation.
    run_config = config_for(size, 1000, args)
    try:  # the file's own size, checked above at 256 (the model's depth may not divide it)
        config_check.validate(run_config, jax.device_count())
    except config_check.ConfigError as e:
        p.error(f"--data {args.data} at {size}px: {e}")
    # Trained on the datasets data.train names, in its proportions (in the array file's order);
    # validated on every dataset the file holds.
    weights = dict(mixture.parse_mixture(run_config.data.train))
    missing = sorted(set(weights) - set(names))
    if missing:
        p.error(f"data.train names {missing}, which {args.data} does not hold (it holds {names})")
    trained = [n for n in names if n in weights]
    train_rows = [(split == 0) & (source == names.index(n)) for n in trained]
    empty = [n for n, rows in zip(trained, train_rows) if not rows.any()]
    if empty:
        p.error(f"{args.data} holds no training examples of {empty}, which data.train names")
    counts = [int(c) for c in mixture.mixture_counts([weights[n] for n in trained],
                                                     args.batch_size)]
    per_source = [jax.device_put(images[rows]) for rows in train_rows]
    per_source_masks = [jax.device_put(masks[rows]) for rows in train_rows]
    val_rows = {n: np.where((split == 1) & (source == d))[0] for d, n in enumerate(names)}
    val_rows = {n: rows for n, rows in val_rows.items() if len(rows)}
    if not val_rows:
        p.error(f"{args.data} holds no validation examples to select the weights with")

    def build(num_steps):
        config = config_for(size, num_steps, args)
        graphdef, state = train_step.create_train_state(config)
        step = train_step.make_train_step(graphdef, config, mesh)

        @jax.jit
        def full_step(state, key):
            keys = jax.random.split(key, len(trained) + 1)
            idx = [jax.random.randint(k, (c,), 0, x.shape[0])
                   for k, c, x in zip(keys, counts, per_source)]
            imgs = jnp.concatenate([x[i] for x, i in zip(per_source, idx)])
            msks = jnp.concatenate([m[i] for m, i in zip(per_source_masks, idx)])
            if config.data.aug.enabled:
                imgs, msks = device_augment.augment_batch(keys[-1], imgs, msks, config.data.aug)
            batch = {"image": imgs, "mask": msks,
                     "valid": jnp.ones(config.train.batch_size, jnp.float32)}
            return step(state, batch)

        return config, graphdef, sharding.replicate(state, mesh), full_step

    root = jax.random.key(run_config.seed)
    num_steps = args.num_steps
    if not num_steps:
        _, _, state, full_step = build(1000)
        state, m = full_step(state, root)
        jax.block_until_ready(m["loss"])
        n_cal = 30
        t = time.time()
        for i in range(n_cal):
            state, m = full_step(state, jax.random.fold_in(root, i))
        jax.block_until_ready(m["loss"])
        rate = n_cal / (time.time() - t)
        num_steps = max(100, int(rate * args.budget_s))
        print(f"calibration: {rate:.1f} steps/s = {rate * args.batch_size:.0f} images/s", flush=True)
    print(f"training {num_steps} steps (mixture {dict(zip(trained, counts))} per batch)", flush=True)

    @nnx.jit
    def counts_of(model, images, masks):
        probs = losses.person_probability(model(images, train=False))
        pred, target = probs >= run_config.eval.threshold, masks[..., 0] > 0
        return jnp.sum(pred & target, axis=(1, 2)), jnp.sum(pred | target, axis=(1, 2))

    def validation_iou(model, batch=run_config.eval.batch_size):
        out = {}
        for name, rows in val_rows.items():
            # Padded to whole batches (padding rows dropped below) so that one compilation serves all.
            padded = np.concatenate([rows, np.full(-len(rows) % batch, rows[0])])
            inter = union = 0
            for s in range(0, len(padded), batch):
                i, u = counts_of(model, images[padded[s:s + batch]], masks[padded[s:s + batch]])
                keep = min(batch, len(rows) - s)
                inter, union = inter + int(np.sum(i[:keep])), union + int(np.sum(u[:keep]))
            out[name] = inter / max(union, 1)
        out["mean"] = float(np.mean(list(out.values())))
        return out

    out.mkdir(parents=True, exist_ok=True)
    config, graphdef, state, full_step = build(num_steps)
    best = {"mean": -1.0}
    history = []

    def checkpoint(step, train_s):
        nonlocal best
        nodes = nnx.merge(graphdef, state)
        for kind in ("model", "ema"):
            if kind not in nodes:
                continue
            model = nodes[kind]
            val = validation_iou(model)
            history.append({"step": step, "weights": kind, **val})
            print(f"step {step} {kind}: validation IoU {json.dumps(val)}", flush=True)
            if val["mean"] > best["mean"]:
                best = {**val, "step": step, "weights": kind}
                flat = {jax.tree_util.keystr(k): np.asarray(v) for k, v in
                        jax.tree_util.tree_leaves_with_path(jax.device_get(nnx.state(model)))}
                # Compressed: a width-24 U-Net's weights are 16.7 MiB plain, over the 16 MiB a
                # rented machine's tool may return per file.
                with complete_or_absent(out / "model_state.npz") as partial, open(partial, "wb") as f:
                    np.savez_compressed(f, **flat)
            # Rewritten after each weights' validation, not once both are done: a run killed
            # while the EMA weights were validated kept the trained weights just saved with a
            # summary that selected the earlier ones (or no summary, which the saver refuses).
            summary = {"config": json.loads(config.to_json()), "num_steps": num_steps,
                       "steps_done": step, "train_seconds": train_s,
                       "images_per_second": (step - 1) * args.batch_size / max(train_s, 1e-9),
                       "selected": best, "validation_history": history,
                       "device": jax.devices()[0].device_kind,
                       "train_examples": {n: int(x.shape[0]) for n, x in zip(trained, per_source)},
                       "validation_examples": {n: int(len(r)) for n, r in val_rows.items()},
                       "batch_mixture": dict(zip(trained, counts))}
            write_text_whole(out / "summary.json", json.dumps(summary, indent=1))

    validate_at = {int(num_steps * (k + 1) / args.num_validations) for k in range(args.num_validations)}
    t = time.time()
    step, eval_s = 0, 0.0
    for step in range(1, num_steps + 1):
        state, m = full_step(state, jax.random.fold_in(root, 10_000_000 + step))
        if step == 1:  # the clock starts after compilation: figures are of training proper
            jax.block_until_ready(m["loss"])
            t = time.time()
        if step % 500 == 0 or step == num_steps:
            print(f"step {step}: loss {float(m['loss']):.4f} lr {float(m['learning_rate']):.2e} "
                  f"{time.time() - t0:.0f}s", flush=True)
        if step % 100 == 0:  # the host must not run far ahead of the device: the deadline is wall time
            jax.block_until_ready(m["loss"])
        late = args.deadline_s and time.time() - t0 > args.deadline_s
        if step in validate_at or late:
            jax.block_until_ready(m["loss"])
            t_eval = time.time()
            checkpoint(step, t_eval - t - eval_s)
            eval_s += time.time() - t_eval
        if late:
            print(f"deadline reached at step {step} of {num_steps}", flush=True)
            break
    print(json.dumps({"selected": best, "steps_done": step, "num_steps": num_steps,
                      "seconds": time.time() - t0}), flush=True)


if __name__ == "__main__":
    main()
