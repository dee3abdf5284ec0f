"""Training batches are a pure function of (seed, step); evaluation covers each example once."""
import collections
import itertools
import re
import types

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


def test_a_mixture_that_a_batch_cannot_hold_exactly_is_noted_with_its_rounded_shares():
    """1:1:1 in 16 rows, or 1:99 in 8, is trained at other shares at every step; that was unsaid."""
    assert mixture.rounding_note("a:1,b:1", 16) is None
    assert mixture.rounding_note("a:3,b:1", 8) is None
    assert mixture.rounding_note("a:0.25,b:0.75", 64) is None
    assert mixture.rounding_note("a:0.3,b:0.6", 3) is None  # 0.3 / 0.9 is not 1 / 3 in floats
    note = mixture.rounding_note("a:1,b:99", 8)
    assert note.endswith("each batch of 8 holds 1 a (12.5%, asked 1.0%), 7 b (87.5%, asked 99.0%)")
    counts = [int(c) for c in re.findall(r"(\d+) [abc] \(", mixture.rounding_note("a:1,b:1,c:1", 16))]
    assert sorted(counts) == [5, 5, 6] and sum(counts) == 16


def test_mixture_counts_and_parsing():
    assert mixture.mixture_counts([1, 1], 8) == [4, 4]
    assert mixture.mixture_counts([3, 1], 8) == [6, 2]
    assert mixture.mixture_counts([1, 3], 8) == [2, 6]  # was [3, 5]: skewed by the order
    assert mixture.mixture_counts([9, 1], 10) == [9, 1]  # was [8, 2]
    assert mixture.mixture_counts([100, 1, 1], 3) == [1, 1, 1]  # at least one each
    for weights, batch in (([1, 2, 7], 16), ([5, 3, 1], 12), ([2, 9], 7)):
        counts = mixture.mixture_counts(weights, batch)
        assert sum(counts) == batch and min(counts) >= 1
        # Largest remainder: no other split of the batch (each dataset at least one example)
        # is closer to the exact shares. Within 1 of them alone let the largest share take
        # every leftover example ([1, 3, 12] for 1:2:7 in 16, not [2, 3, 11]).
        exact = np.asarray(weights) / sum(weights) * batch
        splits = [s for s in itertools.product(range(1, batch + 1), repeat=len(weights))
                  if sum(s) == batch]
        closest = min(splits, key=lambda s: np.abs(np.asarray(s) - exact).sum())
        assert counts == list(closest), (weights, counts)
        assert mixture.mixture_counts(weights[::-1], batch) == counts[::-1]
    assert mixture.parse_mixture("a:2, b") == [("a", 2.0), ("b", 1.0)]
    assert mixture.parse_mixture("a : 2,b,") == [("a", 2.0), ("b", 1.0)]  # no '' dataset
    for bad in ("a:0", "a:nan", "a:inf", "a:-1", "a:1/2"):
        with pytest.raises(ValueError, match=f"for 'a' must be a positive number, got {bad[2:]}"):
            mixture.parse_mixture(bad)
    with pytest.raises(ValueError, match="'a' is named twice"):
        mixture.parse_mixture("a:1, b, a:1")
    with pytest.raises(ValueError, match="'a' is named twice"):
        mixture.parse_mixture("a, a :1")


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


