"""Metric counts against a plain numpy/scipy reference; the resolution rule against OpenCV."""
import cv2
import jax.numpy as jnp
import numpy as np
import pytest
from scipy import ndimage

import fixtures_data as fx
from jaxseg import metrics, resolution


def numpy_boundary(mask, region):
    outside = ~mask & region
    near_outside = ndimage.maximum_filter(outside.astype(np.uint8), size=3, mode="constant") > 0
    return mask & near_outside


def numpy_counts(pred, target, region, tol):
    pred, target = pred & region, target & region
    pb, tb = numpy_boundary(pred, region), numpy_boundary(target, region)
    dil = lambda b: ndimage.maximum_filter(b.astype(np.uint8), size=2 * tol + 1, mode="constant") > 0
    return {
        "tp": (pred & target).sum(), "fp": (pred & ~target).sum(),
        "fn": (~pred & target).sum(), "tn": (~pred & ~target & region).sum(),
        "pred_boundary": pb.sum(), "pred_boundary_hit": (pb & dil(tb)).sum(),
        "true_boundary": tb.sum(), "true_boundary_hit": (tb & dil(pb)).sum(),
        "fp_near_edge": (pred & ~target & dil(tb)).sum(),
        "fn_near_edge": (~pred & target & dil(tb)).sum(),
    }


def random_masks(rng, b, h, w):
    # Smooth blobs rather than salt noise, so boundaries look like real masks.
    noise = rng.normal(size=(b, h, w))
    smooth = np.stack([ndimage.gaussian_filter(n, 2.0) for n in noise])
    return smooth > 0


def test_counts_match_numpy_reference():
    rng = np.random.default_rng(0)
    pred, target = random_masks(rng, 4, 37, 29), random_masks(rng, 4, 37, 29)
    region = np.ones_like(pred)
    region[1, 30:, :] = False
    region[2, :, 20:] = False
    got = metrics.per_image_counts(jnp.asarray(pred), jnp.asarray(target), jnp.asarray(region), 2)
    for i in range(4):
        ref = numpy_counts(pred[i], target[i], region[i], 2)
        for k in metrics.COUNT_KEYS:
            assert int(got[k][i]) == ref[k], (k, i)


def test_metrics_from_counts_match_numpy():
    rng = np.random.default_rng(1)
    pred, target = random_masks(rng, 3, 20, 20), random_masks(rng, 3, 20, 20)
    region = np.ones_like(pred)
    counts = {k: np.asarray(v) for k, v in metrics.per_image_counts(
        jnp.asarray(pred), jnp.asarray(target), jnp.asarray(region), 1).items()}
    m = metrics.metrics_from_counts(counts)
    inter, union = (pred & target).sum(), (pred | target).sum()
    assert m["iou"] == pytest.approx(inter / union)
    assert m["mean_image_iou"] == pytest.approx(
        np.mean([(p & t).sum() / (p | t).sum() for p, t in zip(pred, target)]))
    assert m["precision"] == pytest.approx(inter / pred.sum())
    assert m["recall"] == pytest.approx(inter / target.sum())
    assert m["dice"] == pytest.approx(2 * inter / (pred.sum() + target.sum()))
    assert m["pixel_accuracy"] == pytest.approx((pred == target).mean())
    bg = ((~pred) & (~target)).sum() / ((~pred) | (~target)).sum()
    assert m["miou"] == pytest.approx((inter / union + bg) / 2)
    # Edge errors by another route: chessboard distance to the true boundary, and the IoU of
    # the prediction with every pixel near that boundary set right.
    near = np.stack([ndimage.distance_transform_cdt(~numpy_boundary(t, r), metric="chessboard")
                     <= 1 for t, r in zip(target, region)])
    wrong = pred != target
    assert m["near_edge_error_share"] == pytest.approx((wrong & near).sum() / wrong.sum())
    mended = np.where(near, target, pred)
    assert m["iou_without_edge_errors"] == pytest.approx(
        (mended & target).sum() / (mended | target).sum())
    assert 0 < m["near_edge_error_share"] < 1 and m["iou_without_edge_errors"] > m["iou"]
    # Boundary F1 from the numpy boundaries: the harmonic mean of the split's boundary precision
    # and recall (each boundary pixel within the tolerance of the other mask's boundary).
    ref = [numpy_counts(p, t, r.astype(bool), 1) for p, t, r in zip(pred, target, region)]
    bp = sum(c["pred_boundary_hit"] for c in ref) / sum(c["pred_boundary"] for c in ref)
    br = sum(c["true_boundary_hit"] for c in ref) / sum(c["true_boundary"] for c in ref)
    assert 0 < bp < 1 and 0 < br < 1 and bp != br
    assert m["boundary_f1"] == pytest.approx(2 * bp * br / (bp + br))


