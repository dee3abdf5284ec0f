"""Segmentation metrics as exact integer counts per image, and metrics derived from their sums.

Counts are computed per image inside jitted code (int32 is safe per image); sums over a split are
taken on the host in int64, and every metric is derived from those sums, never from batch means.
"""
from __future__ import annotations

import math

import jax
import jax.numpy as jnp
import numpy as np

COUNT_KEYS = ("tp", "fp", "fn", "tn", "pred_boundary", "pred_boundary_hit",
              "true_boundary", "true_boundary_hit", "fp_near_edge", "fn_near_edge")

# Boundary F1 tolerance: a fraction of the diagonal (Csurka et al. 2013, BF score), applied as
# a chessboard distance. The evaluator takes the split's canvas diagonal, one static tolerance
# for the whole jitted step, so a split's smaller photos get a slightly larger one.
BOUNDARY_TOLERANCE_FRACTION = 0.0075


def boundary_tolerance(height: int, width: int) -> int:
    """Tolerance in pixels for an image (or canvas) of this size: at least 1."""
    return max(1, round(BOUNDARY_TOLERANCE_FRACTION * math.hypot(height, width)))


def _window_max(x: jax.Array, radius: int) -> jax.Array:
    """Max over a (2r+1)^2 square, separably (rows then columns); x is (B, H, W)."""
    k = 2 * radius + 1
    pad = ((0, 0), (radius, radius), (0, 0))
    x = jax.lax.reduce_window(x, 0, jax.lax.max, (1, k, 1), (1, 1, 1), pad)
    pad = ((0, 0), (0, 0), (radius, radius))
    return jax.lax.reduce_window(x, 0, jax.lax.max, (1, 1, k), (1, 1, 1), pad)


def boundary(mask: jax.Array, region: jax.Array) -> jax.Array:
    """Pixels of `mask` with a non-mask 8-neighbour inside `region` (the region edge is no boundary)."""
    outside = (~mask & region).astype(jnp.int32)
    return mask & (_window_max(outside, 1) > 0)


def per_image_counts(pred: jax.Array, target: jax.Array, region: jax.Array, tolerance: int) -> dict:
    """Integer counts per image for boolean (B, H, W) prediction and target inside `region`."""
    pred = pred & region
    target = target & region

    def count(x):
        return jnp.sum(x, axis=(1, 2), dtype=jnp.int32)

    pb = boundary(pred, region)
    tb = boundary(target, region)
    near_tb = _window_max(tb.astype(jnp.int32), tolerance) > 0
    near_pb = _window_max(pb.astype(jnp.int32), tolerance) > 0
    return {
        "tp": count(pred & target),
        "fp": count(pred & ~target),
        "fn": count(~pred & target),
        "tn": count(~pred & ~target & region),
        "pred_boundary": count(pb),
        "pred_boundary_hit": count(pb & near_tb),
        "true_boundary": count(tb),
        "true_boundary_hit": count(tb & near_pb),
        # Wrong pixels within the tolerance of the true edge: what edge refinement could mend.
        "fp_near_edge": count(pred & ~target & near_tb),
        "fn_near_edge": count(~pred & target & near_tb),
    }


def _ratio(num, den, empty: float) -> float:
    return float(num / den) if den > 0 else empty


def image_iou(counts: dict) -> np.ndarray:
    """Per-image person IoU; an image where both masks are empty scores 1."""
    tp, fp, fn = (np.asarray(counts[k], np.int64) for k in ("tp", "fp", "fn"))
    union = tp + fp + fn
    return np.where(union > 0, tp / np.maximum(union, 1), 1.0)


def image_dice(counts: dict) -> np.ndarray:
    """Per-image Dice/F1; both-empty images score 1."""
    tp, fp, fn = (np.asarray(counts[k], np.int64) for k in ("tp", "fp", "fn"))
    den = 2 * tp + fp + fn
    return np.where(den > 0, 2 * tp / np.maximum(den, 1), 1.0)


def metrics_from_counts(counts: dict) -> dict:
    """Dataset metrics from per-image count arrays (summed here in int64)."""
    s = {k: int(np.sum(np.asarray(counts[k], np.int64))) for k in COUNT_KEYS}
    tp, fp, fn, tn = s["tp"], s["fp"], s["fn"], s["tn"]
    iou = _ratio(tp, tp + fp + fn, 1.0)
    background_iou = _ratio(tn, tn + fp + fn, 1.0)
    near_fp, near_fn = s["fp_near_edge"], s["fn_near_edge"]
    bp = _ratio(s["pred_boundary_hit"], s["pred_boundary"], 1.0)
    br = _ratio(s["true_boundary_hit"], s["true_boundary"], 1.0)
    return {
        "iou": iou,
        "mean_image_iou": float(np.mean(image_iou(counts))) if len(counts["tp"]) else float("nan"),
        "miou": (iou + background_iou) / 2,
        "dice": _ratio(2 * tp, 2 * tp + fp + fn, 1.0),
        "precision": _ratio(tp, tp + fp, 1.0),
        "recall": _ratio(tp, tp + fn, 1.0),
        "pixel_accuracy": _ratio(tp + tn, tp + fp + fn + tn, 1.0),
        "boundary_f1": _ratio(2 * bp * br, bp + br, 0.0),
        # Share of wrong pixels within the boundary tolerance of the true edge, and the IoU if
        # they were all right: the most that moving edges (not finding people) could gain.
        "near_edge_error_share": _ratio(near_fp + near_fn, fp + fn, 0.0),
        "iou_without_edge_errors": _ratio(tp + near_fn, tp + fp + fn - near_fp, 1.0),
    }
