"""The train state and the jitted data-parallel train step (no data or I/O dependencies).

Kept apart from jaxseg.train so that the step runs wherever JAX does, e.g. on an accelerator
machine fed from an array file (launch/gpu_array_train.py) without TFDS or OpenCV.
"""
from __future__ import annotations

import jax
import jax.numpy as jnp
import optax
from flax import nnx

from jaxseg import device_augment, losses, optim, sharding
from jaxseg.models import create_model


def ema_decay(config) -> float:
    """The config's weight-EMA decay; 0 (no EMA) for configs saved before the field existed."""
    return config.train.get("ema_decay", 0.0)


def create_train_state(config):
    """(graphdef, state) of {'model', 'opt'[, 'ema']} for a config; state is the checkpointed pytree.

    With `train.ema_decay > 0`, 'ema' is a second model holding the exponential moving average of
    the trained model's parameters and BatchNorm statistics; it is the model that gets evaluated.
    """
    model = create_model(config.model, seed=config.seed)
    tx = optim.make_optimizer(config.optim, config.train.num_steps)
    nodes = {"model": model, "opt": nnx.Optimizer(model, tx, wrt=nnx.Param)}
    if ema_decay(config) > 0:
        ema = nnx.clone(model)
        # Own buffers: the step donates the state, and a buffer must not appear in it twice.
        nnx.update(ema, jax.tree.map(jnp.copy, nnx.state(ema)))
        nodes["ema"] = ema
    return nnx.split(nodes)


def inference_model(nodes):
    """The model to evaluate and ship from merged train-state nodes: the EMA model when kept."""
    return nodes.get("ema", nodes["model"])


def inference_node(config) -> str:
    """The train-state node that inference_model takes for CONFIG's runs: 'ema' when kept."""
    return "ema" if ema_decay(config) > 0 else "model"


def update_ema(ema, model, decay: float, step: jax.Array) -> None:
    """ema <- d * ema + (1 - d) * model with d = min(decay, (1 + step) / (10 + step)).

    The step-dependent cap lets the average forget the random initialisation early (d is 0.97 at
    step 300) instead of carrying it for ~1 / (1 - decay) steps; it reaches 0.999 only at step
    8,990, so shorter runs average with d = (1 + step) / (10 + step) throughout.
    """
    d = jnp.minimum(decay, (1.0 + step) / (10.0 + step))
    averaged = jax.tree.map(lambda e, m: d * e + (1 - d) * m,
                            nnx.state(ema, (nnx.Param, nnx.BatchStat)),
                            nnx.state(model, (nnx.Param, nnx.BatchStat)))
    nnx.update(ema, averaged)


def make_train_step(graphdef, config, mesh):
    """The jitted, state-donating train step: (state, batch) -> (state, metrics).

    A step whose loss or gradient is not finite leaves the state unchanged and reports
    `finite = False`; the loop stops on it.
    """
    schedule = optim.make_schedule(config.optim, config.train.num_steps)
    dropout_root = jax.random.key(config.seed + 1)
    paste_root = jax.random.key(config.seed + 2)
    # .get: configs saved before the field existed have no copy-paste.
    paste_prob = config.data.aug.get("copy_paste", 0.0) if config.data.aug.enabled else 0.0

    def step_fn(state, batch):
        # Leaves taken before merging: the merged modules update their variables in place.
        old_leaves = jax.tree.leaves(state)
        nodes = nnx.merge(graphdef, state)
        model, optimizer = nodes["model"], nodes["opt"]
        step = optimizer.step[...]
        dropout_key = jax.random.fold_in(dropout_root, step)
        if paste_prob > 0:
            images, masks = device_augment.copy_paste(jax.random.fold_in(paste_root, step),
                                                      batch["image"], batch["mask"], batch["valid"],
                                                      paste_prob)
            batch = {**batch, "image": images, "mask": masks}

        def loss_fn(model):
            logits = model(batch["image"], train=True, dropout_key=dropout_key)
            return losses.segmentation_loss(
                logits, batch["mask"], batch["valid"],
                ce_weight=config.loss.ce_weight, dice_weight=config.loss.dice_weight,
                boundary_weight=config.loss.boundary_weight,
                boundary_radius=config.loss.boundary_radius,
                lovasz_weight=config.loss.lovasz_weight)

        (loss, parts), grads = nnx.value_and_grad(loss_fn, has_aux=True)(model)
        grad_norm = optax.tree.norm(grads)
        optimizer.update(model, grads)
        if "ema" in nodes:
            update_ema(nodes["ema"], model, ema_decay(config), step)
        finite = jnp.isfinite(loss) & jnp.isfinite(grad_norm)
        new_leaves, treedef = jax.tree.flatten(nnx.state(nodes))
        new_state = jax.tree.unflatten(treedef, [jnp.where(finite, new, old)
                                                 for new, old in zip(new_leaves, old_leaves)])
        metrics = {"loss": loss, "grad_norm": grad_norm, "learning_rate": schedule(step),
                   "finite": finite, **parts}
        return new_state, metrics

    rep, data = sharding.replicated(mesh), sharding.data_sharded(mesh)
    return jax.jit(step_fn, in_shardings=(rep, data), out_shardings=(rep, rep), donate_argnums=0)
