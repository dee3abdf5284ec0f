"""Optax optimiser and learning-rate schedule built from a config's `optim` section."""
from __future__ import annotations

import fractions

import jax
import jax.numpy as jnp
import optax


def make_schedule(optim_config, num_steps: int) -> optax.Schedule:
    """Linear warmup into cosine decay, a constant rate, or step decay at given fractions.

    The step count may be of any integer type: NNX's optimizer counts in uint32, in which optax's
    piecewise schedule (step - boundary) would wrap and show the undecayed rate again."""
    schedule = _schedule(optim_config, num_steps)
    return lambda count: schedule(jnp.asarray(count, jnp.int32))


def _schedule(optim_config, num_steps: int) -> optax.Schedule:
    c = optim_config
    warmup = min(c.warmup_steps, max(num_steps - 1, 0))
    if c.schedule == "cosine":
        return optax.warmup_cosine_decay_schedule(
            0.0, c.learning_rate, warmup, max(num_steps, warmup + 1), c.learning_rate * c.final_lr_fraction)
    if c.schedule == "constant":
        main = optax.constant_schedule(c.learning_rate)
    elif c.schedule == "step":
        boundaries = {}
        for f in c.step_fractions:  # fractions that land on one step decay there once each
            # The fraction as written: in floats 0.29 * 100 is 28.999999999999996.
            step = int(fractions.Fraction(repr(float(f))) * num_steps) - warmup
            boundaries[step] = boundaries.get(step, 1.0) * c.step_decay
        main = optax.piecewise_constant_schedule(c.learning_rate, boundaries)
    else:
        raise ValueError(f"unknown schedule {c.schedule!r}: use 'cosine', 'constant' or 'step'")
    if warmup == 0:
        return main
    return optax.join_schedules([optax.linear_schedule(0.0, c.learning_rate, warmup), main], [warmup])


def decay_mask(params):
    """Weight decay applies to convolution kernels only, not to norm scales or biases."""
    return jax.tree.map(lambda p: p.ndim > 1, params)


def make_optimizer(optim_config, num_steps: int) -> optax.GradientTransformation:
    """AdamW with the configured schedule, preceded by global-norm gradient clipping."""
    c = optim_config
    if c.optimizer != "adamw":
        raise ValueError(f"unknown optimizer {c.optimizer!r}: only 'adamw' is supported")
    chain = []
    if c.grad_clip_norm:
        chain.append(optax.clip_by_global_norm(c.grad_clip_norm))
    chain.append(optax.adamw(make_schedule(c, num_steps), b1=c.b1, b2=c.b2,
                             weight_decay=c.weight_decay, mask=decay_mask))
    return optax.chain(*chain)
