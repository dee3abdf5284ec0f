"""Segmentation losses: pure functions of (logits, masks, valid) weighted by example validity."""
from __future__ import annotations

import jax
import jax.numpy as jnp


def person_probability(logits: jax.Array) -> jax.Array:
    """P(person) per pixel, (B, H, W), for 1-logit (sigmoid) or 2-logit (softmax) heads."""
    if logits.shape[-1] == 1:
        return jax.nn.sigmoid(logits[..., 0])
    return jax.nn.softmax(logits, axis=-1)[..., 1]


def _weights(valid: jax.Array, ndim: int) -> jax.Array:
    return valid.reshape(valid.shape + (1,) * (ndim - 1)).astype(jnp.float32)


def cross_entropy(logits: jax.Array, masks: jax.Array, valid: jax.Array) -> jax.Array:
    """Mean pixel cross-entropy over valid examples (sigmoid for 1 logit, softmax for 2)."""
    target = masks[..., 0].astype(jnp.float32)
    if logits.shape[-1] == 1:
        z = logits[..., 0]
        per_pixel = jnp.maximum(z, 0) - z * target + jnp.log1p(jnp.exp(-jnp.abs(z)))
    else:
        logp = jax.nn.log_softmax(logits, axis=-1)
        per_pixel = -(target * logp[..., 1] + (1 - target) * logp[..., 0])
    w = _weights(valid, per_pixel.ndim)
    pixels = per_pixel.shape[1] * per_pixel.shape[2]
    return jnp.sum(per_pixel * w) / jnp.maximum(jnp.sum(w) * pixels, 1.0)


def soft_dice(logits: jax.Array, masks: jax.Array, valid: jax.Array, eps: float = 1.0) -> jax.Array:
    """1 - soft Dice per image, averaged over valid examples."""
    p = person_probability(logits)
    t = masks[..., 0].astype(jnp.float32)
    inter = jnp.sum(p * t, axis=(1, 2))
    dice = (2 * inter + eps) / (jnp.sum(p, axis=(1, 2)) + jnp.sum(t, axis=(1, 2)) + eps)
    w = valid.astype(jnp.float32)
    return jnp.sum((1 - dice) * w) / jnp.maximum(jnp.sum(w), 1.0)


def segmentation_loss(logits, masks, valid, *, ce_weight: float = 1.0, dice_weight: float = 1.0):
    """Weighted sum of cross-entropy and soft Dice; returns (loss, parts)."""
    ce = cross_entropy(logits, masks, valid)
    dice = soft_dice(logits, masks, valid)
    return ce_weight * ce + dice_weight * dice, {"ce": ce, "dice_loss": dice}
