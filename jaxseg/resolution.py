"""The one resolution rule shared by training, evaluation, reports and prediction.

The model sees a fixed square size: images are resized (aspect not kept) to `size` x `size`.
Predictions go back to each image's own size by bilinear upsampling of the person probability
onto a fixed canvas (static shape, so one compiled function serves every image that fits it);
pixels outside the image's own height and width are zero and excluded by `region`.
"""
from __future__ import annotations

import cv2
import jax
import jax.numpy as jnp
import numpy as np


def resize_image(image: np.ndarray, size: int) -> np.ndarray:
    """uint8 RGB image -> (size, size, 3); area averaging when shrinking, bilinear when growing."""
    h, w = image.shape[:2]
    interp = cv2.INTER_AREA if size < min(h, w) else cv2.INTER_LINEAR
    return cv2.resize(image, (size, size), interpolation=interp)


def resize_mask(mask: np.ndarray, size: int) -> np.ndarray:
    """uint8 (H, W) or (H, W, 1) mask -> (size, size, 1), nearest neighbour at pixel centres.

    Aligned with resize_image: OpenCV's plain INTER_NEAREST takes each block's top-left pixel,
    which put every training mask half a model pixel below and right of its image (and the
    models trained on them learned that offset; see model.output_shift).
    """
    out = cv2.resize(np.asarray(mask).reshape(mask.shape[:2]), (size, size),
                     interpolation=cv2.INTER_NEAREST_EXACT)
    return out[..., None]


def pad_to_canvas(array: np.ndarray, canvas: tuple[int, int]) -> np.ndarray:
    """Zero-pads an (H, W, ...) array at the bottom/right to the canvas size."""
    h, w = array.shape[:2]
    if h > canvas[0] or w > canvas[1]:
        raise ValueError(f"array of size {h}x{w} does not fit the canvas {canvas[0]}x{canvas[1]}")
    pad = [(0, canvas[0] - h), (0, canvas[1] - w)] + [(0, 0)] * (array.ndim - 2)
    return np.pad(array, pad)


def canvas_for(sizes, multiple: int = 64) -> tuple[int, int]:
    """Smallest canvas (rounded up to `multiple`) holding every (height, width) in `sizes`."""
    sizes = np.asarray(sizes).reshape(-1, 2)
    h, w = sizes.max(axis=0)
    return int(-(-h // multiple) * multiple), int(-(-w // multiple) * multiple)


def region_mask(sizes: jax.Array, canvas: tuple[int, int]) -> jax.Array:
    """(B, H, W) bool: True inside each image's own (height, width) on the canvas."""
    rows = jnp.arange(canvas[0])[None, :, None] < sizes[:, 0, None, None]
    cols = jnp.arange(canvas[1])[None, None, :] < sizes[:, 1, None, None]
    return rows & cols


def upsample_to_sizes(maps: jax.Array, sizes: jax.Array, canvas: tuple[int, int]) -> jax.Array:
    """(B, S, S[, C]) model-resolution maps -> (B, H, W[, C]) canvas at each image's own size.

    `sizes` is (B, 2) int (height, width). Bilinear with half-pixel centres (as cv2.INTER_LINEAR);
    values outside each image's region are 0. Probabilities are the usual maps; jaxseg.refine
    upsamples its filter coefficients the same way.
    """
    s = maps.shape[1:3]
    out_shape = (*canvas, *maps.shape[3:])

    def one(m, size):
        scale = size.astype(jnp.float32) / jnp.array(s, jnp.float32)
        return jax.image.scale_and_translate(
            m, out_shape, (0, 1), scale, jnp.zeros(2, jnp.float32), method="linear",
            antialias=False)

    restored = jax.vmap(one)(maps.astype(jnp.float32), sizes)
    region = region_mask(sizes, canvas).reshape(*restored.shape[:3], *([1] * (maps.ndim - 3)))
    return jnp.where(region, restored, 0.0)
