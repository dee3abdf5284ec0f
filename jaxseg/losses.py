"""Segmentation losses: pure functions of (logits, masks, valid) weighted by example validity."""
from __future__ import annotations

import jax
import jax.numpy as jnp


def person_margin_logit(logits: jax.Array) -> jax.Array:
    """(B, H, W) logit of person against background, for 1-logit or 2-logit heads."""
    if logits.shape[-1] == 1:
        return logits[..., 0]
    return logits[..., 1] - logits[..., 0]


def person_probability(logits: jax.Array) -> jax.Array:
    """P(person) per pixel, (B, H, W), for 1-logit (sigmoid) or 2-logit (softmax) heads: the
    softmax of two logits is the sigmoid of their difference."""
    return jax.nn.sigmoid(person_margin_logit(logits))


def _weights(valid: jax.Array, ndim: int) -> jax.Array:
    return valid.reshape(valid.shape + (1,) * (ndim - 1)).astype(jnp.float32)


def boundary_band(masks: jax.Array, radius: int) -> jax.Array:
    """1.0 where a (B, H, W, 1) mask has both classes within `radius` pixels (a square window)."""
    m = masks[..., 0].astype(jnp.float32)
    window, strides = (1, 2 * radius + 1, 2 * radius + 1), (1, 1, 1)
    hi = jax.lax.reduce_window(m, -jnp.inf, jax.lax.max, window, strides, "SAME")
    lo = jax.lax.reduce_window(m, jnp.inf, jax.lax.min, window, strides, "SAME")
    return (hi != lo).astype(jnp.float32)


def cross_entropy(logits: jax.Array, masks: jax.Array, valid: jax.Array, *,
                  boundary_weight: float = 0.0, boundary_radius: int = 2) -> jax.Array:
    """Mean pixel cross-entropy over valid examples (sigmoid for 1 logit, softmax for 2).

    With boundary_weight > 0, pixels within boundary_radius of the mask's edge weigh
    1 + boundary_weight and the mean is taken over the weights, so that the thin band where
    IoU is won or lost is not drowned by the easy interior and background. boundary_weight is a
    static Python number (a config value), not a traced array.
    """
    target = masks[..., 0].astype(jnp.float32)
    if logits.shape[-1] == 1:
        z = logits[..., 0]
        per_pixel = jnp.maximum(z, 0) - z * target + jnp.log1p(jnp.exp(-jnp.abs(z)))
    else:
        logp = jax.nn.log_softmax(logits, axis=-1)
        per_pixel = -(target * logp[..., 1] + (1 - target) * logp[..., 0])
    w = _weights(valid, per_pixel.ndim)
    if boundary_weight:
        w = w * (1.0 + boundary_weight * boundary_band(masks, boundary_radius))
    else:
        w = jnp.broadcast_to(w, per_pixel.shape)
    return jnp.sum(per_pixel * w) / jnp.maximum(jnp.sum(w), 1.0)


def soft_dice(logits: jax.Array, masks: jax.Array, valid: jax.Array, eps: float = 1.0) -> jax.Array:
    """1 - soft Dice per image, averaged over valid examples."""
    p = person_probability(logits)
    t = masks[..., 0].astype(jnp.float32)
    inter = jnp.sum(p * t, axis=(1, 2))
    dice = (2 * inter + eps) / (jnp.sum(p, axis=(1, 2)) + jnp.sum(t, axis=(1, 2)) + eps)
    w = valid.astype(jnp.float32)
    return jnp.sum((1 - dice) * w) / jnp.maximum(jnp.sum(w), 1.0)


def lovasz_hinge(logits: jax.Array, masks: jax.Array, valid: jax.Array) -> jax.Array:
    """Lovász hinge per image (Berman et al. 2018), averaged over valid examples.

    The Lovász extension of the Jaccard loss 1 - IoU, applied to the hinge errors
    1 - logit * (+1 person / -1 background): a convex surrogate whose value on 0/1 errors is the
    image's 1 - IoU itself, so that training optimises the metric the model is judged by rather
    than per-pixel accuracy. The Jaccard increments depend only on the order of the errors, which
    has no gradient; the loss is differentiable through the sorted errors alone.
    """
    target = masks[..., 0].reshape(masks.shape[0], -1).astype(jnp.float32)
    z = person_margin_logit(logits).reshape(target.shape).astype(jnp.float32)
    errors = 1.0 - z * (2.0 * target - 1.0)
    order = jnp.argsort(-errors, axis=1)
    errors_sorted = jnp.take_along_axis(errors, order, axis=1)
    target_sorted = jnp.take_along_axis(target, order, axis=1)
    positives = jnp.sum(target, axis=1, keepdims=True)
    intersection = positives - jnp.cumsum(target_sorted, axis=1)
    union = positives + jnp.cumsum(1.0 - target_sorted, axis=1)
    jaccard = 1.0 - intersection / union  # union >= 1 from the first pixel on
    increments = jnp.concatenate([jaccard[:, :1], jnp.diff(jaccard, axis=1)], axis=1)
    per_image = jnp.sum(jax.nn.relu(errors_sorted) * jax.lax.stop_gradient(increments), axis=1)
    w = valid.astype(jnp.float32)
    return jnp.sum(per_image * w) / jnp.maximum(jnp.sum(w), 1.0)


def segmentation_loss(logits, masks, valid, *, ce_weight: float = 1.0, dice_weight: float = 1.0,
                      boundary_weight: float = 0.0, boundary_radius: int = 2,
                      lovasz_weight: float = 0.0):
    """Weighted sum of (boundary-weighted) cross-entropy, soft Dice and, when lovasz_weight > 0,
    the Lovász hinge; returns (loss, parts)."""
    ce = cross_entropy(logits, masks, valid, boundary_weight=boundary_weight,
                       boundary_radius=boundary_radius)
    dice = soft_dice(logits, masks, valid)
    loss, parts = ce_weight * ce + dice_weight * dice, {"ce": ce, "dice_loss": dice}
    if lovasz_weight:
        parts["lovasz_loss"] = lovasz_hinge(logits, masks, valid)
        loss = loss + lovasz_weight * parts["lovasz_loss"]
    return loss, parts
