"""Losses against numpy references: the boundary band and the (boundary-weighted) cross-entropy."""
import numpy as np
import pytest

from jaxseg import losses


def numpy_band(mask, radius):
    """1 where the (2r+1)^2 window around a pixel (clipped at the border) holds both classes."""
    h, w = mask.shape
    band = np.zeros((h, w), np.float32)
    for y in range(h):
        for x in range(w):
            win = mask[max(0, y - radius):y + radius + 1, max(0, x - radius):x + radius + 1]
            band[y, x] = win.min() != win.max()
    return band


def numpy_bce(logits, target):
    p = 1 / (1 + np.exp(-logits.astype(np.float64)))
    return -(target * np.log(p) + (1 - target) * np.log(1 - p))


@pytest.fixture
def example():
    rng = np.random.default_rng(0)
    masks = np.zeros((3, 12, 10, 1), np.uint8)
    masks[0, 3:9, 2:7] = 1
    masks[1, :, 5:] = 1  # an edge that touches the image border
    masks[2, 4:6, 4:6] = 1
    logits = rng.normal(size=(3, 12, 10, 1)).astype(np.float32)
    return logits, masks


@pytest.mark.parametrize("radius", [1, 2])
def test_boundary_band_matches_numpy(example, radius):
    _, masks = example
    band = np.asarray(losses.boundary_band(masks, radius))
    for b in range(masks.shape[0]):
        np.testing.assert_array_equal(band[b], numpy_band(masks[b, ..., 0], radius))


@pytest.mark.parametrize("boundary_weight", [0.0, 3.0])
def test_cross_entropy_matches_weighted_numpy_mean(example, boundary_weight):
    logits, masks = example
    valid = np.array([1, 0, 1], np.float32)  # the middle example is padding
    got = float(losses.cross_entropy(logits, masks, valid, boundary_weight=boundary_weight,
                                     boundary_radius=1))
    num = den = 0.0
    for b in (0, 2):
        w = 1 + boundary_weight * numpy_band(masks[b, ..., 0], 1)
        num += np.sum(w * numpy_bce(logits[b, ..., 0], masks[b, ..., 0]))
        den += np.sum(w)
    assert got == pytest.approx(num / den, rel=1e-5)


def test_boundary_weight_raises_the_loss_of_edge_errors(example):
    """Logits right everywhere except in the band: weighting the band must raise the loss."""
    _, masks = example
    band = np.asarray(losses.boundary_band(masks, 1))[..., None]
    logits = np.where(masks > 0, 4.0, -4.0) * np.where(band > 0, -1.0, 1.0)
    valid = np.ones(3, np.float32)
    plain = float(losses.cross_entropy(logits, masks, valid))
    weighted = float(losses.cross_entropy(logits, masks, valid, boundary_weight=3.0,
                                          boundary_radius=1))
    assert weighted > plain


def test_two_logit_softmax_weighs_the_band_like_the_sigmoid(example):
    """Logits (-z/2, z/2) under softmax are the sigmoid of z: both heads must give one loss."""
    logits, masks = example
    two = np.concatenate([-logits / 2, logits / 2], axis=-1)
    valid = np.ones(3, np.float32)
    kwargs = dict(boundary_weight=3.0, boundary_radius=1)
    assert float(losses.cross_entropy(two, masks, valid, **kwargs)) == pytest.approx(
        float(losses.cross_entropy(logits, masks, valid, **kwargs)), rel=1e-5)
