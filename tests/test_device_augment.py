"""On-device augmentation: copy-paste against a numpy reference of the same composition; the
geometric transforms keep image and mask aligned."""
import jax
import numpy as np
import pytest

from jaxseg import device_augment


def batch(b=5, size=8, seed=0):
    rng = np.random.default_rng(seed)
    images = rng.integers(0, 256, (b, size, size, 3), dtype=np.uint8)
    masks = (rng.random((b, size, size, 1)) < 0.4).astype(np.uint8)
    return images, masks


def _aug(**overrides):
    import ml_collections

    aug = dict(scale_min=1.0, scale_max=1.0, max_shift=0.0, rotate_degrees=0.0, hflip=False,
               brightness=0.0, contrast=0.0, saturation=0.0)
    return ml_collections.ConfigDict({**aug, **overrides})


def _augmented(images, masks, aug, seed=0):
    return map(np.asarray, jax.jit(lambda k, i, m: device_augment.augment_batch(k, i, m, aug))(
        jax.random.key(seed), images, masks))


def pasted_reference(images, masks, valid, shift, receives):
    """Example i takes example (i - shift) mod B's person where that donor is valid."""
    out_images, out_masks = images.copy(), masks.copy()
    for i in range(len(images)):
        d = (i - shift) % len(images)
        if receives[i] and valid[d]:
            person = masks[d, ..., 0] > 0
            out_images[i][person] = images[d][person]
            out_masks[i][person] = 1
    return out_images, out_masks


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_every_example_gets_another_examples_person_at_probability_one(seed):
    images, masks = batch(seed=seed)
    valid = np.array([1, 1, 0, 1, 1], np.float32)  # the padding example donates nothing
    got_images, got_masks = map(np.asarray, device_augment.copy_paste(
        jax.random.key(seed), images, masks, valid, 1.0))
    matches = [s for s in range(1, len(images))
               if all(np.array_equal(g, r) for g, r in zip(
                   (got_images, got_masks),
                   pasted_reference(images, masks, valid, s, [True] * len(images))))]
    assert len(matches) == 1  # one donor offset, never 0 (an example is not its own donor)
    assert not np.array_equal(got_images, images)


def test_of_two_examples_each_always_gets_the_other_ones_person():
    """The donor offset is drawn from [1, B): for B = 2 it is 1 under every key, never 0 (which
    pastes an example's person onto itself: no paste at all)."""
    images, masks = batch(b=2, seed=3)
    valid = np.ones(2, np.float32)
    expected = pasted_reference(images, masks, valid, 1, [True, True])
    for seed in range(16):
        got = device_augment.copy_paste(jax.random.key(seed), images, masks, valid, 1.0)
        for g, e in zip(got, expected):
            np.testing.assert_array_equal(g, e, err_msg=seed)


def test_every_other_example_of_the_batch_is_a_donor_under_some_key():
    """The offset is drawn from all of [1, B): under 32 keys a batch of 5 takes its donors at
    each of the offsets 1 to 4 (one never drawn pairs some examples never)."""
    images, masks = batch(seed=4)
    valid = np.ones(len(images), np.float32)
    references = {s: pasted_reference(images, masks, valid, s, [True] * len(images))
                  for s in range(1, len(images))}
    offsets = set()
    for seed in range(32):
        got = device_augment.copy_paste(jax.random.key(seed), images, masks, valid, 1.0)
        offsets |= {s for s, ref in references.items()
                    if all(np.array_equal(g, r) for g, r in zip(got, ref))}
    assert offsets == {1, 2, 3, 4}


def test_probability_zero_changes_nothing_and_a_half_pastes_some():
    images, masks = batch(b=64, size=4)
    valid = np.ones(64, np.float32)
    same = device_augment.copy_paste(jax.random.key(0), images, masks, valid, 0.0)
    np.testing.assert_array_equal(same[0], images)
    np.testing.assert_array_equal(same[1], masks)
    _, half_masks = device_augment.copy_paste(jax.random.key(0), images, masks, valid, 0.5)
    changed = np.any(np.asarray(half_masks) != masks, axis=(1, 2, 3))
    assert 16 < changed.sum() < 48  # ~32 of 64 receive a donor (every donor here has a person)


