"""Mask image formats: each read with read_mask_image + binarize gives the person mask drawn."""
import cv2
import numpy as np
import pytest
from PIL import Image

import fixtures_data as fx
from jaxseg.datasets import image_io

H, W = fx.H, fx.W


def drawn(seed: int = 3) -> np.ndarray:
    """The person as a boolean HxW array: the reference every format must give back."""
    return fx.person(seed).astype(bool)


def read(path) -> np.ndarray:
    mask, _ = image_io.binarize(image_io.read_mask_image(path))
    assert mask.dtype == np.uint8 and mask.shape == (H, W)
    return mask


def assert_mask(path, expected: np.ndarray) -> None:
    np.testing.assert_array_equal(read(path), expected.astype(np.uint8))


def stored(path, what: str):
    """Attribute WHAT of the image at PATH as Pillow opens it (checks that a case is the intended one)."""
    with Image.open(path) as image:
        return image.getpalette() if what == "palette" else getattr(image, what)


def uniform(value: int, channels: int) -> np.ndarray:
    return np.full((H, W, channels), value, np.uint8)


# ---------------------------------------------------------------- palette masks


def test_palette_two_colours_white_first(tmp_path):
    person = drawn()
    # Pillow's adaptive quantizer lists white (the person) first, black second.
    image = Image.fromarray(np.where(person, 255, 0).astype(np.uint8)).convert("RGB").quantize(2)
    path = tmp_path / "quantized.png"
    image.save(path)
    assert stored(path, "palette")[:3] == [255, 255, 255]  # the case is the inverted one
    assert_mask(path, person)


def test_palette_explicit_white_first(tmp_path):
    person = drawn(4)
    image = Image.frombytes("P", (W, H), np.where(person, 0, 1).astype(np.uint8).tobytes())
    image.putpalette([255, 255, 255, 0, 0, 0])
    image.save(tmp_path / "white_first.png")
    assert_mask(tmp_path / "white_first.png", person)


def voc_palette() -> list[int]:
    palette = [0] * 768
    palette[15 * 3 : 16 * 3] = [192, 128, 128]  # person
    palette[255 * 3 :] = [224, 224, 192]  # void / boundary
    return palette


def test_palette_voc_style(tmp_path):
    person = drawn(5)
    edge = person & ~cv2.erode(person.astype(np.uint8), np.ones((3, 3), np.uint8)).astype(bool)
    indices = np.where(edge, 255, np.where(person, 15, 0)).astype(np.uint8)
    assert (indices == 15).any() and (indices == 255).any()
    image = Image.frombytes("P", (W, H), indices.tobytes())
    image.putpalette(voc_palette())
    image.save(tmp_path / "voc.png")
    # The void (index 255) is no person, as in a grey void-marked mask of the same labels.
    assert_mask(tmp_path / "voc.png", person & ~edge)
    np.testing.assert_array_equal(read(tmp_path / "voc.png"),
                                  image_io.binarize(np.where(indices == 15, 1, indices))[0])


def test_palette_voc_void_outside_the_person_is_background(tmp_path):
    person = drawn(6)
    void = np.zeros((H, W), bool)
    void[:, :2] = True  # void pixels away from the person, in a bright palette colour
    indices = np.where(void, 255, np.where(person, 15, 0)).astype(np.uint8)
    image = Image.frombytes("P", (W, H), indices.tobytes())
    image.putpalette(voc_palette())
    image.save(tmp_path / "voc_void.png")
    assert_mask(tmp_path / "voc_void.png", person & ~void)
    # Index 255 alone beside 0 is not void: a two-entry mask whose person happens to be 255.
    alone = np.where(person, 255, 0).astype(np.uint8)
    image = Image.frombytes("P", (W, H), alone.tobytes())
    image.putpalette(voc_palette())
    image.save(tmp_path / "two_indices.png")
    assert_mask(tmp_path / "two_indices.png", person)


def test_a_quantized_cutout_keeps_its_index_255(tmp_path):
    """A photo quantized to a full palette with index 0 transparent (as pngquant writes a
    cutout): index 255 is one of the photo's colours, not VOC's void."""
    person = drawn(14)
    indices = np.where(person, np.arange(H * W).reshape(H, W) % 255 + 1, 0).astype(np.uint8)
    assert (indices == 255).any() and len(np.unique(indices)) > 22
    image = Image.frombytes("P", (W, H), indices.tobytes())
    image.putpalette(list(np.random.default_rng(0).integers(40, 256, 768)))
    image.info["transparency"] = 0
    image.save(tmp_path / "quantized_cutout.png")
    assert_mask(tmp_path / "quantized_cutout.png", person)


