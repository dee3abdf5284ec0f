"""Small in-memory sources with the same example layout as the dataset builders."""
import numpy as np


def fake_source(n, seed=0, min_size=40, max_size=90):
    """n examples of random size with a rectangular 'person' a little brighter than the rest."""
    rng = np.random.default_rng(seed)
    out = []
    for i in range(n):
        h, w = (int(v) for v in rng.integers(min_size, max_size, 2))
        image = rng.integers(0, 150, (h, w, 3), dtype=np.uint8)
        mask = np.zeros((h, w, 1), np.uint8)
        y0, x0 = rng.integers(0, h // 2), rng.integers(0, w // 2)
        mask[y0:y0 + h // 2, x0:x0 + w // 3] = 1
        image[mask[..., 0] > 0] += 100
        out.append({"image": image, "mask": mask, "id": f"s{seed}_{i:04d}", "source": "fake"})
    return out
