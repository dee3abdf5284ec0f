"""Training batches are a pure function of (seed, step); evaluation covers each example once."""
import collections

import jax
import ml_collections
import numpy as np
import pytest

from fake_data import fake_source
from jaxseg import input_pipeline, mixture, sharding


def aug_config(enabled=True):
    return ml_collections.ConfigDict(dict(
        enabled=enabled, scale_min=0.75, scale_max=1.25, max_shift=0.1, rotate_degrees=10.0,
        hflip=True, brightness=0.2, contrast=0.2, saturation=0.2))


def batches(sources, start=0, slots=None, batch=8):
    return input_pipeline.TrainBatches(sources, [1, 1], global_batch=batch, image_size=32,
                                       aug=aug_config(), seed=3, start_step=start, slots=slots)


def test_mixture_counts_and_parsing():
    assert mixture.mixture_counts([1, 1], 8) == [4, 4]
    assert mixture.mixture_counts([3, 1], 8) == [6, 2]
    assert mixture.mixture_counts([1, 3], 8) == [2, 6]  # was [3, 5]: skewed by the order
    assert mixture.mixture_counts([9, 1], 10) == [9, 1]  # was [8, 2]
    assert mixture.mixture_counts([100, 1, 1], 3) == [1, 1, 1]  # at least one each
    for weights, batch in (([1, 2, 7], 16), ([5, 3, 1], 12), ([2, 9], 7)):
        counts = mixture.mixture_counts(weights, batch)
        assert sum(counts) == batch and min(counts) >= 1
        exact = np.asarray(weights) / sum(weights) * batch
        assert np.all(np.abs(np.asarray(counts) - exact) < 1), (weights, counts)
        assert mixture.mixture_counts(weights[::-1], batch) == counts[::-1]
    assert mixture.parse_mixture("a:2, b") == [("a", 2.0), ("b", 1.0)]
    for bad in ("a:0", "a:nan", "a:inf", "a:-1"):
        with pytest.raises(ValueError, match="must be a positive number"):
            mixture.parse_mixture(bad)
    with pytest.raises(ValueError, match="'a' is named twice"):
        mixture.parse_mixture("a:1, b, a:1")


def test_resumed_and_sliced_batches_equal_the_uninterrupted_stream():
    sources = [fake_source(11, 0), fake_source(7, 1)]
    full = batches(sources)
    stream = [next(full) for _ in range(6)]
    resumed = batches(sources, start=4)
    for step in (4, 5):
        b = next(resumed)
        np.testing.assert_array_equal(b["image"], stream[step]["image"])
        np.testing.assert_array_equal(b["mask"], stream[step]["mask"])
    # Two "processes" each decoding half of the slots rebuild the same global batch.
    halves = [next(batches(sources, start=2, slots=slice(0, 4))),
              next(batches(sources, start=2, slots=slice(4, 8)))]
    np.testing.assert_array_equal(np.concatenate([h["image"] for h in halves]), stream[2]["image"])
    for b in (full, resumed):
        b.close()


def test_each_epoch_visits_every_example_once():
    sources = [fake_source(8, 0), fake_source(12, 1)]
    tb = batches(sources)
    seen = collections.Counter(tb.example_at(step, slot) for step in range(2) for slot in range(8))
    assert sorted(i for d, i in seen if d == 0) == list(range(8))
    assert all(v == 1 for v in seen.values())
    tb.close()


def test_each_epoch_is_shuffled_anew():
    tb = batches([fake_source(8, 0), fake_source(12, 1)])  # 4 slots of dataset 0 a step
    order = [tb.example_at(step, slot)[1] for step in range(4) for slot in range(8)
             if tb.example_at(step, slot)[0] == 0]
    first, second = order[:8], order[8:]
    assert sorted(first) == sorted(second) == list(range(8)) and first != second
    tb.close()


def test_each_slot_of_a_step_is_augmented_its_own_way():
    """Augmentation is keyed by (seed, step, slot): one zoom, turn and flip for a whole batch
    would show the model eight times fewer variations."""
    from jaxseg import preprocess

    example = fake_source(1, 0)[0]
    images = [preprocess.train_example(example, 32, aug_config(), 3, 5, slot)[0]
              for slot in (0, 1, 0)]
    np.testing.assert_array_equal(images[0], images[2])  # a pure function
    assert not np.array_equal(images[0], images[1])


def centroid(weights: np.ndarray) -> np.ndarray:
    """(row, column) centre of mass of a 2-D array."""
    grid = np.mgrid[:weights.shape[0], :weights.shape[1]]
    return (grid * weights).reshape(2, -1).sum(1) / weights.sum()


