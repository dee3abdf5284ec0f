"""Trains the U-Net on an accelerator from a packed array file (launch/make_array_file.py).

For machines with JAX but no TFDS/TensorFlow/OpenCV: the whole training set lives on the device,
batches are sampled and augmented there (jaxseg.device_augment), and the step is jaxseg's own
(jaxseg.train_step). The number of steps is fitted to a wall-clock budget by timing a short
calibration run first, so the cosine schedule always completes. Writes the final model state as
one .npz (flat key -> array) plus a JSON with the config and figures.
"""
import argparse
import io
import json
import pathlib
import time

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from PIL import Image

from configs import default
from jaxseg import device_augment, losses, sharding, train_step


def decode(buf, offsets):
    """Decodes concatenated image bytes into one uint8 array."""
    return np.stack([np.asarray(Image.open(io.BytesIO(buf[a:b].tobytes())))
                     for a, b in zip(offsets[:-1], offsets[1:])])


def config_for(size, num_steps, args):
    """The default config at this size and batch, bf16 compute."""
    c = default.get_config()
    c.data.image_size = size
    c.model.base_features = args.base_features
    c.model.compute_dtype = "bfloat16"
    c.train.batch_size = args.batch_size
    c.train.num_steps = num_steps
    c.optim.learning_rate = args.learning_rate
    c.optim.warmup_steps = min(300, num_steps // 10)
    return c


def main():
    """Calibrates, trains for the budget, reports validation IoU at model resolution, saves."""
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("--data", required=True)
    p.add_argument("--out", required=True)
    p.add_argument("--budget_s", type=float, default=420)
    p.add_argument("--batch_size", type=int, default=64)
    p.add_argument("--base_features", type=int, default=16)
    p.add_argument("--learning_rate", type=float, default=3e-3)
    args = p.parse_args()
    t0 = time.time()
    z = np.load(args.data)
    images = decode(z["image_bytes"], z["image_offsets"])
    masks = (decode(z["mask_bytes"], z["mask_offsets"]) > 127).astype(np.uint8)[..., None]
    train_idx, val_idx = np.where(z["split"] == 0)[0], np.where(z["split"] == 1)[0]
    size = int(z["size"])
    print(f"decoded {len(images)} examples at {size}px in {time.time() - t0:.1f}s; "
          f"device {jax.devices()[0].device_kind}", flush=True)
    mesh = sharding.make_mesh()
    train_images = jax.device_put(images[train_idx])
    train_masks = jax.device_put(masks[train_idx])

    def build(num_steps):
        config = config_for(size, num_steps, args)
        graphdef, state = train_step.create_train_state(config)
        step = train_step.make_train_step(graphdef, config, mesh)

        @jax.jit
        def full_step(state, key):
            k1, k2 = jax.random.split(key)
            idx = jax.random.randint(k1, (config.train.batch_size,), 0, train_images.shape[0])
            imgs, msks = device_augment.augment_batch(k2, train_images[idx], train_masks[idx],
                                                      config.data.aug)
            batch = {"image": imgs, "mask": msks,
                     "valid": jnp.ones(config.train.batch_size, jnp.float32)}
            return step(state, batch)

        return config, graphdef, sharding.replicate(state, mesh), full_step

    root = jax.random.key(0)
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
    print(f"calibration: {rate:.1f} steps/s = {rate * args.batch_size:.0f} images/s; "
          f"training {num_steps} steps", flush=True)

    config, graphdef, state, full_step = build(num_steps)
    t = time.time()
    for i in range(num_steps):
        state, m = full_step(state, jax.random.fold_in(root, 10_000_000 + i))
        if (i + 1) % 500 == 0 or i + 1 == num_steps:
            print(f"step {i + 1}: loss {float(m['loss']):.4f} lr {float(m['learning_rate']):.2e}",
                  flush=True)
    train_s = time.time() - t
    model = nnx.merge(graphdef, state)["model"]

    @jax.jit
    def counts(images, masks):
        probs = losses.person_probability(model(images, train=False))
        pred, target = probs >= 0.5, masks[..., 0] > 0
        return jnp.sum(pred & target), jnp.sum(pred | target)

    inter = union = 0
    for s in range(0, len(val_idx), 64):
        i, u = counts(images[val_idx[s:s + 64]], masks[val_idx[s:s + 64]])
        inter, union = inter + int(i), union + int(u)
    out = pathlib.Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    flat = {jax.tree_util.keystr(k): np.asarray(v)
            for k, v in jax.tree_util.tree_leaves_with_path(jax.device_get(nnx.state(model)))}
    np.savez(out / "model_state.npz", **flat)
    summary = {"config": json.loads(config.to_json()), "num_steps": num_steps,
               "train_seconds": train_s, "images_per_second": num_steps * args.batch_size / train_s,
               "val_iou_model_resolution": inter / max(union, 1), "device": jax.devices()[0].device_kind,
               "train_examples": int(len(train_idx)), "validation_examples": int(len(val_idx))}
    (out / "summary.json").write_text(json.dumps(summary, indent=1))
    print(json.dumps({k: v for k, v in summary.items() if k != "config"}), flush=True)


if __name__ == "__main__":
    main()