def test_zoom_shift_rotation_and_flip_move_image_and_mask_together():
    """White rectangles on black with masks the same (launch/gpu_array_train's augmentation):
    after augmenting, each mask covers its bright pixels and on average its centre of mass sits
    on the image's within 0.1 pixel, with flips, while the geometry did change."""
    rng = np.random.default_rng(0)
    images = np.zeros((32, 64, 64, 3), np.uint8)
    for image in images:
        top, left = rng.integers(12, 30, size=2)
        image[top:top + rng.integers(10, 22), left:left + rng.integers(10, 22)] = 255
    masks = (images[..., :1] > 0).astype(np.uint8)
    aug = _aug(scale_min=0.75, scale_max=1.25, max_shift=0.1, rotate_degrees=10.0, hflip=True)
    out_images, out_masks = _augmented(images, masks, aug)
    grid = np.mgrid[:64, :64].reshape(2, -1)
    centre = lambda w: (grid * w.reshape(-1)).sum(1) / w.sum()
    shifts = []
    for image, mask in zip(out_images[..., 0], out_masks[..., 0]):
        assert ((image > 127) == (mask > 0)).mean() > 0.97
        shifts.append(centre(mask.astype(float)) - centre(image / 255.0))
    assert np.abs(np.mean(shifts, axis=0)).max() < 0.1, np.mean(shifts, axis=0)
    moved = [(m[..., 0] != b[..., 0]).mean() > 0.01 for m, b in zip(out_masks, masks)]
    assert sum(moved) >= 28


def test_zooming_out_fills_the_border_as_the_host_does():
    """Past the photo's edge the host's augmentation reflects without repeating the edge pixel
    (OpenCV's BORDER_REFLECT_101, numpy's "reflect"); so does the device's. At zoom 0.5 on an
    odd size every output pixel samples one source pixel exactly."""
    size = 33
    rng = np.random.default_rng(1)
    masks = (rng.random((2, size, size, 1)) < 0.5).astype(np.uint8)
    images = np.repeat(masks * 255, 3, axis=-1)
    _, out_masks = _augmented(images, masks, _aug(scale_min=0.5, scale_max=0.5))
    source = 2 * np.arange(size) - (size - 1) // 2  # output pixel -> source pixel
    padded = np.pad(masks[..., 0], ((0, 0), (size, size), (size, size)), mode="reflect")
    expected = padded[:, source[:, None] + size, source[None, :] + size]
    np.testing.assert_array_equal(out_masks[..., 0], expected)


def test_a_flip_mirrors_about_half_the_examples_exactly():
    rng = np.random.default_rng(2)
    images = rng.integers(0, 256, (64, 16, 16, 3), dtype=np.uint8)
    masks = (rng.random((64, 16, 16, 1)) < 0.5).astype(np.uint8)
    out_images, out_masks = _augmented(images, masks, _aug(hflip=True))
    flipped = 0
    for image, mask, out_image, out_mask in zip(images, masks, out_images, out_masks):
        mirrored = np.array_equal(out_image, image[:, ::-1])
        assert mirrored or np.array_equal(out_image, image)
        np.testing.assert_array_equal(out_mask, mask[:, ::-1] if mirrored else mask)
        flipped += mirrored
    assert 16 <= flipped <= 48


def test_a_rotation_turns_a_centred_disc_into_itself():
    """A rotation about the centre keeps a centred disc, and the mask's area: a shear (a wrong
    sign) makes an ellipse, and a bilinear mask cut to integers loses its rim."""
    size, radius = 64, 20
    yy, xx = np.mgrid[:size, :size] - (size - 1) / 2
    disc = (yy ** 2 + xx ** 2 <= radius ** 2).astype(np.uint8)
    masks = np.repeat(disc[None, ..., None], 16, axis=0)
    images = np.repeat(masks * 255, 3, axis=-1)
    images[:, 5:12, 28:36, 1] = 128  # a mark off the centre in the image: the turn shows there
    inside = yy ** 2 + xx ** 2 <= 30 ** 2  # turned, it stays in the frame (no reflected copies)
    out_images, out_masks = _augmented(images, masks, _aug(rotate_degrees=45.0))
    for out in out_masks[..., 0]:  # 1,264 disc pixels: a few of its rim round either way
        assert (out != disc)[inside].sum() <= 70
        assert abs(int(out[inside].sum()) - int(disc.sum())) <= 30
    turned = [np.abs(o.astype(int) - i).sum() > 1000 for o, i in zip(out_images, images)]
    assert sum(turned) >= 12


