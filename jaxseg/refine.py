"""Edge-aware refinement of person probabilities with the photo as guide (a fast guided filter).

The colour guided filter (He, Sun and Tang 2010) fits, in every (2r+1)^2 window, the probability
as an affine function of the RGB colour, q = a . I + b, and averages the fits. Its fast form (He
and Sun 2015) fits a and b at the model's resolution, where the probabilities live, upsamples the
smooth a and b to each image's own size by the shared resolution rule, and applies them to the
full-resolution photo there: the upsampled mask then follows the photo's own edges instead of
the bilinear blur of a 256 px map. Radius and regulariser were chosen on the validation splits
(model card, `post_processing`).
"""
from __future__ import annotations

import jax
import jax.numpy as jnp

from jaxseg import resolution

# Radius in model pixels; chosen on the validation splits with flip TTA (model card).
RADIUS = 3
EPS = 1e-4


def box_mean(x: jax.Array, radius: int) -> jax.Array:
    """Mean over the (2r+1)^2 window of each pixel of (B, H, W, C); windows cut at the borders."""
    k = 2 * radius + 1

    def window_sum(v):
        # Rows, then columns: 2k adds a pixel, not k^2 (a 2-D window took 70x as long at radius
        # 16 on a CPU, and compiling its constant count of ones seconds more).
        for axis in (1, 2):
            window, pad = [1, 1, 1, 1], [(0, 0)] * 4
            window[axis], pad[axis] = k, (radius, radius)
            v = jax.lax.reduce_window(v, 0.0, jax.lax.add, tuple(window), (1, 1, 1, 1), pad)
        return v

    return window_sum(x) / window_sum(jnp.ones((1, *x.shape[1:3], 1), x.dtype))


def _solve_symmetric3(m: jax.Array, v: jax.Array) -> jax.Array:
    """x with m x = v for symmetric positive-definite (..., 3, 3) m, by the adjugate."""
    a, b, c = m[..., 0, 0], m[..., 0, 1], m[..., 0, 2]
    d, e, f = m[..., 1, 1], m[..., 1, 2], m[..., 2, 2]
    adj = jnp.stack([
        jnp.stack([d * f - e * e, c * e - b * f, b * e - c * d], -1),
        jnp.stack([c * e - b * f, a * f - c * c, b * c - a * e], -1),
        jnp.stack([b * e - c * d, b * c - a * e, a * d - b * b], -1)], -2)
    det = a * adj[..., 0, 0] + b * adj[..., 1, 0] + c * adj[..., 2, 0]
    return jnp.einsum("...ij,...j->...i", adj, v) / det[..., None]


def guided_coefficients(guide: jax.Array, probs: jax.Array, *, radius: int = RADIUS,
                        eps: float = EPS) -> tuple[jax.Array, jax.Array]:
    """Window-averaged (a (B,S,S,3), b (B,S,S)) for uint8 guide (B,S,S,3) and probs (B,S,S)."""
    image = guide.astype(jnp.float32) / 255.0
    p = probs.astype(jnp.float32)[..., None]
    mean_i, mean_p = box_mean(image, radius), box_mean(p, radius)
    cov_ip = box_mean(image * p, radius) - mean_i * mean_p
    outer = (image[..., :, None] * image[..., None, :]).reshape(*image.shape[:3], 9)
    sigma = (box_mean(outer, radius).reshape(*image.shape, 3)
             - mean_i[..., :, None] * mean_i[..., None, :] + eps * jnp.eye(3, dtype=jnp.float32))
    a = _solve_symmetric3(sigma, cov_ip)
    b = mean_p - jnp.sum(a * mean_i, axis=-1, keepdims=True)
    return box_mean(a, radius), box_mean(b, radius)[..., 0]


def refined_probabilities(guide: jax.Array, probs: jax.Array, full_images: jax.Array,
                          sizes: jax.Array, canvas: tuple[int, int], *, radius: int = RADIUS,
                          eps: float = EPS) -> jax.Array:
    """(B, H, W) canvas probabilities at each image's own size, following the photo's edges.

    `guide` (B,S,S,3) uint8 is the model input, `probs` (B,S,S) its probabilities, `full_images`
    (B,H,W,3) uint8 the photos on the canvas (top left) and `sizes` (B,2) their (height, width).
    Values are clipped to [0, 1]; outside each image's region they are 0 (the upsampled
    coefficients are, so no mask is needed).
    """
    a, b = guided_coefficients(guide, probs, radius=radius, eps=eps)
    coefficients = jnp.concatenate([a, b[..., None]], axis=-1)

    def one(args):
        # Image by image: the upsampled coefficients are the largest array, (H, W, 4) float32,
        # and a whole batch of them at photo size would take gigabytes.
        coeffs, photo, size = args
        up = resolution.upsample_to_sizes(coeffs[None], size[None], canvas)[0]
        photo = photo.astype(jnp.float32) / 255.0
        return jnp.clip(up[..., 3] + sum(up[..., c] * photo[..., c] for c in range(3)), 0.0, 1.0)

    return jax.lax.map(one, (coefficients, full_images, sizes))


def full_resolution(guide: jax.Array, probs: jax.Array, full_images: jax.Array | None,
                    sizes: jax.Array, canvas: tuple[int, int],
                    refinement: tuple[int, float] | None) -> jax.Array:
    """(B, H, W) canvas probabilities at each image's own size: refined with `refinement` =
    (radius, eps) along the photos' edges, or (None) upsampled plainly by the shared rule.
    Evaluation and prediction both go through here, so they upsample alike."""
    if refinement is None:
        return resolution.upsample_to_sizes(probs, sizes, canvas)
    radius, eps = refinement
    return refined_probabilities(guide, probs, full_images, sizes, canvas, radius=radius, eps=eps)
