"""Turns launch/gpu_array_train.py results (model_state.npz + summary.json) into the repository's
pretrained model (orbax weights + model card), with float32 compute for CPU inference.

`python launch/save_pretrained_from_npz.py RUN_DIR [RUN_DIR ...]`: several runs of one
architecture make an ensemble whose members are the runs, in this order (jaxseg.inference).
"""
import argparse
import json
import pathlib
import sys

# `python launch/save_pretrained_from_npz.py` puts launch/, not the repository root, on sys.path:
# without this, `jaxseg` would only import with PYTHONPATH=. set.
sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[1]))

import jax
import numpy as np
from flax import nnx

from jaxseg import inference
from jaxseg.models import create_model


def load_run(run: pathlib.Path):
    """(model, config, card) of one run: its selected weights in a fresh model of its config."""
    summary = json.loads((run / "summary.json").read_text())
    config = inference.config_from_json(summary["config"])
    config.model.compute_dtype = "float32"  # trained with bf16 compute; fp32 params either way
    model = create_model(config.model)
    flat = np.load(run / "model_state.npz")
    paths, treedef = jax.tree_util.tree_flatten_with_path(nnx.state(model))
    leaves = [flat[jax.tree_util.keystr(p)] for p, _ in paths]
    nnx.update(model, jax.tree_util.tree_unflatten(treedef, leaves))
    card = {k: v for k, v in summary.items() if k != "config"}
    card["steps"] = summary.get("selected", {}).get("step", summary["num_steps"])
    return model, config, card


def main():
    """Loads each run's flat state and saves the model (or the ensemble) as pretrained."""
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog=f"The model (or ensemble) replaces the one in {inference.PRETRAINED_DIR}.")
    parser.add_argument("runs", nargs="+", metavar="RUN_DIR", type=pathlib.Path,
                        help="an --out folder of launch/gpu_array_train.py (model_state.npz and "
                             "summary.json); several make an ensemble, members in this order")
    args = parser.parse_args()
    for run in args.runs:
        missing = [f for f in ("model_state.npz", "summary.json") if not (run / f).is_file()]
        if missing:
            parser.error(f"{run} lacks {' and '.join(missing)}: not a gpu_array_train.py --out folder")
    runs = [load_run(run) for run in args.runs]
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
