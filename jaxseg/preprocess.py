"""Per-example preprocessing on the host: joint image+mask augmentation and the model-size resize.

Every random draw comes from a generator keyed by (seed, step, slot), so an example's augmentation
depends only on where it sits in the global batch stream, never on the process or the thread.
"""
from __future__ import annotations

import math

import cv2
import numpy as np

from jaxseg.resolution import resize_image, resize_mask


def model_input(example: dict, size: int) -> tuple[np.ndarray, np.ndarray]:
    """Deterministic resize of an example's image and mask to the model resolution."""
    return resize_image(example["image"], size), resize_mask(example["mask"], size)


def _affine(size: int, zoom: float, angle_deg: float, shift: tuple[float, float], flip: bool):
    c = (size - 1) / 2.0
    a = math.radians(angle_deg)
    rot = np.array([[math.cos(a), -math.sin(a)], [math.sin(a), math.cos(a)]]) * zoom
    if flip:
        rot = rot @ np.diag([-1.0, 1.0])
    offset = np.array([c + shift[0], c + shift[1]]) - rot @ np.array([c, c])
    return np.hstack([rot, offset[:, None]])


def augment(image: np.ndarray, mask: np.ndarray, aug, rng: np.random.Generator):
    """Random scale/shift/rotation/flip applied jointly, then colour jitter on the image only.

    `image` (S, S, 3) uint8 and `mask` (S, S, 1) uint8 are already at the model resolution.
    """
    size = image.shape[0]
    zoom = rng.uniform(aug.scale_min, aug.scale_max)
    angle = rng.uniform(-aug.rotate_degrees, aug.rotate_degrees)
    shift = tuple(rng.uniform(-aug.max_shift, aug.max_shift, size=2) * size)
    flip = bool(aug.hflip and rng.random() < 0.5)
    m = _affine(size, zoom, angle, shift, flip)
    # Reflection keeps borders photo-like; the mask is reflected identically, so labels stay true.
    image = cv2.warpAffine(image, m, (size, size), flags=cv2.INTER_LINEAR,
                           borderMode=cv2.BORDER_REFLECT_101)
    mask = cv2.warpAffine(mask[..., 0], m, (size, size), flags=cv2.INTER_NEAREST,
                          borderMode=cv2.BORDER_REFLECT_101)[..., None]

    x = image.astype(np.float32)
    x *= rng.uniform(1 - aug.brightness, 1 + aug.brightness)
    mean = x.mean()
    x = (x - mean) * rng.uniform(1 - aug.contrast, 1 + aug.contrast) + mean
    gray = x.mean(axis=-1, keepdims=True)
    x = (x - gray) * rng.uniform(1 - aug.saturation, 1 + aug.saturation) + gray
    # Rounded, as device_augment rounds: truncation darkened every jittered image by half a level.
    return np.clip(np.rint(x), 0, 255).astype(np.uint8), mask


def train_example(example: dict, size: int, aug, seed: int, step: int, slot: int):
    """Model-size (image, mask) for one training slot, augmented when `aug.enabled`."""
    image, mask = model_input(example, size)
    if not aug.enabled:
        return image, mask
    return augment(image, mask, aug, np.random.default_rng([seed, step, slot]))
