"""On-device augmentation: copy-paste against a numpy reference of the same composition."""
import jax
import numpy as np
import pytest

from jaxseg import device_augment


def batch(b=5, size=8, seed=0):
    rng = np.random.default_rng(seed)
    images = rng.integers(0, 256, (b, size, size, 3), dtype=np.uint8)
    masks = (rng.random((b, size, size, 1)) < 0.4).astype(np.uint8)
    return images, masks


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


def test_probability_zero_changes_nothing_and_a_half_pastes_some():
    images, masks = batch(b=64, size=4)
    valid = np.ones(64, np.float32)
    same = device_augment.copy_paste(jax.random.key(0), images, masks, valid, 0.0)
    np.testing.assert_array_equal(same[0], images)
    np.testing.assert_array_equal(same[1], masks)
    _, half_masks = device_augment.copy_paste(jax.random.key(0), images, masks, valid, 0.5)
    changed = np.any(np.asarray(half_masks) != masks, axis=(1, 2, 3))
    assert 16 < changed.sum() < 48  # ~32 of 64 receive a donor (every donor here has a person)