def test_palette_indices_beyond_the_palette_keep_their_values(tmp_path):
    person = drawn(7)
    image = Image.frombytes("P", (W, H), person.astype(np.uint8).tobytes())  # no palette set
    image.save(tmp_path / "no_palette.png")
    assert len(stored(tmp_path / "no_palette.png", "palette")) < 2 * 3
    assert_mask(tmp_path / "no_palette.png", person)


def test_palette_with_transparency_cutout(tmp_path):
    person = drawn(8)
    rgba = np.dstack([uniform(255, 3), np.where(person, 255, 0).astype(np.uint8)])
    Image.fromarray(rgba).convert("P").save(tmp_path / "cutout_p.png")
    assert "transparency" in stored(tmp_path / "cutout_p.png", "info")
    assert_mask(tmp_path / "cutout_p.png", person)


# ---------------------------------------------------------------- alpha masks


@pytest.mark.parametrize("colour", [255, 0])
def test_rgba_uniform_colour_person_in_alpha(tmp_path, colour):
    person = drawn(9)
    rgba = np.dstack([uniform(colour, 3), np.where(person, 255, 0).astype(np.uint8)])
    Image.fromarray(rgba).save(tmp_path / "cutout.png")
    assert stored(tmp_path / "cutout.png", "mode") == "RGBA"
    assert_mask(tmp_path / "cutout.png", person)


@pytest.mark.parametrize("value", [0, 255])
def test_la_uniform_value_person_in_alpha(tmp_path, value):
    person = drawn(10)
    la = np.dstack([uniform(value, 1)[..., 0], np.where(person, 255, 0).astype(np.uint8)])
    Image.fromarray(la, "LA").save(tmp_path / "matte.png")
    assert stored(tmp_path / "matte.png", "mode") == "LA"
    assert_mask(tmp_path / "matte.png", person)


@pytest.mark.parametrize("mode", ["RGBA", "LA"])
def test_a_cutout_of_the_photo_is_read_by_its_alpha(tmp_path, mode):
    """jaxseg.predict --mode cutout writes the photo's own colours with the person in the alpha
    (so do background removers): the alpha is the mask, not the photo's brightness."""
    person = drawn(13)
    colours = fx.photo(13)
    if mode == "LA":
        colours = colours.mean(axis=2, keepdims=True).astype(np.uint8)
    cutout = np.dstack([colours, np.where(person, 255, 0).astype(np.uint8)])
    Image.fromarray(cutout.squeeze(), mode).save(tmp_path / "cutout.png")
    assert stored(tmp_path / "cutout.png", "mode") == mode
    assert_mask(tmp_path / "cutout.png", person)


def test_a_file_named_as_a_cutout_that_is_all_person_is_read_by_its_alpha(tmp_path):
    """An all-opaque alpha over a photo's colours cannot be told from an opaque soft mask, but
    `predict --mode cutout` names it a_cutout.png: in a folder and as a prediction, all person."""
    from jaxseg import datasets, evaluate

    fx.write(tmp_path / "f" / "images" / "a.png", fx.photo(16))
    (tmp_path / "f" / "masks").mkdir()
    Image.fromarray(np.dstack([fx.photo(16), uniform(255, 1)])).save(tmp_path / "a_cutout.png")
    (tmp_path / "f" / "masks" / "a_cutout.png").write_bytes((tmp_path / "a_cutout.png").read_bytes())
    (tmp_path / "a.png").write_bytes((tmp_path / "a_cutout.png").read_bytes())
    everyone = np.ones((H, W), np.uint8)
    source = datasets.data_source("person_folder", "train", data_dir=str(tmp_path / "dd"),
                                  folder=str(tmp_path / "f"))
    np.testing.assert_array_equal(source[0]["mask"][..., 0], everyone)
    values = evaluate.read_prediction_values(tmp_path / "a_cutout.png")
    assert not evaluate.is_soft(values)  # it would switch the whole folder to soft maps
    np.testing.assert_array_equal(image_io.binarize(values)[0], everyone)
    assert evaluate.is_soft(evaluate.read_prediction_values(tmp_path / "a.png"))  # by its colours
    # Named as a mask, not a cutout: read by its colours too.
    (tmp_path / "a_mask.png").write_bytes((tmp_path / "a_cutout.png").read_bytes())
    assert evaluate.is_soft(evaluate.read_prediction_values(tmp_path / "a_mask.png"))