def test_contrast_and_saturation_scale_distances_from_the_image_mean_and_the_pixels_grey():
    rng = np.random.default_rng(3)
    images = rng.integers(40, 216, (8, 16, 16, 3), dtype=np.uint8)
    masks = np.zeros((8, 16, 16, 1), np.uint8)
    out_images, _ = _augmented(images, masks, _aug(contrast=0.5))
    factors = []
    for image, out in zip(images.astype(float), out_images.astype(float)):
        centred = image - image.mean()
        factors.append(np.sum(centred * (out - image.mean())) / np.sum(centred ** 2))
        assert 0.5 <= factors[-1] <= 1.5
        np.testing.assert_allclose(out, factors[-1] * centred + image.mean(), atol=1.0)
    assert min(factors) < 0.9 and max(factors) > 1.1  # drawn per image over 1 -+ contrast
    # Saturation scales each pixel's distance from its own grey, by a factor drawn apart from
    # contrast's (the same key would tie the two jitters together).
    out_images, _ = _augmented(images, masks, _aug(saturation=0.5))
    for image, out, contrast in zip(images.astype(float), out_images.astype(float), factors):
        grey = image.mean(axis=-1, keepdims=True)
        factor = np.sum((image - grey) * (out - grey)) / np.sum((image - grey) ** 2)
        np.testing.assert_allclose(out, factor * (image - grey) + grey, atol=1.0)
        assert abs(factor - contrast) > 1e-3


def test_shifts_move_by_up_to_max_shift_of_the_image_size():
    """With max_shift alone, each example moves by up to max_shift * size pixels along each axis,
    by amounts that spread over that range (as on the host)."""
    size, radius = 64, 10
    yy, xx = np.mgrid[:size, :size] - (size - 1) / 2
    disc = (yy ** 2 + xx ** 2 <= radius ** 2).astype(np.uint8)
    masks = np.repeat(disc[None, ..., None], 24, axis=0)
    images = np.repeat(masks * 255, 3, axis=-1)
    _, out_masks = _augmented(images, masks, _aug(max_shift=0.1))
    grid = np.mgrid[:size, :size].reshape(2, -1)
    moves = np.array([grid @ m.reshape(-1) / m.sum() - (size - 1) / 2
                      for m in out_masks[..., 0].astype(float)])
    assert 0.05 * size < np.abs(moves).max() <= 0.1 * size + 0.5
    # Both ways along each axis: a range of [0, max_shift) moves everything down and right.
    assert (moves.min(axis=0) < -0.05 * size).all() and (moves.max(axis=0) > 0.05 * size).all()
    # Each axis its own amount: one draw for both moves every disc along the diagonal.
    assert np.abs(moves[:, 0] - moves[:, 1]).max() > 0.05 * size