@pytest.mark.parametrize("process_count, devices_each", [(2, 1), (3, 2)])
def test_processes_rows_rebuild_the_one_process_batches(monkeypatch, process_count, devices_each):
    """Each process decodes the rows of its devices (local_batch_slice); side by side they are
    the one-process batch, also where a process's rows cut through a dataset's block of slots
    (1:3:2 in 12 rows is 2, 6 and 4 slots; 2 processes split at row 6, 3 at rows 4 and 8) and
    where a dataset holds fewer examples than its slots, so that each batch spans its epochs."""
    sources = [fake_source(1, 0), fake_source(5, 1), fake_source(9, 2)]

    def stream(start, slots=None):
        tb = input_pipeline.TrainBatches(sources, [1, 3, 2], global_batch=12, image_size=16,
                                         aug=aug_config(), seed=3, start_step=start, slots=slots)
        out = [next(tb) for _ in range(start, 4)]
        tb.close()
        return out

    devices = [types.SimpleNamespace(id=i, process_index=i // devices_each)
               for i in range(process_count * devices_each)]
    mesh = types.SimpleNamespace(devices=np.array(sharding.choose_devices(devices, None,
                                                                          process_count)))
    full = stream(0)
    for start in (0, 2):  # from the start and resumed
        parts = []
        for p in range(process_count):
            monkeypatch.setattr(jax, "process_index", lambda p=p: p)
            rows = sharding.local_batch_slice(12, mesh)
            assert rows.stop - rows.start == sharding.local_batch_size(12, mesh)
            parts.append(stream(start, rows))
        for step, batches_at_step in zip(range(start, 4), zip(*parts)):
            for key in ("image", "mask"):
                np.testing.assert_array_equal(
                    np.concatenate([b[key] for b in batches_at_step]), full[step][key])


def test_each_epoch_visits_every_example_once():
    sources = [fake_source(8, 0), fake_source(12, 1)]
    tb = batches(sources)
    seen = collections.Counter(tb.example_at(step, slot) for step in range(2) for slot in range(8))
    assert sorted(i for d, i in seen if d == 0) == list(range(8))
    assert all(v == 1 for v in seen.values())
    # The second dataset's 4 slots a step (slots 4..7) take its 12 examples in 3 steps.
    later = [tb.example_at(step, slot) for step in range(3) for slot in range(4, 8)]
    assert sorted(i for d, i in later if d == 1) == list(range(12))
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
    would show the model eight times fewer variations, and one per slot for every step would
    show an example that comes back to a slot as it was."""
    from jaxseg import preprocess

    example = fake_source(1, 0)[0]
    images = [preprocess.train_example(example, 32, aug_config(), 3, step, slot)[0]
              for step, slot in ((5, 0), (5, 1), (5, 0), (6, 0))]
    np.testing.assert_array_equal(images[0], images[2])  # a pure function
    assert not np.array_equal(images[0], images[1])
    assert not np.array_equal(images[0], images[3])  # and the next step's slot 0 its own way too


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


def test_an_eval_row_holds_the_photo_and_mask_at_full_size_on_the_canvas():
    """Beside the model-size input, each row carries the photo and mask as they are, at the
    canvas's top left (zeros below and right), their (height, width), and the person regions
    counted at full size: two people 2 pixels apart in a 150x200 photo merge at 32 pixels."""
    rng = np.random.default_rng(4)
    source = []
    for h, w in ((150, 200), (90, 60)):
        mask = np.zeros((h, w, 1), np.uint8)
        mask[20:80, 10:42] = 1
        source.append({"image": rng.integers(0, 256, (h, w, 3), dtype=np.uint8), "mask": mask,
                       "id": f"p{h}", "source": "fake"})
    source[0]["mask"][20:80, 44:90] = 1  # no model pixel samples the gap's columns
    canvas = (160, 256)
    eb = input_pipeline.EvalBatches(source, local_batch=3, image_size=32, canvas=canvas)
    (batch,) = eb.iterate(full_image=True)
    np.testing.assert_array_equal(batch["size"], [[150, 200], [90, 60], [0, 0]])
    np.testing.assert_array_equal(batch["regions"], [2, 1, 0])
    np.testing.assert_array_equal(batch["index"], [0, 1, -1])
    np.testing.assert_array_equal(batch["valid"], [1, 1, 0])
    for i, ex in enumerate(source):
        h, w = ex["image"].shape[:2]
        full_image = np.zeros((*canvas, 3), np.uint8)
        full_image[:h, :w] = ex["image"]
        full_mask = np.zeros(canvas, np.uint8)
        full_mask[:h, :w] = ex["mask"][..., 0]
        np.testing.assert_array_equal(batch["full_image"][i], full_image)
        np.testing.assert_array_equal(batch["full_mask"][i], full_mask)
    assert not batch["full_image"][2].any() and not batch["full_mask"][2].any()


@pytest.mark.parametrize("size", [0, 2, 9])
def test_prefetch_to_mesh_yields_every_batch_in_order(size):
    """Batches ahead or none, the prefetched stream is the input's, to its last batch."""
    mesh = sharding.make_mesh(2)
    batches = [{"x": np.full((4, 3), i, np.float32)} for i in range(5)]
    out = list(input_pipeline.prefetch_to_mesh(iter(batches), mesh, size=size))
    assert [float(np.asarray(b["x"])[0, 0]) for b in out] == [0, 1, 2, 3, 4]
    for got, batch in zip(out, batches):
        np.testing.assert_array_equal(np.asarray(got["x"]), batch["x"])


def test_process_shards_cover_the_split_exactly_once():
    for n in (0, 1, 7, 13, 100):
        for count in (1, 2, 3):
            shards = [input_pipeline.process_shard(n, p, count) for p in range(count)]
            assert [i for shard in shards for i in shard] == list(range(n))
            # Each fits the batches every process runs (ceil(n / count) examples): one process
            # holding the whole split covers it too, and its batches then dropped the rest.
            assert all(len(shard) <= -(-n // count) for shard in shards), (n, count)
    # Every process runs the same number of batches even when the shards differ in size.
    for local_batch in (1, 2):  # shards of 4 and 3 examples
        sizes = [input_pipeline.EvalBatches(fake_source(7), local_batch=local_batch, image_size=32,
                                            canvas=(96, 96), process_index=p,
                                            process_count=2).num_batches for p in range(2)]
        assert sizes[0] == sizes[1] == -(-4 // local_batch), local_batch


def test_head_is_the_first_n_examples_and_all_of_them_at_0():
    """eval.max_examples = 0 (the default) validates on the whole split."""
    source = fake_source(5)
    for n, expected in ((0, 5), (3, 3), (9, 5)):
        head = input_pipeline.Head(source, n)
        assert [ex["id"] for ex in head] == [ex["id"] for ex in source[:expected]], n
    with pytest.raises(IndexError):
        input_pipeline.Head(source, 3)[3]


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
    mask[40:50, 30:40] = 1  # touches the first person at a corner only: 8-connected, one region
    assert input_pipeline.count_regions(mask) == 2
    mask[0:2, 80:85] = 1  # exactly 0.1% of the image: at least the minimum, a region
    assert input_pipeline.count_regions(mask) == 3


class Draws:
    """Stands in for augment's generator, drawing these values in augment's order: zoom, angle,
    (dy, dx) shift, brightness, contrast, saturation; and no flip. Each is asked for over
    aug_config()'s range (ignored, any range passed: brightness always raised, say)."""

    def __init__(self, zoom=1.0, angle=0.0, brightness=1.0, contrast=1.0, saturation=1.0):
        c = aug_config()
        self.draws = iter([
            ((c.scale_min, c.scale_max), zoom), ((-c.rotate_degrees, c.rotate_degrees), angle),
            ((-c.max_shift, c.max_shift), np.zeros(2)),
            ((1 - c.brightness, 1 + c.brightness), brightness),
            ((1 - c.contrast, 1 + c.contrast), contrast),
            ((1 - c.saturation, 1 + c.saturation), saturation)])

    def uniform(self, low, high, size=None):
        expected_range, value = next(self.draws)
        assert (low, high) == pytest.approx(expected_range)
        assert np.shape(value) == (() if size is None else (size,))
        return value

    def random(self):
        return 0.9  # no flip


def test_colour_jitter_rounds_to_the_nearest_level():
    """A grey 100 image brightened by 1.127 is 113 (the device path rounds too); truncation
    gave 112. Geometry is the identity here."""
    from jaxseg import preprocess

    image = np.full((8, 8, 3), 100, np.uint8)
    out, mask = preprocess.augment(image, np.ones((8, 8, 1), np.uint8), aug_config(),
                                   Draws(brightness=1.127))
    assert (out == 113).all() and (mask == 1).all()
    # Past 255 it saturates: a uint8 cast of 250 * 1.2 without the clip wraps to 44.
    image[:, 4:] = 250
    out, _ = preprocess.augment(image, np.ones((8, 8, 1), np.uint8), aug_config(),
                                Draws(brightness=1.2))
    assert (out[:, :4] == 120).all() and (out[:, 4:] == 255).all()


def test_contrast_and_saturation_scale_distances_from_the_image_mean_and_the_pixels_grey():
    """As on the device: contrast scales each value's distance from the mean of the whole image
    (all channels), saturation each pixel's distance from its own grey (its channels' mean)."""
    from jaxseg import preprocess

    image = np.random.default_rng(5).integers(60, 200, (8, 8, 3), dtype=np.uint8)
    mask = np.zeros((8, 8, 1), np.uint8)
    x = image.astype(float)
    out, _ = preprocess.augment(image, mask, aug_config(), Draws(contrast=1.3))
    np.testing.assert_allclose(out, (x - x.mean()) * 1.3 + x.mean(), atol=0.51)
    grey = x.mean(axis=-1, keepdims=True)
    out, _ = preprocess.augment(image, mask, aug_config(), Draws(saturation=0.6))
    np.testing.assert_allclose(out, (x - grey) * 0.6 + grey, atol=0.51)


@pytest.mark.parametrize("zoom, angle", [(2.0, 0.0), (1.0, 30.0), (1.25, -20.0)])
def test_zoom_and_rotation_turn_about_the_image_centre(zoom, angle):
    """A disc centred on a 64x64 image stays centred (at 31.5, 31.5) when zoomed and turned, its
    area scaled by zoom**2: a turn about another point moves it, a shear squeezes it."""
    from jaxseg import preprocess

    size, radius = 64, 12
    yy, xx = np.mgrid[:size, :size] - (size - 1) / 2
    disc = (yy ** 2 + xx ** 2 <= radius ** 2).astype(np.uint8)
    image = np.repeat(disc[..., None] * 255, 3, axis=-1)
    out_image, out_mask = preprocess.augment(image, disc[..., None], aug_config(),
                                             Draws(zoom=zoom, angle=angle))
    for out in (out_mask[..., 0].astype(float), out_image[..., 0] / 255.0):
        np.testing.assert_allclose(centroid(out), [(size - 1) / 2] * 2, atol=0.05)
        assert out.sum() == pytest.approx(disc.sum() * zoom ** 2, rel=0.03)


@pytest.mark.parametrize("zoom, angle", [(2.0, 0.0), (1.25, 30.0), (0.8, -20.0)])
def test_a_zoomed_and_turned_ramp_is_the_ramp_tilted_by_the_angle(zoom, angle):
    """A ramp 3 * column, zoomed and turned about the centre, is (bilinear sampling is exact on a
    linear image) the ramp with gradient 3 / zoom * (cos angle, +-sin angle) and the centre's
    value 3 * 31.5, to the rounding: nearest-pixel sampling leaves steps, an angle taken as
    radians tilts it elsewhere."""
    from jaxseg import preprocess

    size = 64
    c = (size - 1) / 2
    ramp = np.broadcast_to(3 * np.arange(size, dtype=np.uint8), (size, size))
    image = np.repeat(ramp[..., None], 3, axis=-1)
    out, _ = preprocess.augment(image, np.zeros((size, size, 1), np.uint8), aug_config(),
                                Draws(zoom=zoom, angle=angle))
    yy, xx = np.mgrid[:size, :size] - c
    inside = np.hypot(yy, xx) <= 20 * min(zoom, 1)  # its source lies inside the photo
    design = np.stack([np.ones(inside.sum()), xx[inside], yy[inside]], axis=1)
    values = out[..., 0][inside].astype(float)
    (centre, gx, gy), *_ = np.linalg.lstsq(design, values, rcond=None)
    assert np.abs(design @ [centre, gx, gy] - values).max() <= 0.6
    assert centre == pytest.approx(3 * c, abs=0.2)
    assert gx == pytest.approx(3 / zoom * np.cos(np.radians(angle)), abs=0.01)
    assert abs(gy) == pytest.approx(3 / zoom * abs(np.sin(np.radians(angle))), abs=0.01)


def test_a_flip_mirrors_about_half_the_slots_image_and_mask_alike():
    from jaxseg import preprocess

    rng = np.random.default_rng(2)
    aug = aug_config()
    aug.update(scale_min=1.0, scale_max=1.0, rotate_degrees=0.0, max_shift=0.0, brightness=0.0,
               contrast=0.0, saturation=0.0)
    flipped = 0
    for slot in range(64):
        example = {"image": rng.integers(0, 256, (16, 16, 3), dtype=np.uint8),
                   "mask": (rng.random((16, 16, 1)) < 0.5).astype(np.uint8)}
        image, mask = preprocess.train_example(example, 16, aug, 0, 1, slot)
        mirrored = np.array_equal(image, example["image"][:, ::-1])
        assert mirrored or np.array_equal(image, example["image"])
        expected = example["mask"][:, ::-1] if mirrored else example["mask"]
        np.testing.assert_array_equal(mask, expected)
        flipped += mirrored
    assert 16 <= flipped <= 48


@pytest.mark.parametrize("identity", [True, False])
def test_shifts_move_by_up_to_max_shift_of_the_image_size(identity):
    """With max_shift alone, each slot's example is moved by up to max_shift * size pixels
    along each axis, by amounts that spread over that range; with every transform off (no
    flip either), augmentation returns the example as it was."""
    from jaxseg import preprocess

    size, radius = 64, 10
    yy, xx = np.mgrid[:size, :size] - (size - 1) / 2
    disc = (yy ** 2 + xx ** 2 <= radius ** 2).astype(np.uint8)[..., None]
    example = {"image": np.repeat(disc * 255, 3, axis=-1), "mask": disc, "id": "disc"}
    example["image"][5:12, 40:50, 1] = 128  # off the centre: a flip or a turn would show
    aug = aug_config()
    aug.update(scale_min=1.0, scale_max=1.0, rotate_degrees=0.0, hflip=False, brightness=0.0,
               contrast=0.0, saturation=0.0, max_shift=0.0 if identity else 0.1)
    moves = []
    for slot in range(24):
        image, mask = preprocess.train_example(example, size, aug, 0, 1, slot)
        if identity:
            np.testing.assert_array_equal(image, example["image"])
            np.testing.assert_array_equal(mask, disc)
        moves.append(centroid(mask[..., 0].astype(float)) - (size - 1) / 2)
    # Each axis its own amount: one draw for both moves every disc along the diagonal.
    assert identity or np.abs(np.subtract(*np.transpose(moves))).max() > 0.05 * size
    moves = np.abs(moves)
    assert moves.max() <= 0.1 * size + 0.5
    assert identity or moves.max() > 0.05 * size
