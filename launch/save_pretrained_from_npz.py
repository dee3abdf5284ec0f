"""Turns a launch/gpu_array_train.py result (model_state.npz + summary.json) into the repository's
pretrained model (orbax weights + model card), with float32 compute for CPU inference.

`python launch/save_pretrained_from_npz.py RUN_DIR`
"""
import json
import pathlib
import sys

import jax
import numpy as np
from flax import nnx

from jaxseg import inference
from jaxseg.models import create_model


def main():
    """Loads the flat state into a fresh model of the run's config and saves it as pretrained."""
    run = pathlib.Path(sys.argv[1])
    summary = json.loads((run / "summary.json").read_text())
    config = inference.config_from_json(summary["config"])
    config.model.compute_dtype = "float32"  # trained with bf16 compute; fp32 params either way
    model = create_model(config.model)
    flat = np.load(run / "model_state.npz")
    state = nnx.state(model)
    paths, treedef = jax.tree_util.tree_flatten_with_path(state)
    leaves = [flat[jax.tree_util.keystr(p)] for p, _ in paths]
    nnx.update(model, jax.tree_util.tree_unflatten(treedef, leaves))
    card = {k: v for k, v in summary.items() if k != "config"}
    card["steps"] = summary.get("selected", {}).get("step", summary["num_steps"])
    inference.save_pretrained(model, config, card)
    print(f"saved to {inference.PRETRAINED_DIR}")


if __name__ == "__main__":
    main()
