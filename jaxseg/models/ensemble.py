"""An inference-only ensemble: the mean of its members' logits."""
from __future__ import annotations

import jax
from flax import nnx


class LogitAverage(nnx.Module):
    """Averages the logits of models that share input size and output head.

    Averaging logits rather than probabilities keeps the output a logit, so everything that
    consumes a single model's output (threshold, flip averaging, refinement, export) takes an
    ensemble unchanged.
    """

    def __init__(self, members):
        if not members:
            raise ValueError("an ensemble needs at least one member")
        self.members = nnx.List(members)

    def __call__(self, images: jax.Array, train: bool = False) -> jax.Array:
        """The members' mean logits for uint8 images, as a single model returns them."""
        if train:
            raise ValueError("LogitAverage is for inference: train its members one by one")
        return sum(m(images, train=False) for m in self.members) / len(self.members)


def of_members(models):
    """One model as itself, several as their LogitAverage."""
    return models[0] if len(models) == 1 else LogitAverage(models)
