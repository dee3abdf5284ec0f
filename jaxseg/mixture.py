"""Dataset mixtures: the datasets a mixture may name, parsing 'name:weight' lists and splitting
a batch between the datasets.

Kept free of TFDS/OpenCV so that accelerator-only scripts (launch/gpu_array_train.py) share it.
"""
from __future__ import annotations

from typing import Sequence

import numpy as np

DATASETS = ("portrait_segmentation", "ccp_person", "person_folder")  # jaxseg.datasets builds them


def parse_mixture(spec: str) -> list[tuple[str, float]]:
    """'a:1,b:2' -> [('a', 1.0), ('b', 2.0)]; a missing weight is 1."""
    out = []
    for item in filter(None, (s.strip() for s in spec.split(","))):
        name, _, weight = item.partition(":")
        try:  # float's own words named neither the dataset nor the field
            w = float(weight) if weight else 1.0
        except ValueError:
            w = float("nan")
        if not 0 < w < float("inf"):  # also refuses nan
            raise ValueError(f"mixture weight for {name!r} must be a positive number, got "
                             f"{weight or w}")
        if name.strip() in (n for n, _ in out):  # two sources, one dict entry, one evaluator
            raise ValueError(f"{name.strip()!r} is named twice in the mixture {spec!r}: give it "
                             "once, with the sum of its weights")
        out.append((name.strip(), w))
    if not out:
        raise ValueError(f"empty dataset mixture {spec!r}")
    return out


def mixture_counts(weights: Sequence[float], batch_size: int) -> list[int]:
    """Examples per dataset in each batch: proportional, largest remainder, each at least 1."""
    if batch_size < len(weights):
        raise ValueError(f"batch size {batch_size} is smaller than the {len(weights)} mixed datasets")
    raw = np.asarray(weights, np.float64) / np.sum(weights) * batch_size
    counts = np.floor(raw).astype(int)
    for i in np.argsort(-(raw - counts), kind="stable")[: batch_size - counts.sum()]:
        counts[i] += 1
    # Every dataset keeps at least one slot, taken from the dataset holding the most.
    while (counts == 0).any():
        counts[np.argmax(counts)] -= 1
        counts[np.argmin(counts)] += 1
    return [int(c) for c in counts]


def rounding_note(spec: str, batch_size: int) -> str | None:
    """How the mixture SPEC's weights are rounded to whole examples in each batch of BATCH_SIZE,
    where that batch cannot hold them exactly (1:1:1 in 16 rows is 6:5:5 at every step, and the
    error never evens out over a run); None where it can."""
    names_weights = parse_mixture(spec)
    total = sum(w for _, w in names_weights)
    counts = mixture_counts([w for _, w in names_weights], batch_size)
    if all(np.isclose(c / batch_size, w / total) for c, (_, w) in zip(counts, names_weights)):
        return None
    held = ", ".join(f"{c} {name} ({c / batch_size:.1%}, asked {w / total:.1%})"
                     for c, (name, w) in zip(counts, names_weights))
    return f"data.train={spec!r} is rounded to whole examples: each batch of {batch_size} holds {held}"
