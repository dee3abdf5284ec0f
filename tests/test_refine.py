"""The guided-filter refinement against a per-pixel numpy reference, and what it is for."""
import cv2
import jax.numpy as jnp
import numpy as np

from guided_filter_reference import reference_coefficients
from jaxseg import refine


def test_coefficients_match_a_per_window_numpy_reference():
    rng = np.random.default_rng(0)
    guide = rng.integers(0, 256, (2, 11, 9, 3), dtype=np.uint8)
    probs = rng.random((2, 11, 9)).astype(np.float32)
    for radius, eps in ((1, 1e-2), (2, 1e-4), (6, 1e-3)):  # 6: windows wider than the image
        a, b = refine.guided_coefficients(jnp.asarray(guide), jnp.asarray(probs),
                                          radius=radius, eps=eps)
        for k in range(2):
            ref_a, ref_b = reference_coefficients(guide[k], probs[k], radius, eps)
            np.testing.assert_allclose(np.asarray(a[k]), ref_a, atol=2e-3, rtol=1e-3)
            np.testing.assert_allclose(np.asarray(b[k]), ref_b, atol=2e-3, rtol=1e-3)


def test_mask_snaps_to_the_photo_edge_that_bilinear_upsampling_blurs():
    # A photo 320 px wide with a sharp person/background colour edge at column 131, and
    # model-resolution (32 px) probabilities as a low-resolution model gives them: a soft step
    # whose 0.5 crossing sits 1.5 model pixels (15 photo pixels) left of the edge. (Errors beyond
    # the filter's radius are the model's to fix, not the filter's.)
    height, width, size, edge = 64, 320, 32, 131
    photo = np.zeros((height, width, 3), np.uint8)
    photo[:, :edge] = (200, 150, 120)
    photo[:, edge:] = (40, 90, 60)
    columns = (np.arange(size) + 0.5) * width / size
    probs = 1 / (1 + np.exp((columns - (edge - 15)) / 12))
    probs = np.broadcast_to(probs, (size, size)).astype(np.float32)
    guide = cv2.resize(photo, (size, size), interpolation=cv2.INTER_AREA)
    canvas = (height, width)
    sizes = jnp.array([[height, width]], jnp.int32)
    refined = refine.refined_probabilities(jnp.asarray(guide[None]), jnp.asarray(probs[None]),
                                           jnp.asarray(photo[None]), sizes, canvas)[0]
    plain = cv2.resize(probs, (width, height), interpolation=cv2.INTER_LINEAR)
    assert np.flatnonzero(plain[height // 2] < 0.5)[0] < edge - 10  # the blur misses the edge
    crossing = np.flatnonzero(np.asarray(refined)[height // 2] < 0.5)[0]
    assert abs(crossing - edge) <= 1
    assert float(refined.min()) >= 0 and float(refined.max()) <= 1


def test_outside_the_image_region_is_zero():
    rng = np.random.default_rng(1)
    guide = rng.integers(0, 256, (2, 16, 16, 3), dtype=np.uint8)
    probs = rng.random((2, 16, 16)).astype(np.float32)
    photos = rng.integers(0, 256, (2, 40, 48, 3), dtype=np.uint8)
    sizes = jnp.array([[40, 48], [25, 30]], jnp.int32)
    out = np.asarray(refine.refined_probabilities(jnp.asarray(guide), jnp.asarray(probs),
                                                  jnp.asarray(photos), sizes, (40, 48)))
    assert out.shape == (2, 40, 48)
    assert np.all(out[1, 25:] == 0) and np.all(out[1, :, 30:] == 0)
    assert out[1, :25, :30].max() > 0


def test_refined_probabilities_apply_the_upsampled_fit_to_the_photo_and_stay_probabilities():
    """Against numpy: the reference coefficients, upsampled bilinearly (OpenCV) to the photo's
    size and applied to its RGB colours, clipped to [0, 1]. The fit extrapolates past 1 on this
    photo, which a soft mask of 255 * p would wrap around in uint8 unclipped."""
    rng = np.random.default_rng(2)
    size, height, width = 12, 30, 44
    guide = cv2.GaussianBlur(rng.integers(0, 256, (size, size, 3), dtype=np.uint8), (3, 3), 0)
    probs = rng.random((size, size)).astype(np.float32)
    photo = rng.integers(0, 256, (height, width, 3), dtype=np.uint8)
    a, b = reference_coefficients(guide, probs, refine.RADIUS, refine.EPS)
    coefficients = np.concatenate([a, b[..., None]], -1).astype(np.float32)
    up = cv2.resize(coefficients, (width, height), interpolation=cv2.INTER_LINEAR)
    fitted = up[..., 3] + (up[..., :3] * (photo / 255.0)).sum(-1)
    assert fitted.max() > 1.01  # the clipping is exercised
    out = refine.refined_probabilities(jnp.asarray(guide[None]), jnp.asarray(probs[None]),
                                       jnp.asarray(photo[None]), jnp.array([[height, width]]),
                                       (height, width))
    np.testing.assert_allclose(np.asarray(out)[0], np.clip(fitted, 0, 1), atol=1e-3)


def test_full_resolution_refines_with_the_given_radius_and_eps_or_upsamples_plainly():
    """The (radius, eps) that evaluation and prediction pass reach the filter (against the numpy
    reference with a radius and eps other than the defaults); without refinement the map is
    OpenCV's bilinear upsampling."""
    rng = np.random.default_rng(3)
    size, height, width = 10, 23, 31
    guide = cv2.GaussianBlur(rng.integers(0, 256, (size, size, 3), dtype=np.uint8), (3, 3), 0)
    probs = rng.random((size, size)).astype(np.float32)
    photo = rng.integers(0, 256, (height, width, 3), dtype=np.uint8)
    args = (jnp.asarray(guide[None]), jnp.asarray(probs[None]), jnp.asarray(photo[None]),
            jnp.array([[height, width]]), (height, width))
    radius, eps = 1, 1e-2
    a, b = reference_coefficients(guide, probs, radius, eps)
    up = cv2.resize(np.concatenate([a, b[..., None]], -1).astype(np.float32), (width, height),
                    interpolation=cv2.INTER_LINEAR)
    fitted = np.clip(up[..., 3] + (up[..., :3] * (photo / 255.0)).sum(-1), 0, 1)
    np.testing.assert_allclose(np.asarray(refine.full_resolution(*args, (radius, eps)))[0], fitted,
                               atol=1e-3)
    plain = cv2.resize(probs, (width, height), interpolation=cv2.INTER_LINEAR)
    np.testing.assert_allclose(np.asarray(refine.full_resolution(*args, None))[0], plain, atol=1e-4)