@pytest.mark.parametrize("augmented", [False, True])
def test_image_and_mask_stay_aligned_through_resize_and_augmentation(augmented):
    """White rectangles on black, their masks the same, in 150x200 photos shrunk to 64x64: on
    average over 32 rectangles the mask's centre of mass sits on the image's within 0.1 model
    pixel (a single one is off by up to half a pixel, where its edges round to whole pixels; masks
    resized by their blocks' top-left pixels were half a pixel below and right on average), and
    each mask covers its bright pixels. Flips included, whose mirror moves a misplaced mask."""
    rng = np.random.default_rng(0)
    source = []
    for i in range(32):
        top, left = rng.integers(10, 60), rng.integers(10, 90)
        image = np.zeros((150, 200, 3), np.uint8)
        image[top:top + rng.integers(30, 80), left:left + rng.integers(30, 100)] = 255
        source.append({"image": image, "mask": (image[..., :1] > 0).astype(np.uint8),
                       "id": str(i), "source": "fake"})
    aug = aug_config(enabled=augmented)
    aug.brightness = aug.contrast = aug.saturation = 0.0
    tb = input_pipeline.TrainBatches([source], [1], global_batch=8, image_size=64, aug=aug, seed=0)
    shifts = []
    for _ in range(4):
        b = next(tb)
        for image_row, mask_row in zip(b["image"][..., 0], b["mask"][..., 0]):
            shifts.append(centroid(mask_row.astype(float)) - centroid(image_row / 255.0))
            assert ((image_row > 127) == (mask_row > 0)).mean() > 0.97
    assert np.abs(np.mean(shifts, axis=0)).max() < 0.1, np.mean(shifts, axis=0)
    tb.close()


@pytest.mark.parametrize("num_devices", [1, 3, 8])
def test_eval_covers_each_example_once(num_devices):
    source = fake_source(13)
    mesh = sharding.make_mesh(num_devices)
    global_batch = 2 * num_devices
    eb = input_pipeline.EvalBatches(
        source, local_batch=sharding.local_batch_size(global_batch, mesh), image_size=32,
        canvas=(96, 96))
    ids, padded = [], 0
    for b in eb:
        g = sharding.to_global(b, mesh)
        assert g["image"].shape[0] == global_batch
        valid = np.asarray(g["valid"]) > 0
        ids += [input_pipeline.decode_id(r) for r in np.asarray(g["id"])[valid]]
        padded += int((~valid).sum())
    assert ids == [ex["id"] for ex in source]
    assert padded == len(eb) * global_batch - len(source)


def test_process_shards_cover_the_split_exactly_once():
    for n in (0, 1, 7, 13, 100):
        for count in (1, 2, 3):
            covered = [i for p in range(count) for i in input_pipeline.process_shard(n, p, count)]
            assert covered == list(range(n))
    # Every process runs the same number of batches even when the shards differ in size.
    sizes = [input_pipeline.EvalBatches(fake_source(7), local_batch=2, image_size=32,
                                        canvas=(96, 96), process_index=p, process_count=2).num_batches
             for p in range(2)]
    assert sizes[0] == sizes[1]


def test_ids_round_trip():
    # Up to a file name's 255 bytes (a long phone photo name is over 64).
    for s in ("00042", "ccp/0001", "ünï", "IMG_" + "x" * 251):
        assert input_pipeline.decode_id(input_pipeline.encode_id(s)) == s
    with pytest.raises(ValueError, match="longer than 255 bytes"):
        input_pipeline.encode_id("x" * 256)
    assert jax.device_count() == 8


def test_region_count_ignores_specks():
    mask = np.zeros((100, 100), np.uint8)
    mask[10:40, 10:30] = 1  # a person
    mask[60:90, 50:80] = 1  # another
    mask[95, 95] = 1  # a 1-pixel annotation speck (< 0.1% of the image)
    assert input_pipeline.count_regions(mask) == 2
    assert input_pipeline.count_regions(np.zeros((10, 10), np.uint8)) == 0


def test_colour_jitter_rounds_to_the_nearest_level():
    """A grey 100 image brightened by 1.127 is 113 (the device path rounds too); truncation
    gave 112. Geometry is the identity here."""
    from jaxseg import preprocess

    class Draws:  # the generator's draws, in augment's order
        def __init__(self):
            self.values = iter([1.0, 0.0, np.zeros(2), 1.127, 1.0, 1.0])

        def uniform(self, *args, **kwargs):
            return next(self.values)

        def random(self):
            return 0.9  # no flip

    image = np.full((8, 8, 3), 100, np.uint8)
    out, mask = preprocess.augment(image, np.ones((8, 8, 1), np.uint8), aug_config(), Draws())
    assert (out == 113).all() and (mask == 1).all()
