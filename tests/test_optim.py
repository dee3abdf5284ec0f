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
    ((0.6, 0.62), 20, 0),  # both land on step 12: the rate is divided by 10 twice there
    ((0.6, 0.62), 20, 4),
    ((0.29, 0.57), 100, 0)])  # in floats 0.29 * 100 and 0.57 * 100 fall just short of 29 and 57
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
