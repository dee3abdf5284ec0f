"""Turns launch/gpu_array_train.py results (model_state.npz + summary.json) into the repository's
pretrained model (orbax weights + model card), with float32 compute for CPU inference.

`python launch/save_pretrained_from_npz.py RUN_DIR [RUN_DIR ...]`: several runs of one
architecture make an ensemble whose members are the runs, in this order (jaxseg.inference).
"""
import argparse
import json
import pathlib
import sys
import zipfile
import zlib

# `python launch/save_pretrained_from_npz.py` puts launch/, not the repository root, on sys.path:
# without this, `jaxseg` would only import with PYTHONPATH=. set.
sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[1]))

import jax
import numpy as np
from flax import nnx

from jaxseg import config_check, inference
from jaxseg.models import create_model


def load_run(run: pathlib.Path, output_shift: tuple[float, float] | None = None):
    """(model, config, card) of one run: its selected weights in a fresh model of its config,
    with `output_shift` (model.output_shift) in place of the run's own where given. Raises
    ValueError (a one-line message) where its two files are unreadable or do not match."""
    try:
        summary = json.loads((run / "summary.json").read_text())
        config = inference.config_from_json(summary["config"])
    except (ValueError, KeyError, TypeError, AttributeError) as e:
        raise ValueError(
            f"{run / 'summary.json'}: not a gpu_array_train.py summary ({e!r})") from None
    config.model.compute_dtype = "float32"  # trained with bf16 compute; fp32 params either way
    if output_shift is not None:
        # nan or inf would be saved, and stop every later call of the model.
        if problem := config_check.output_shift_problem(output_shift, config.data.image_size):
            raise ValueError(f"--output_shift: {problem}")
        config.model.output_shift = output_shift
    model = create_model(config.model)
    try:
        flat = dict(np.load(run / "model_state.npz"))
    except (ValueError, OSError, EOFError, zipfile.BadZipFile, zlib.error) as e:
        raise ValueError(
            f"{run / 'model_state.npz'}: unreadable, a copy cut short? ({e})") from None
    paths, treedef = jax.tree_util.tree_flatten_with_path(nnx.state(model))
    leaves = []
    for p, ref in paths:
        # nnx.update takes arrays of any shape: weights of another run's width would be saved
        # under this run's config, and the model card would describe another model.
        value = flat.get(jax.tree_util.keystr(p))
        if value is None or value.shape != ref.shape:
            got = "missing" if value is None else f"shape {value.shape}"
            raise ValueError(
                f"{run / 'model_state.npz'} does not hold the weights of the model its "
                f"summary.json describes: {jax.tree_util.keystr(p)} is {got}, expected "
                f"shape {ref.shape} (files of two different runs?)")
        leaves.append(value)
    nnx.update(model, jax.tree_util.tree_unflatten(treedef, leaves))
    card = {k: v for k, v in summary.items() if k != "config"}
    card["steps"] = summary.get("selected", {}).get("step", summary["num_steps"])
    return model, config, card


def _shift(text: str) -> tuple[float, float]:
    """argparse type: 'DY,DX' model pixels."""
    try:
        dy, dx = (float(v) for v in text.split(","))
    except ValueError:
        raise argparse.ArgumentTypeError(f"must be DY,DX (e.g. 0.5,0); got {text!r}") from None
    return dy, dx


def main():
    """Loads each run's flat state and saves the model (or the ensemble) as pretrained."""
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog=f"The model (or ensemble) replaces the one in {inference.PRETRAINED_DIR}.")
    parser.add_argument("runs", nargs="+", metavar="RUN_DIR", type=pathlib.Path,
                        help="an --out folder of launch/gpu_array_train.py (model_state.npz and "
                             "summary.json); several make an ensemble, members in this order")
    parser.add_argument("--output_shift", type=_shift, default=None, metavar="DY,DX",
                        help="model.output_shift of the saved model (default: the runs' own). "
                             "The shipped members, trained on array files whose masks were "
                             "resized by each block's top-left pixel, take 0.5,0 (model card)")
    args = parser.parse_args()
    for run in args.runs:
        missing = [f for f in ("model_state.npz", "summary.json") if not (run / f).is_file()]
        if missing:
            parser.error(f"{run} lacks {' and '.join(missing)}: not a gpu_array_train.py --out folder")
    try:
        runs = [load_run(run, args.output_shift) for run in args.runs]
    except ValueError as e:
        parser.error(str(e))
    models, configs, cards = zip(*runs)
    # Every member runs at the first one's input size.
    shapes = [(c.data.image_size, c.model.to_dict()) for c in configs]
    if len({json.dumps(x, sort_keys=True) for x in shapes}) > 1:
        parser.error("ensemble members must share one image size and model config: "
                     + "; ".join(f"{a}: {x}" for a, x in zip(args.runs, shapes)))
    card = cards[0] if len(cards) == 1 else {
        "steps": [c["steps"] for c in cards],
        "members": [dict(c, config=json.loads(cfg.to_json())) for c, cfg in zip(cards, configs)]}
    inference.save_pretrained(list(models), configs[0], card)
    print(f"saved to {inference.PRETRAINED_DIR}")


if __name__ == "__main__":
    main()