def test_a_turned_and_zoomed_ramp_stays_a_ramp_tilted_by_up_to_the_angle_both_ways():
    """A ramp 3 * column, zoomed by 1.25 and turned by theta about the centre, is (bilinear
    sampling is exact on a linear image) the ramp with gradient 3 / 1.25 * (cos theta, +-sin theta)
    and the centre's value 3 * 31.5, to the rounding: nearest-pixel sampling leaves steps of up to
    half a source pixel, turns of one sign or past rotate_degrees (degrees taken as radians) show
    in the gradient's direction."""
    size, zoom, degrees = 64, 1.25, 30.0
    c = (size - 1) / 2
    ramp = np.broadcast_to(3 * np.arange(size, dtype=np.uint8), (size, size))
    images = np.repeat(np.repeat(ramp[None, ..., None], 3, axis=-1), 32, axis=0)
    masks = np.zeros((32, size, size, 1), np.uint8)
    out_images, _ = _augmented(images, masks, _aug(scale_min=zoom, scale_max=zoom,
                                                   rotate_degrees=degrees))
    yy, xx = np.mgrid[:size, :size] - c
    inside = np.hypot(yy, xx) <= 20  # its source lies inside the photo (no reflected border)
    design = np.stack([np.ones(inside.sum()), xx[inside], yy[inside]], axis=1)
    angles = []
    for out in out_images[..., 0].astype(float):
        (centre, gx, gy), *_ = np.linalg.lstsq(design, out[inside], rcond=None)
        assert np.abs(design @ [centre, gx, gy] - out[inside]).max() <= 0.6
        assert centre == pytest.approx(3 * c, abs=0.2)
        assert np.hypot(gx, gy) == pytest.approx(3 / zoom, abs=0.01)
        angles.append(np.degrees(np.arctan2(gy, gx)))
    assert max(np.abs(angles)) <= degrees + 0.5
    assert min(angles) < -degrees / 3 and max(angles) > degrees / 3, angles


def test_brightness_scales_every_value_by_its_own_draw_and_saturates_at_255():
    """Halves of 100 and 250 brightened by f (100 f read from the dark half) are 100 f and
    min(255, 250 f): uint8 cast without the clip wraps 250 * 1.2 to 44. f spreads over
    1 -+ brightness, drawn apart from contrast's factor (one key would tie the two)."""
    images = np.full((32, 8, 8, 3), 100, np.uint8)
    images[:, :, 4:] = 250
    masks = np.zeros((32, 8, 8, 1), np.uint8)
    out, _ = _augmented(images, masks, _aug(brightness=0.5))
    factors = out[:, :, :4].mean(axis=(1, 2, 3)) / 100
    high = out[:, :, 4:].astype(float)
    expected = np.minimum(255, 250 * factors)[:, None, None, None]
    np.testing.assert_allclose(high, np.broadcast_to(expected, high.shape), atol=1.5)
    assert 0.495 <= factors.min() < 0.8 and 1.2 < factors.max() <= 1.505, factors
    out, _ = _augmented(images, masks, _aug(contrast=0.5))  # distances from the mean, 175
    contrasts = (175 - out[:, :, :4].mean(axis=(1, 2, 3))) / 75
    assert np.abs(factors - contrasts).max() > 0.1


def test_zoom_and_flip_are_drawn_apart_over_the_zoom_range():
    """A ramp 3 * column zoomed by z and perhaps flipped has gradient +-3 / z along the row: each
    example's zoom and flip read from it. Zooms spread over [scale_min, scale_max], and flipped
    and unflipped examples each zoom both in and out (a flip drawn from the zoom's key flips
    exactly the zoomed-out ones)."""
    size, c = 64, 31.5
    ramp = np.broadcast_to(3 * np.arange(size, dtype=np.uint8), (size, size))
    images = np.repeat(np.repeat(ramp[None, ..., None], 3, axis=-1), 48, axis=0)
    masks = np.zeros((48, size, size, 1), np.uint8)
    out_images, _ = _augmented(images, masks, _aug(scale_min=0.75, scale_max=1.25, hflip=True))
    yy, xx = np.mgrid[:size, :size] - c
    inside = np.hypot(yy, xx) <= 20  # its source lies inside the photo at every zoom
    design = np.stack([np.ones(inside.sum()), xx[inside]], axis=1)
    gradients = np.array([np.linalg.lstsq(design, out[inside], rcond=None)[0][1]
                          for out in out_images[..., 0].astype(float)])
    zooms, flipped = 3 / np.abs(gradients), gradients < 0
    assert 0.745 <= zooms.min() < 0.85 and 1.15 < zooms.max() <= 1.255, zooms
    for group in (zooms[flipped], zooms[~flipped]):
        assert len(group) >= 12 and group.min() < 0.95 and group.max() > 1.05, (zooms, flipped)
