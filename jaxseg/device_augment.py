"""Joint image+mask augmentation on the accelerator, in JAX.

For runs fed from device-resident arrays (launch/gpu_array_train.py): the same family of
transforms as jaxseg.preprocess (random zoom, shift, rotation, horizontal flip, then
brightness/contrast/saturation jitter), expressed as one inverse-mapped sampling grid so that a
whole batch is augmented inside the jitted step with no host work. Also here, for every run
(jaxseg.train's too): `copy_paste` (data.aug.copy_paste), applied by jaxseg.train_step to each
batch.
"""
from __future__ import annotations

import jax
import jax.numpy as jnp


def _one(key, image, mask, aug):
    size = image.shape[0]
    k = jax.random.split(key, 8)
    zoom = jax.random.uniform(k[0], (), minval=aug.scale_min, maxval=aug.scale_max)
    angle = jnp.deg2rad(jax.random.uniform(k[1], (), minval=-aug.rotate_degrees,
                                           maxval=aug.rotate_degrees))
    shift = jax.random.uniform(k[2], (2,), minval=-aug.max_shift, maxval=aug.max_shift) * size
    flip = jnp.where(aug.hflip & (jax.random.uniform(k[3]) < 0.5), -1.0, 1.0)
    c = (size - 1) / 2.0
    ys, xs = jnp.meshgrid(jnp.arange(size, dtype=jnp.float32), jnp.arange(size, dtype=jnp.float32),
                          indexing="ij")
    # Output pixel -> source pixel: undo shift, rotation and zoom about the centre, then flip.
    dy, dx = ys - c - shift[1], xs - c - shift[0]
    cos, sin = jnp.cos(angle), jnp.sin(angle)
    sx = (cos * dx + sin * dy) / zoom * flip + c
    sy = (-sin * dx + cos * dy) / zoom + c
    coords = [sy, sx]
    # "mirror" is OpenCV's BORDER_REFLECT_101 (the edge pixel not repeated), as on the host.
    warp = lambda ch, order: jax.scipy.ndimage.map_coordinates(ch, coords, order=order, mode="mirror")
    img = jnp.stack([warp(image[..., i].astype(jnp.float32), 1) for i in range(3)], axis=-1)
    msk = warp(mask[..., 0].astype(jnp.float32), 0)[..., None]
    img = img * jax.random.uniform(k[4], (), minval=1 - aug.brightness, maxval=1 + aug.brightness)
    mean = img.mean()
    img = (img - mean) * jax.random.uniform(k[5], (), minval=1 - aug.contrast,
                                            maxval=1 + aug.contrast) + mean
    gray = img.mean(axis=-1, keepdims=True)
    img = (img - gray) * jax.random.uniform(k[6], (), minval=1 - aug.saturation,
                                            maxval=1 + aug.saturation) + gray
    return jnp.clip(jnp.round(img), 0, 255).astype(jnp.uint8), msk.astype(jnp.uint8)


def augment_batch(key: jax.Array, images: jax.Array, masks: jax.Array, aug):
    """Augments (B, S, S, 3) uint8 images and (B, S, S, 1) masks with one key per example."""
    keys = jax.random.split(key, images.shape[0])
    return jax.vmap(lambda k, i, m: _one(k, i, m, aug))(keys, images, masks)


def copy_paste(key: jax.Array, images: jax.Array, masks: jax.Array, valid: jax.Array, prob: float):
    """Pastes, with probability `prob` per example, another example's person over it.

    The donor of example i is example (i - r) mod B for one random r in [1, B), so no example is
    its own donor (unless B = 1). Pasted pixels take the donor's image; the mask becomes the union
    of both people, which is exact because the donor's person hides whatever it covers. Padding examples
    (valid = 0) donate nothing. The person thus appears on backgrounds and beside people it was
    never photographed with: more and harder training scenes from the same annotations.

    On a data-sharded batch the roll makes XLA gather the batch's images and masks on every
    device (about 2 x B x S x S x 4 bytes each): small next to the step, and exact.
    """
    b = images.shape[0]
    k_shift, k_take = jax.random.split(key)
    shift = jax.random.randint(k_shift, (), 1, max(b, 2))
    donor_image = jnp.roll(images, shift, axis=0)
    donor_valid = jnp.roll(valid, shift)[:, None, None, None].astype(masks.dtype)
    donor_mask = jnp.roll(masks, shift, axis=0) * donor_valid
    take = (jax.random.uniform(k_take, (b,)) < prob)[:, None, None, None] & (donor_mask > 0)
    return jnp.where(take, donor_image, images), jnp.where(take, donor_mask, masks)
