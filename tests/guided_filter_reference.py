"""An independent reference for jaxseg.refine: the colour guided filter, window by window."""
import numpy as np


def reference_coefficients(guide, probs, radius, eps):
    """He et al.'s colour guided filter, window by window (windows cut at the borders)."""
    image = guide.astype(np.float64) / 255
    h, w = probs.shape

    def window(i, j):
        return slice(max(0, i - radius), i + radius + 1), slice(max(0, j - radius), j + radius + 1)

    a = np.zeros((h, w, 3))
    b = np.zeros((h, w))
    for i in range(h):
        for j in range(w):
            rows, cols = window(i, j)
            colours = image[rows, cols].reshape(-1, 3)
            values = probs[rows, cols].reshape(-1)
            mean_i, mean_p = colours.mean(0), values.mean()
            sigma = (colours - mean_i).T @ (colours - mean_i) / len(values)
            cov = (colours - mean_i).T @ (values - mean_p) / len(values)
            a[i, j] = np.linalg.solve(sigma + eps * np.eye(3), cov)
            b[i, j] = mean_p - a[i, j] @ mean_i
    mean_a, mean_b = np.zeros_like(a), np.zeros_like(b)
    for i in range(h):
        for j in range(w):
            rows, cols = window(i, j)
            mean_a[i, j] = a[rows, cols].reshape(-1, 3).mean(0)
            mean_b[i, j] = b[rows, cols].mean()
    return mean_a, mean_b