def test_perfect_and_empty_predictions():
    rng = np.random.default_rng(2)
    target = jnp.asarray(random_masks(rng, 2, 24, 24))
    region = jnp.ones_like(target)
    perfect = metrics.metrics_from_counts(metrics.per_image_counts(target, target, region, 1))
    assert perfect["iou"] == 1.0 and perfect["boundary_f1"] == 1.0 and perfect["dice"] == 1.0
    assert perfect["near_edge_error_share"] == 0.0 and perfect["iou_without_edge_errors"] == 1.0
    empty = metrics.metrics_from_counts(
        metrics.per_image_counts(jnp.zeros_like(target), target, region, 1))
    assert empty["iou"] == 0.0 and empty["recall"] == 0.0


def test_upsample_to_sizes_matches_opencv_bilinear():
    rng = np.random.default_rng(3)
    probs = rng.random((3, 16, 16)).astype(np.float32)
    sizes = np.array([[40, 24], [23, 37], [7, 31]], np.int32)  # a photo smaller than the map too
    canvas = resolution.canvas_for(sizes, multiple=8)
    out = np.asarray(resolution.upsample_to_sizes(jnp.asarray(probs), jnp.asarray(sizes), canvas))
    for i, (h, w) in enumerate(sizes):
        ref = cv2.resize(probs[i], (int(w), int(h)), interpolation=cv2.INTER_LINEAR)
        np.testing.assert_allclose(out[i, :h, :w], ref, atol=1e-4)
        assert not out[i, h:, :].any() and not out[i, :, w:].any()


def test_photos_sit_top_left_on_the_canvas_inside_their_region():
    """pad_to_canvas keeps the photo at the top left with zeros below and right, where
    region_mask, the pixels that are scored, ends: row h and column w are already outside."""
    rng = np.random.default_rng(5)
    sizes = np.array([[5, 7], [8, 3]], np.int32)
    canvas = (8, 8)
    region = np.asarray(resolution.region_mask(jnp.asarray(sizes), canvas))
    for (h, w), got in zip(sizes, region):
        photo = rng.integers(1, 256, (h, w, 3), dtype=np.uint8)
        padded = resolution.pad_to_canvas(photo, canvas)
        assert padded.shape == (8, 8, 3)
        np.testing.assert_array_equal(padded[:h, :w], photo)
        expected = np.zeros(canvas, bool)
        expected[:h, :w] = True
        np.testing.assert_array_equal(padded.any(-1), expected)
        np.testing.assert_array_equal(got, expected)
    for shape in ((9, 8), (8, 9)):
        with pytest.raises(ValueError, match="does not fit the canvas 8x8"):
            resolution.pad_to_canvas(np.ones(shape, np.uint8), canvas)


def test_model_inputs_average_when_shrinking_and_interpolate_when_growing():
    """Columns 255, 0, 0, 0 over and over: shrunk 4x each output pixel is their mean (64), not a
    sample (bilinear would give 0); grown 2x, OpenCV's bilinear."""
    from jaxseg import resolution

    stripes = np.tile(np.array([255, 0, 0, 0], np.uint8)[None, :, None], (128, 32, 3))
    np.testing.assert_array_equal(resolution.resize_image(stripes, 32), 64)
    small = np.random.default_rng(0).integers(0, 256, (16, 16, 3), dtype=np.uint8)
    np.testing.assert_array_equal(resolution.resize_image(small, 32),
                                  cv2.resize(small, (32, 32), interpolation=cv2.INTER_LINEAR))