@pytest.mark.parametrize("mode", ["RGBA", "LA"])
def test_the_cutout_of_a_photo_without_a_person_is_empty(tmp_path, mode):
    """Its alpha is all 0: read by it, not by the photo's brightness."""
    colours = fx.photo(14)
    if mode == "LA":
        colours = colours.mean(axis=2, keepdims=True).astype(np.uint8)
    cutout = np.dstack([colours, np.zeros((H, W), np.uint8)])
    Image.fromarray(cutout.squeeze(), mode).save(tmp_path / "cutout.png")
    assert stored(tmp_path / "cutout.png", "mode") == mode
    assert_mask(tmp_path / "cutout.png", np.zeros((H, W), bool))


@pytest.mark.parametrize("top", [1000, 4095])
def test_a_two_level_16_bit_mask_of_another_top_value(tmp_path, top):
    """0/1000 or 12-bit 0/4095: cut at 32767 of 65535, it read as no person at all."""
    person = drawn(16)
    cv2.imwrite(str(tmp_path / "deep.png"), np.where(person, top, 0).astype(np.uint16))
    assert stored(tmp_path / "deep.png", "mode").startswith("I")
    assert_mask(tmp_path / "deep.png", person)


def test_a_two_level_mask_with_a_zeroed_alpha_is_read_by_its_colour(tmp_path):
    person = drawn(15)
    white = np.where(person, 255, 0).astype(np.uint8)
    Image.fromarray(np.dstack([white, white, white, np.zeros_like(white)])).save(
        tmp_path / "zero_alpha.png")
    assert_mask(tmp_path / "zero_alpha.png", person)


def test_la_varying_value_is_the_mask(tmp_path):
    person = drawn(11)
    hole = np.zeros((H, W), bool)
    hole[:, : W // 2] = True  # alpha unrelated to the person: it is ignored
    la = np.dstack([np.where(person, 255, 0), np.where(hole, 0, 255)]).astype(np.uint8)
    Image.fromarray(la, "LA").save(tmp_path / "gray_alpha.png")
    assert_mask(tmp_path / "gray_alpha.png", person)


def test_rgba_colour_mask_ignores_alpha(tmp_path):
    person = drawn(12)
    alpha = np.where(np.arange(W) < W // 2, 128, 255).astype(np.uint8)[None].repeat(H, 0)
    for channel in range(3):  # any bright channel, not the first alone (red passed that too)
        colour = np.zeros((H, W, 3), np.uint8)
        colour[person, channel] = 255
        Image.fromarray(np.dstack([colour, alpha])).save(tmp_path / f"alpha_{channel}.png")
        assert_mask(tmp_path / f"alpha_{channel}.png", person)


# ---------------------------------------------------------------- regressions


def test_rgb_colour_mask(tmp_path):
    person = drawn(13)
    rgb = np.zeros((H, W, 3), np.uint8)
    rgb[person] = (0, 200, 0)
    Image.fromarray(rgb).save(tmp_path / "green.png")
    assert_mask(tmp_path / "green.png", person)


@pytest.mark.parametrize("scale", [1, 255])
def test_gray_masks(tmp_path, scale):
    person = drawn(14)
    Image.fromarray((person * scale).astype(np.uint8), "L").save(tmp_path / "gray.png")
    assert_mask(tmp_path / "gray.png", person)


@pytest.mark.parametrize("scale", [1.0, 255.0])
def test_a_floating_point_matte_is_cut_at_half_its_range(tmp_path, scale):
    """A 32-bit float TIFF matte, 0-1 or 0-255: its faint halo (0.1) is background, its
    partly covered edge (0.9) person, as an 8-bit matte's 25 and 230 are."""
    person = drawn(16)
    halo = cv2.dilate(person.astype(np.uint8), np.ones((7, 7), np.uint8)).astype(bool) & ~person
    edge = person & ~cv2.erode(person.astype(np.uint8), np.ones((5, 5), np.uint8)).astype(bool)
    matte = np.where(person, 1.0, 0.0) - 0.1 * edge + 0.1 * halo
    Image.fromarray((matte * scale).astype(np.float32), "F").save(tmp_path / "matte.tif")
    assert stored(tmp_path / "matte.tif", "mode") == "F" and halo.any() and edge.any()
    assert_mask(tmp_path / "matte.tif", person)


def test_sixteen_bit_and_one_bit_masks(tmp_path):
    person = drawn(15)
    assert cv2.imwrite(str(tmp_path / "u16.png"), person.astype(np.uint16) * 65535)
    Image.fromarray(person).save(tmp_path / "bilevel.png")
    assert stored(tmp_path / "bilevel.png", "mode") == "1"
    assert_mask(tmp_path / "u16.png", person)
    assert_mask(tmp_path / "bilevel.png", person)
