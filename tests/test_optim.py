"""The learning-rate schedules against their definitions, step by step."""
from decimal import Decimal

import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest

from jaxseg import optim


def optim_config(**overrides):
    c = ml_collections.ConfigDict(dict(
        learning_rate=1e-3, final_lr_fraction=0.01, schedule="step", warmup_steps=0,
        step_fractions=(0.5, 0.8), step_decay=0.1))
    c.update(overrides)
    return c


@pytest.mark.parametrize("fractions,num_steps,warmup", [
    ((0.5, 0.8), 100, 0), ((0.5, 0.8), 100, 10),
    ((0.5, 0.8), 10, 1),  # one warmup step: step 0 at rate 0, not the peak
    ((0.6, 0.62), 20, 0),  # both land on step 12: the rate is divided by 10 twice there
    ((0.6, 0.62), 20, 4),
    ((0.29, 0.57), 100, 0),  # in floats 0.29 * 100 and 0.57 * 100 fall just short of 29 and 57
    ((0.75,), 10, 0),  # 7.5: the decay starts at step 7, the floor, not at a rounded 8
    ((np.float64(0.29),), 100, 0)])  # a numpy number, whose repr is not a decimal
def test_step_schedule_decays_once_per_fraction(fractions, num_steps, warmup):
    c = optim_config(step_fractions=fractions, warmup_steps=warmup)
    schedule = optim.make_schedule(c, num_steps)
    for t in range(num_steps):
        if t < warmup:
            expected = c.learning_rate * t / warmup
        else:  # decayed from step floor(fraction * num_steps) on, the fraction as a decimal
            decays = sum(int(Decimal(str(f)) * num_steps) <= t for f in fractions)
            expected = c.learning_rate * c.step_decay ** decays
        np.testing.assert_allclose(float(schedule(t)), expected, rtol=1e-5, atol=1e-12, err_msg=t)
        # The optimizer's own step counter is uint32 (what the training logs show).
        np.testing.assert_allclose(float(schedule(jnp.uint32(t))), expected, rtol=1e-5, atol=1e-12,
                                   err_msg=t)


def test_cosine_schedule_warms_up_then_ends_at_its_floor():
    c = optim_config(schedule="cosine", warmup_steps=10)
    schedule = optim.make_schedule(c, 110)
    assert float(schedule(0)) == 0.0
    np.testing.assert_allclose(float(schedule(10)), c.learning_rate, rtol=1e-6)
    np.testing.assert_allclose(float(schedule(60)), c.learning_rate * (1 + 0.01) / 2, rtol=1e-5)
    np.testing.assert_allclose(float(schedule(110)), c.learning_rate * 0.01, rtol=1e-5)


def test_unknown_schedule_is_named():
    with pytest.raises(ValueError, match="unknown schedule 'linear'"):
        optim.make_schedule(optim_config(schedule="linear"), 100)


def test_a_warmup_longer_than_the_run_still_reaches_the_peak_at_the_last_step():
    schedule = optim.make_schedule(optim_config(schedule="constant", warmup_steps=100), 10)
    # Linear from 0 at step 0 to the peak at step 9, the last: not reached a step early either.
    np.testing.assert_allclose([float(schedule(t)) for t in range(10)], 1e-3 * np.arange(10) / 9,
                               rtol=1e-6)


@pytest.mark.parametrize("clip", [2.0, 0.0])
def test_the_optimizer_is_clipped_adamw_decaying_kernels_only(clip):
    """Three steps against a numpy AdamW: gradients clipped by their global norm (not at all at
    grad_clip_norm 0, which is off, not a clip to nothing), Adam's moments with b1 and b2 as
    configured, weight decay on kernels (ndim > 1) but not biases or scales."""
    import jax

    c = optim_config(schedule="constant", optimizer="adamw", b1=0.8, b2=0.95, weight_decay=0.1,
                     grad_clip_norm=clip)
    rng = np.random.default_rng(0)
    params = {"kernel": rng.normal(size=(3, 2)).astype(np.float32),
              "bias": rng.normal(size=(2,)).astype(np.float32)}
    grads = [{k: (rng.normal(size=v.shape) * scale).astype(np.float32) for k, v in params.items()}
             for scale in (5.0, 0.1, 3.0)]  # norms above and below the clip
    tx = optim.make_optimizer(c, 100)
    state, got = tx.init(params), jax.tree.map(jnp.asarray, params)
    for g in grads:
        updates, state = tx.update(jax.tree.map(jnp.asarray, g), state, got)
        got = jax.tree.map(lambda p, u: p + u, got, updates)

    p = {k: v.astype(np.float64) for k, v in params.items()}
    m = {k: np.zeros_like(v) for k, v in p.items()}
    v2 = {k: np.zeros_like(v) for k, v in p.items()}
    for t, g in enumerate(grads, start=1):
        norm = np.sqrt(sum(np.sum(x.astype(np.float64) ** 2) for x in g.values()))
        for k in p:
            gk = g[k] * min(1.0, clip / norm) if clip else g[k]
            m[k] = 0.8 * m[k] + 0.2 * gk
            v2[k] = 0.95 * v2[k] + 0.05 * gk ** 2
            step = (m[k] / (1 - 0.8 ** t)) / (np.sqrt(v2[k] / (1 - 0.95 ** t)) + 1e-8)
            decay = 0.1 * p[k] if p[k].ndim > 1 else 0.0
            p[k] = p[k] - 1e-3 * (step + decay)
    for k in p:
        np.testing.assert_allclose(np.asarray(got[k]), p[k], rtol=1e-5, atol=1e-7, err_msg=k)
