"""Losses against numpy references: the boundary band, the (boundary-weighted) cross-entropy, soft
Dice, the Lovász hinge and their weighted sum."""
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


def numpy_soft_dice(logits, masks, valid):
    """Mean over valid images of 1 - (2 |p t| + 1) / (|p| + |t| + 1), p the sigmoid."""
    losses_ = []
    for b in np.flatnonzero(valid):
        p = 1 / (1 + np.exp(-logits[b, ..., 0].astype(np.float64)))
        t = masks[b, ..., 0].astype(np.float64)
        losses_.append(1 - (2 * np.sum(p * t) + 1) / (np.sum(p) + np.sum(t) + 1))
    return np.mean(losses_)


def test_soft_dice_and_the_weighted_sum_match_numpy(example):
    logits, masks = example
    valid = np.array([1, 0, 1], np.float32)
    dice = numpy_soft_dice(logits, masks, valid)
    assert float(losses.soft_dice(logits, masks, valid)) == pytest.approx(dice, rel=1e-5)
    ce = float(losses.cross_entropy(logits, masks, valid))
    loss, parts = losses.segmentation_loss(logits, masks, valid, ce_weight=0.3, dice_weight=2.0)
    assert float(parts["dice_loss"]) == pytest.approx(dice, rel=1e-5)
    assert float(loss) == pytest.approx(0.3 * ce + 2.0 * dice, rel=1e-5)


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


def numpy_iou_loss(masks, predicted):
    """1 - IoU per image from boolean arrays, 0 where both are empty."""
    t, p = masks[..., 0].astype(bool), predicted.astype(bool)
    inter = (t & p).sum(axis=(1, 2))
    union = (t | p).sum(axis=(1, 2))
    return np.where(union > 0, 1 - inter / np.maximum(union, 1), 0.0)


@pytest.mark.parametrize("heads", [1, 2])
def test_lovasz_hinge_on_unit_errors_is_one_minus_iou(example, heads):
    # The Lovász extension agrees with the set function on indicator vectors: with each pixel's
    # hinge error exactly 0 (logit = +-1 on the right side) or 1 (logit 0, counted as wrong),
    # the loss is 1 - IoU of the prediction that gets the error pixels wrong.
    _, masks = example
    rng = np.random.default_rng(1)
    wrong = rng.random(masks.shape[:3]) < 0.3
    sign = 2.0 * masks[..., 0] - 1.0
    z = np.where(wrong, 0.0, sign).astype(np.float32)
    logits = z[..., None] if heads == 1 else np.stack([-z / 2, z / 2], axis=-1)
    predicted = np.where(wrong, 1 - masks[..., 0], masks[..., 0])
    valid = np.array([1, 1, 0], np.float32)
    got = float(losses.lovasz_hinge(logits, masks, valid))
    np.testing.assert_allclose(got, numpy_iou_loss(masks, predicted)[:2].mean(), rtol=1e-5)


def test_lovasz_hinge_is_zero_beyond_the_margin_and_grows_with_errors(example):
    _, masks = example
    sign = (2.0 * masks - 1.0).astype(np.float32)
    valid = np.ones(3, np.float32)
    assert float(losses.lovasz_hinge(3 * sign, masks, valid)) == 0.0
    wrong_once = 3 * sign
    wrong_once[0, 5, 4] *= -1
    wrong_twice = wrong_once.copy()
    wrong_twice[0, 0, 0] *= -1
    one = float(losses.lovasz_hinge(wrong_once, masks, valid))
    two = float(losses.lovasz_hinge(wrong_twice, masks, valid))
    assert 0 < one < two


def test_lovasz_weight_adds_the_hinge_to_the_loss(example):
    logits, masks = example
    valid = np.ones(3, np.float32)
    base, parts = losses.segmentation_loss(logits, masks, valid)
    mixed, mixed_parts = losses.segmentation_loss(logits, masks, valid, lovasz_weight=0.5)
    assert "lovasz_loss" not in parts
    # The hinge checked against numpy above, of these logits (not, say, of their negation).
    hinge = float(losses.lovasz_hinge(logits, masks, valid))
    assert float(mixed_parts["lovasz_loss"]) == hinge
    np.testing.assert_allclose(float(mixed), float(base) + 0.5 * hinge, rtol=1e-6)


def test_gradients_match_numpy_derivatives(example):
    """Training follows the gradients, not the values: the cross-entropy's is (sigmoid(z) - t)
    over the number of valid pixels; the Lovász hinge's is -sign times the Jaccard increment at
    each pixel's rank by error (descending), where the hinge is active (Berman et al.'s rule)."""
    import jax

    logits, masks = example
    valid = np.array([1, 0, 1], np.float32)
    z, t = logits[..., 0].astype(np.float64), masks[..., 0].astype(np.float64)
    w = valid[:, None, None]
    got = np.asarray(jax.grad(lambda x: losses.cross_entropy(x, masks, valid))(logits))[..., 0]
    ref = (1 / (1 + np.exp(-z)) - t) * w / (w.sum() * z[0].size)
    np.testing.assert_allclose(got, ref, rtol=1e-4, atol=1e-7)

    got = np.asarray(jax.grad(lambda x: losses.lovasz_hinge(x, masks, valid))(logits))[..., 0]
    ref = np.zeros_like(z)
    for b in np.flatnonzero(valid):
        s = (2 * t[b] - 1).ravel()
        errors = 1 - z[b].ravel() * s
        order = np.argsort(-errors)
        ts = t[b].ravel()[order]
        jaccard = 1 - (ts.sum() - np.cumsum(ts)) / (ts.sum() + np.cumsum(1 - ts))
        increments = np.diff(jaccard, prepend=0.0)
        g = np.zeros(errors.size)
        g[order] = -s[order] * increments * (errors[order] > 0)
        ref[b] = g.reshape(z[b].shape) / valid.sum()
    np.testing.assert_allclose(got, ref, rtol=1e-4, atol=1e-7)