def test_the_canvas_is_the_smallest_multiple_holding_every_photo():
    """A photo whose sides are already multiples fits a canvas of its own size, not one larger."""
    for multiple in (8, 64):
        for h, w in [(64, 128), (65, 1), (1, 64), (127, 129), (128, 128)]:
            canvas = resolution.canvas_for([(h, w), (h // 2 + 1, w // 2 + 1)], multiple)
            for side, size in zip(canvas, (h, w)):
                assert side % multiple == 0 and size <= side < size + multiple, (h, w, canvas)


def test_masks_resized_to_the_model_stay_centred_on_their_images():
    """resize_mask samples pixel centres, as resize_image's area average weighs them: over 20
    rectangles shrunk from 450x600 to 64x64, the centre of mass matches an area-resized (exact)
    copy's within 0.1 pixel (the blocks' top-left pixels put it about half a pixel off)."""
    def small(mask):
        resized = resolution.resize_mask(mask, 64)
        assert resized.shape == (64, 64, 1)
        return resized

    shift = fx.mean_centre_shift(small, (64, 64), seed=2)
    assert np.abs(shift).max() < 0.1, shift


def test_boundary_tolerance_scales_with_diagonal():
    assert metrics.boundary_tolerance(600, 800) == 8
    assert metrics.boundary_tolerance(16, 16) == 1


def test_empty_masks_score_what_could_not_be_wrong():
    """Per image, a person-free photo with nothing predicted scores 1 (IoU and Dice); over a
    split, nothing predicted has no false positives (precision 1) and no person to find means
    nothing missed (recall 1)."""
    rng = np.random.default_rng(4)
    pred, target = random_masks(rng, 2, 24, 24), random_masks(rng, 2, 24, 24)
    pred[0], target[0] = False, False
    region = jnp.ones(pred.shape, bool)
    counts = metrics.per_image_counts(jnp.asarray(pred), jnp.asarray(target), region, 1)
    inter, p, t = (pred[1] & target[1]).sum(), pred[1].sum(), target[1].sum()
    np.testing.assert_allclose(metrics.image_iou(counts), [1.0, inter / (pred[1] | target[1]).sum()])
    np.testing.assert_allclose(metrics.image_dice(counts), [1.0, 2 * inter / (p + t)])
    nothing = metrics.metrics_from_counts(
        metrics.per_image_counts(jnp.zeros_like(target), jnp.asarray(target), region, 1))
    assert nothing["precision"] == 1.0 and nothing["recall"] == 0.0
    no_person = metrics.metrics_from_counts(
        metrics.per_image_counts(jnp.asarray(pred), jnp.zeros_like(target), region, 1))
    assert no_person["recall"] == 1.0 and no_person["precision"] == 0.0
    # Person-free photos with nothing predicted: no edge to miss or to invent.
    blank = jnp.zeros_like(target)
    assert metrics.metrics_from_counts(
        metrics.per_image_counts(blank, blank, region, 1))["boundary_f1"] == 1.0


def test_edges_far_from_every_true_edge_score_zero_boundary_f1():
    """A person predicted in the wrong corner: every edge pixel misses (precision and recall 0),
    so the split's boundary F1 is 0, not the score of a split without edges."""
    pred, target = np.zeros((1, 40, 40), bool), np.zeros((1, 40, 40), bool)
    pred[0, 2:10, 2:10], target[0, 25:35, 25:35] = True, True
    region = jnp.ones(pred.shape, bool)
    m = metrics.metrics_from_counts(
        metrics.per_image_counts(jnp.asarray(pred), jnp.asarray(target), region, 1))
    assert m["boundary_f1"] == 0.0 and m["iou"] == 0.0
