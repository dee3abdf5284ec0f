"""Small in-memory sources with the same example layout as the dataset builders, and a tiny config."""
import numpy as np

from configs import smoke


def tiny_config(overrides=None):
    """The smoke config at 32 px with a depth-2, width-4 U-Net (seconds to build and step);
    `overrides` maps dotted field names to values."""
    c = smoke.get_config()
    c.data.image_size = 32
    c.model.depth, c.model.base_features = 2, 4
    if overrides is not None:
        c.update_from_flattened_dict(overrides)
    return c


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
