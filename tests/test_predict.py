"""jaxseg.predict: the CLI on folders, videos and bad files, every output mode, and the resolution rule.

The CLI runs in subprocesses on a tiny random U-Net saved with inference.save_pretrained (the
subprocess points inference.PRETRAINED_DIR at it, then runs `python -m jaxseg.predict`
unchanged), so that each run costs seconds. The real-photo check uses the shipped pretrained model.
"""
import collections
import gc
import hashlib
import os
import pathlib
import struct
import subprocess
import sys
import weakref
import zlib

import cv2
import numpy as np
import pytest

import fixtures_data as fx
from jaxseg import inference, input_pipeline, predict, resolution, sharding

REPO = pathlib.Path(__file__).resolve().parents[1]

# Runs the real entry point (`python -m jaxseg.predict ...`) with the "pretrained" model taken
# from the folder given as the first argument.
CLI = """
import pathlib, runpy, sys
from jaxseg import inference
inference.PRETRAINED_DIR = pathlib.Path(sys.argv.pop(1))
sys.argv[0] = "jaxseg.predict"
runpy.run_module("jaxseg.predict", run_name="__main__", alter_sys=True)
"""


SAVE_TINY = """
import sys
from configs import default
from jaxseg import inference
from jaxseg.models import create_model

c = default.get_config()
c.data.image_size, c.model.depth, c.model.base_features = 32, 1, 4
inference.save_pretrained(create_model(c.model, seed=3), c, {"steps": 0}, sys.argv[1])
"""


def python(script, *args, cache=None, env=None, cwd=REPO):
    """Runs SCRIPT in a fresh interpreter on one CPU device, in the folder CWD; with CACHE, JAX's
    persistent compilation cache is used for every compilation (even the initialisers' small eager
    ones); ENV adds environment variables."""
    return subprocess.run([sys.executable, "-c", script, *map(str, args)], cwd=cwd,
                          env=subprocess_env(cache, env), capture_output=True, text=True,
                          timeout=300)


def subprocess_env(cache=None, env=None):
    """The environment `python` runs its scripts in."""
    env = {k: v for k, v in os.environ.items() if k != "XLA_FLAGS"} | (env or {})
    env.update(JAX_PLATFORMS="cpu", TF_CPP_MIN_LOG_LEVEL="2")
    if cache:
        env.update(JAX_COMPILATION_CACHE_DIR=str(cache), JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS="0",
                   JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES="0")
    return env


@pytest.fixture(scope="module")
def jax_cache(tmp_path_factory):
    """Shared by the subprocesses: only the first one compiles the tiny model's functions."""
    return tmp_path_factory.mktemp("jax_cache")


@pytest.fixture(scope="module")
def tiny_model_dir(jax_cache, tmp_path_factory):
    """A random 32x32 U-Net (depth 1, 4 features) saved as a pretrained model."""
    path = tmp_path_factory.mktemp("tiny_model")
    result = python(SAVE_TINY, path, cache=jax_cache)  # a subprocess, to fill the cache
    assert result.returncode == 0, result.stderr
    return path


def run_cli(model_dir, *args, cache=None, env=None, cwd=REPO):
    return python(CLI, model_dir, *args, cache=cache, env=env, cwd=cwd)


def photo(h, w, seed=0):
    """A smooth RGB image with a bright blob, so that a random model's mask is not uniform."""
    rng = np.random.default_rng(seed)
    image = cv2.GaussianBlur(rng.integers(0, 256, (h, w, 3), dtype=np.uint8), (7, 7), 0)
    cv2.ellipse(image, (w // 2, h // 2), (w // 4, h // 3), 0, 0, 360, (250, 220, 200), -1)
    return image


def read_rgb(path, flags=cv2.IMREAD_UNCHANGED):
    image = cv2.imread(str(path), flags)
    assert image is not None, path
    if image.ndim == 3:
        image = cv2.cvtColor(image, cv2.COLOR_BGR2RGB if image.shape[2] == 3 else cv2.COLOR_BGRA2RGBA)
    return image


def huge_png(path, width=50_000, height=50_000):
    """A 100-byte PNG whose header declares WIDTH x HEIGHT pixels (2.5 G by default)."""
    def chunk(kind, data):
        return struct.pack(">I", len(data)) + kind + data + struct.pack(
            ">I", zlib.crc32(kind + data) & 0xFFFFFFFF)

    ihdr = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    path.write_bytes(b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", zlib.compress(b""))
                     + chunk(b"IEND", b""))
    return path


def write_video(path, frames=5, size=(96, 64), fps=10.0, fourcc="mp4v"):
    writer = cv2.VideoWriter(str(path), cv2.VideoWriter_fourcc(*fourcc), fps, size)
    assert writer.isOpened()
    for i in range(frames):
        writer.write(cv2.cvtColor(photo(size[1], size[0], seed=i), cv2.COLOR_RGB2BGR))
    writer.release()
    return path


def read_video(path):
    capture = cv2.VideoCapture(str(path))
    assert capture.isOpened(), path
    fps = capture.get(cv2.CAP_PROP_FPS)
    frames = []
    while True:
        ok, frame = capture.read()
        if not ok:
            break
        frames.append(frame)
    capture.release()
    return frames, fps


def digest(folder):
    return {p.relative_to(folder): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in folder.rglob("*") if p.is_file()}


# Sizes and aspects: landscape, tall and thin, wide, exactly one bucket, one pixel over it.
SIZES = {"a.png": (50, 70), "sub/b.png": (131, 40), "sub/deeper/c.bmp": (90, 200),
         "sub/deeper/d.png": (64, 64), "e.jpg": (65, 33)}


@pytest.fixture(scope="module")
def mask_run(tiny_model_dir, jax_cache, tmp_path_factory):
    """One CLI run (mask mode) over a nested folder of good and bad inputs, a video, and a missing path."""
    root = tmp_path_factory.mktemp("mask_run")
    photos = root / "photos"
    for i, (name, (h, w)) in enumerate(SIZES.items()):
        fx.write(photos / name, photo(h, w, seed=i))
    write_video(photos / "sub" / "clip.mp4")
    ok, png = cv2.imencode(".png", photo(60, 60))
    (photos / "sub" / "corrupt.png").write_bytes(png.tobytes()[: len(png) // 2])
    (photos / "empty.jpg").write_bytes(b"")
    (photos / "notes.txt").write_text("not an image\n")
    (photos / "broken.mp4").write_text("not a video\n")
    huge_png(photos / "huge.png")
    fx.write(photos / "e.png", photo(20, 20))  # e.jpg's output name too: e_mask.png
    before = digest(photos)
    out = root / "out"
    result = run_cli(tiny_model_dir, photos, root / "missing", "--output", out, cache=jax_cache)
    return dict(result=result, photos=photos, out=out / "photos", before=before)


def test_cli_masks_every_image_at_its_own_size(mask_run):
    # The run holds bad inputs: every good one is written, and the exit status says some were not.
    assert mask_run["result"].returncode == predict.EXIT_SKIPPED, mask_run["result"].stderr
    for name, size in SIZES.items():
        stem = pathlib.Path(name).with_suffix("")
        mask = read_rgb(mask_run["out"] / stem.parent / f"{stem.name}_mask.png")
        assert mask.shape == size and mask.dtype == np.uint8, name
        assert set(np.unique(mask)) <= {0, 255}, name
    # The random model still gives both classes: the mode tests below compare against them.
    assert set(np.unique(read_rgb(mask_run["out"] / "a_mask.png"))) == {0, 255}
    assert digest(mask_run["photos"]) == mask_run["before"]  # inputs untouched


def test_cli_video_keeps_frame_count_size_and_rate(mask_run):
    frames, fps = read_video(mask_run["out"] / "sub" / "clip_mask.mp4")
    assert len(frames) == 5
    assert predict.written_by_predict(mask_run["out"] / "sub" / "clip_mask.mp4")
    assert not list((mask_run["out"] / "sub").glob(".*"))  # no partial file left
    assert frames[0].shape == (64, 96, 3)
    assert fps == pytest.approx(10.0)
    assert mask_run["result"].stderr.count(f"note: {predict.video_note('mask')}\n") == 1


def test_cli_reports_and_skips_bad_inputs(mask_run):
    result, out = mask_run["result"], mask_run["out"]
    skipped = {line.split(": ", 1)[0].removeprefix("skipped "): line.split(": ", 1)[1]
               for line in result.stderr.splitlines() if line.startswith("skipped ")}
    photos = mask_run["photos"]
    expected = {
        photos / "sub" / "corrupt.png": "could not decode",
        photos / "empty.jpg": "not a readable image",
        photos / "broken.mp4": "could not open the video",
        # Refused by --max_pixels before decoding (not by PIL's own guard, with a vaguer message).
        photos / "huge.png": "50000x50000 = 2500000000 pixels exceeds --max_pixels=80000000",
        photos / "e.png": f"is already the output of {photos / 'e.jpg'}",  # sorted first
        photos.parent / "missing": "no such file or folder",
    }
    assert set(skipped) == {str(p) for p in expected}
    for path, why in expected.items():
        assert why in skipped[str(path)], (path, skipped[str(path)])
    for stem in ("sub/corrupt", "empty", "notes", "huge"):
        assert not (out / f"{stem}_mask.png").exists()
    assert not (out / "broken_mask.mp4").exists()  # no empty video left behind
    # The 5 images and the video; notes.txt is not an image by its name, so not even tried.
    assert "wrote 6 outputs" in result.stdout
    assert "passed over 1 files" in result.stdout
    assert f"{len(expected)} input(s) skipped" in result.stderr


@pytest.fixture(scope="module")
def same_folder_runs(tiny_model_dir, jax_cache, tmp_path_factory):
    """cutout then background with --output = the input folder; overlay on single files."""
    photos = tmp_path_factory.mktemp("same") / "photos"
    image = photo(*SIZES["a.png"], seed=0)  # the mask run's a.png: same pixels, same mask
    fx.write(photos / "a.png", image)
    fx.write(photos / "x.png", photo(40, 30, seed=9))
    fx.write(photos / "x_overlay.png", photo(30, 40, seed=8))
    fx.write(photos / "big.png", photo(60, 60, seed=7))
    # a.png's pixels, with its right half transparent.
    alpha = np.full(image.shape[:2], 255, np.uint8)
    alpha[:, image.shape[1] // 2:] = 0
    cv2.imwrite(str(photos / "t.png"), cv2.cvtColor(np.dstack([image, alpha]), cv2.COLOR_RGBA2BGRA))
    before = digest(photos)
    clip = write_video(photos.parent / "clip.mp4")  # 96x64 frames
    runs = {
        "cutout": run_cli(tiny_model_dir, photos, "--output", photos, "--mode", "cutout",
                          cache=jax_cache),
        # A second run in the same folder must not take the first one's outputs as inputs.
        "background": run_cli(tiny_model_dir, photos, "--output", photos, "--mode", "background",
                              "--background", "0,0,255", cache=jax_cache),
        # Single files: x.png's output would be the input x_overlay.png (refused), big.png is
        # over --max_pixels (3600 > 3500) and a.png exactly at it, and so are clip.mp4's frames
        # (6144).
        "overlay": run_cli(tiny_model_dir, *(photos / n for n in ("x.png", "x_overlay.png", "a.png", "big.png")),
                           clip, "--output", photos, "--mode", "overlay", "--max_pixels", 3500,
                           cache=jax_cache),
    }
    return dict(runs=runs, photos=photos, image=image, before=before, clip=clip)


def test_output_folder_equal_to_input_folder(same_folder_runs):
    photos, runs = same_folder_runs["photos"], same_folder_runs["runs"]
    for mode, result in runs.items():
        # Only the overlay run is given inputs it must refuse (see the next test).
        expected = predict.EXIT_SKIPPED if mode == "overlay" else 0
        assert result.returncode == expected, (mode, result.stderr)
    after = digest(photos)
    assert {k: after[k] for k in same_folder_runs["before"]} == same_folder_runs["before"]
    outputs = photos / "photos"  # output/<input folder name>/...
    # x_overlay.png, named as x.png's overlay output beside it, is passed over in the folder.
    assert sorted(p.name for p in outputs.glob("*_cutout.png")) == [
        "a_cutout.png", "big_cutout.png", "t_cutout.png", "x_cutout.png"]
    assert "wrote 4 outputs" in runs["cutout"].stdout
    assert "passed over 1 files" in runs["cutout"].stdout
    # The background run skipped photos/photos/ (the cutout outputs): no *_cutout_background.
    assert sorted(p.name for p in outputs.glob("*_background.png")) == [
        "a_background.png", "big_background.png", "t_background.png", "x_background.png"]
    assert "wrote 4 outputs" in runs["background"].stdout
    assert "passed over 5 files" in runs["background"].stdout


def test_output_never_overwrites_an_input_and_max_pixels_refuses(same_folder_runs):
    photos, result = same_folder_runs["photos"], same_folder_runs["runs"]["overlay"]
    assert f"skipped {photos / 'x.png'}: output {photos / 'x_overlay.png'} would overwrite an input" \
        in result.stderr
    assert f"skipped {photos / 'big.png'}: 60x60 = 3600 pixels exceeds --max_pixels=3500" in result.stderr
    # A video's frames were not held to it: one of any size was read and predicted.
    clip = same_folder_runs["clip"]
    assert f"skipped {clip}: 96x64 = 6144 pixels exceeds --max_pixels=3500" in result.stderr
    assert "wrote 2 outputs" in result.stdout and "3 input(s) skipped" in result.stderr
    assert (photos / "x_overlay_overlay.png").exists() and (photos / "a_overlay.png").exists()
    assert not (photos / "big_overlay.png").exists()
    assert not list(photos.glob("clip*")) and not list(photos.glob(".*"))  # nor a partial video
    assert "audio" not in result.stderr  # of the videos written, which were none


def test_unreadable_and_unwritable_inputs_cost_only_themselves_in_repeated_runs(
        tiny_model_dir, jax_cache, tmp_path):
    # --output at the folder's parent puts each output beside its input, run after run.
    photos = tmp_path / "photos"
    fx.write(photos / "a.png", photo(30, 30, seed=1))
    (photos / "a.jpg").write_bytes(b"junk")  # sorted first, claims a_mask.png only if readable
    long_name = "b" * 250 + ".png"  # its output name is over the file system's 255 bytes
    fx.write(photos / long_name, photo(30, 30, seed=2))
    fx.write(photos / "c.png", photo(30, 30, seed=3))
    for run in range(2):
        result = run_cli(tiny_model_dir, photos, "--output", tmp_path, cache=jax_cache)
        assert result.returncode == predict.EXIT_SKIPPED, result.stderr
        assert "Traceback" not in result.stderr
        assert "wrote 2 outputs" in result.stdout, (run, result.stdout)
        assert f"skipped {photos / 'a.jpg'}: not a readable image" in result.stderr
        assert f"skipped {photos / long_name}: could not write" in result.stderr
        assert sorted(p.name for p in photos.glob("*_mask*")) == ["a_mask.png", "c_mask.png"]


def test_output_that_is_a_file_and_bad_batch_are_usage_errors(tiny_model_dir, jax_cache, tmp_path):
    fx.write(tmp_path / "a.png", photo(20, 20))
    for args, message in [(["--output", tmp_path / "a.png"], "exists and is not a folder"),
                          (["--output", tmp_path / "out", "--batch_size", "0"], "batch_size"),
                          (["--output", tmp_path / "out", "--threshold", "1.5"],
                           "--threshold=1.5 must be between 0 and 1"),
                          (["--output="], "--output: give the folder"),  # not the current one
                          (["--output", "gs://b/x"], "--output gs://b/x: give a local folder"),
                          (["--output", tmp_path / "out", "--threshold", "nan"], "--threshold=nan"),
                          (["--output", tmp_path / "out", "--checkpoint", "latest"],
                           "--checkpoint latest needs --workdir")]:
        result = run_cli(tiny_model_dir, tmp_path / "a.png", *args, cache=jax_cache)
        assert result.returncode == 1 and message in result.stderr, result.stderr
        assert "Traceback" not in result.stderr
    assert not (tmp_path / "out").exists()


def test_modes_compose_the_mask(mask_run, same_folder_runs):
    image, photos = same_folder_runs["image"], same_folder_runs["photos"]
    mask = read_rgb(mask_run["out"] / "a_mask.png")
    person = (mask == 255)[..., None]

    cutout = read_rgb(photos / "photos" / "a_cutout.png")
    assert cutout.shape == (*mask.shape, 4)
    np.testing.assert_array_equal(cutout[..., :3], image)
    np.testing.assert_array_equal(cutout[..., 3], mask)  # alpha = the mask

    # The photo's own transparency stays: no person shows where the photo was invisible.
    half = image.shape[1] // 2
    assert mask[:, half:].any()
    transparent = read_rgb(photos / "photos" / "t_cutout.png")
    np.testing.assert_array_equal(transparent[..., 3], np.where(np.arange(mask.shape[1]) < half, mask, 0))

    background = read_rgb(photos / "photos" / "a_background.png")
    np.testing.assert_array_equal(background, np.where(person, image, [0, 0, 255]))

    overlay = read_rgb(photos / "a_overlay.png")
    assert overlay.shape == image.shape
    np.testing.assert_array_equal(np.where(person, 0, overlay), np.where(person, 0, image))
    assert np.all(np.any(overlay != image, axis=-1)[person[..., 0]])  # tinted where the person is


def test_a_background_image_covers_the_photo_without_distortion():
    """A 400x200 background behind a 200x266 photo was stretched to it (a round disc came out
    80 wide and 213 high); it is now scaled to cover the photo and cropped at its centre."""
    background = np.zeros((200, 400, 3), np.uint8)
    cv2.circle(background, (200, 100), 80, (255, 255, 255), -1)
    renderer = predict.Renderer(mode="background", background=background)
    for size in ((266, 200), (100, 400), (50, 50), (300, 1000)):
        bg = renderer.background_for(size)
        assert bg.shape == (*size, 3)
        # Where each photo pixel lands on the background, by the geometry alone: one scale for
        # both axes, centres aligned. The disc must be there, round, up to its antialiased rim.
        scale = max(size[0] / 200, size[1] / 400)
        y, x = np.mgrid[:size[0], :size[1]]
        by, bx = (y - (size[0] - 1) / 2) / scale + 99.5, (x - (size[1] - 1) / 2) / scale + 199.5
        distance = np.hypot(by - 100, bx - 200)
        disc = bg[..., 0] > 127
        rim = np.abs(distance - 80) < 1.5 + 1 / scale
        assert np.array_equal(disc[~rim], (distance < 80)[~rim]), size


def test_a_wide_gamut_photo_is_read_in_srgb(tmp_path):
    """A phone's Display-P3 photo was read as if its numbers were sRGB (its colours shifted by up
    to 19 levels in the outputs, which carry no profile); it is now converted to sRGB."""
    from PIL import Image, ImageCms

    stored = np.zeros((40, 30, 3), np.uint8)
    stored[:20] = (180, 90, 70)  # a skin-like colour
    stored[20:] = (128, 128, 128)
    srgb = ImageCms.ImageCmsProfile(ImageCms.createProfile("sRGB")).tobytes()
    for name, profile in (("plain", None), ("srgb", srgb), ("p3", fx.wide_gamut_profile())):
        Image.fromarray(stored).save(tmp_path / f"{name}.png",
                                     **({"icc_profile": profile} if profile else {}))
    for name in ("plain", "srgb"):
        image, alpha = predict.read_image(tmp_path / f"{name}.png", 10**6)
        np.testing.assert_array_equal(image, stored)
        assert alpha is None
    image, _ = predict.read_image(tmp_path / "p3.png", 10**6)
    colour, grey = image[:20].astype(int), image[20:].astype(int)
    assert np.ptp(colour, axis=-1).min() > 110 + 5  # the same numbers mean more saturation in P3
    assert np.ptp(grey, axis=-1).max() <= 1  # and grey stays grey


def test_a_transparent_tiff_reads_like_the_same_png(tmp_path):
    """OpenCV returns a TIFF's colours multiplied by its alpha, which cutouts then applied again:
    semi-transparent edges came out darker than from the same PNG."""
    from PIL import Image

    rgba = np.dstack([photo(30, 40, seed=3), np.tile(np.linspace(0, 255, 40).astype(np.uint8), (30, 1))])
    for suffix in ("png", "tif"):
        Image.fromarray(rgba).save(tmp_path / f"ramp.{suffix}")
    png, tif = (predict.read_image(tmp_path / f"ramp.{suffix}", 10**6) for suffix in ("png", "tif"))
    np.testing.assert_array_equal(png[1], rgba[..., 3])
    np.testing.assert_array_equal(tif[1], rgba[..., 3])
    np.testing.assert_array_equal(tif[0], png[0])
    np.testing.assert_array_equal(png[0], rgba[..., :3])


@pytest.mark.parametrize("compression", [None, "tiff_lzw"])
def test_a_turned_transparent_tiff_is_read_upright(tmp_path, compression):
    """Opened by name, PIL maps an uncompressed TIFF and decoded it without its orientation."""
    from PIL import Image

    upright = np.dstack([photo(30, 40, seed=4), np.full((30, 40), 200, np.uint8)])
    stored = Image.fromarray(np.ascontiguousarray(np.rot90(upright, 1)))  # EXIF 6 turns it back
    exif = stored.getexif()
    exif[0x0112] = 6
    stored.save(tmp_path / "turned.tif", compression=compression, exif=exif)
    image, alpha = predict.read_image(tmp_path / "turned.tif", 10**6)
    np.testing.assert_array_equal(image, upright[..., :3])
    np.testing.assert_array_equal(alpha, upright[..., 3])


@pytest.mark.parametrize("orientation", [3, 6])
def test_transparency_turns_with_a_photo_oriented_by_xmp(tmp_path, orientation):
    """Colour came from OpenCV (which ignores an orientation given only in XMP) and alpha from
    PIL (which applies it): the alpha was turned against the photo, or dropped."""
    from PIL import Image, PngImagePlugin

    rgba = np.zeros((40, 30, 4), np.uint8)
    rgba[:10] = (255, 0, 0, 0)  # a transparent red band on top
    rgba[10:] = (0, 0, 255, 255)  # opaque blue below
    xmp = ('<x:xmpmeta xmlns:x="adobe:ns:meta/"><rdf:RDF xmlns:rdf="http://www.w3.org/1999/02/'
           '22-rdf-syntax-ns#"><rdf:Description xmlns:tiff="http://ns.adobe.com/tiff/1.0/" '
           f'tiff:Orientation="{orientation}"/></rdf:RDF></x:xmpmeta>')
    info = PngImagePlugin.PngInfo()
    info.add_itxt("XML:com.adobe.xmp", xmp)
    Image.fromarray(rgba).save(tmp_path / "x.png", pnginfo=info)
    image, alpha = predict.read_image(tmp_path / "x.png", 10**6)
    assert alpha is not None and alpha.shape == image.shape[:2]
    assert image.shape[:2] == ((40, 30) if orientation == 3 else (30, 40))  # turned
    np.testing.assert_array_equal(image[alpha == 0], [[255, 0, 0]] * 300)
    np.testing.assert_array_equal(image[alpha == 255], [[0, 0, 255]] * 900)


def test_options_a_run_ignores_are_noted():
    notes = predict.ignored_option_notes
    quiet = dict(mode="background", soft=False, background_given=True, threshold_given=True)
    assert notes(**quiet) == []
    assert notes(**dict(quiet, mode="cutout")) == [
        "--background is used by --mode background only; --mode cutout ignores it"]
    assert notes(**dict(quiet, soft=True)) == [
        "--threshold is ignored with --soft (the probability itself is the alpha)"]
    assert notes(**dict(quiet, soft=True, threshold_given=False)) == []
    for mode in ("mask", "overlay", "background"):  # opaque outputs: nothing about black
        assert predict.video_note(mode) == "videos are written without their audio", mode
    assert predict.video_note("cutout") == ("videos are written without their audio; video has no "
                                            "transparency, so cutouts of videos are on black")


def test_a_bad_background_is_a_usage_error(tiny_model_dir, jax_cache, tmp_path):
    fx.write(tmp_path / "a.png", photo(20, 20))
    result = run_cli(tiny_model_dir, tmp_path / "a.png", "--output", tmp_path / "out",
                     "--mode", "background", "--background", "purple", cache=jax_cache)
    assert result.returncode != 0
    assert "--background purple: not a colour" in result.stderr
    assert "Traceback" not in result.stderr


def test_a_background_image_that_cannot_be_reached_is_a_value_error(tmp_path, monkeypatch):
    """A --background image in a folder this user may not enter ended the run in a
    PermissionError traceback. Monkeypatched: chmod does not stop root."""
    fx.refuse_stat_under(monkeypatch, tmp_path / "theirs")
    with pytest.raises(ValueError, match=r"^cannot reach it \(Permission denied\)$"):
        predict.read_background(str(tmp_path / "theirs" / "bg.png"), 10**6)


def test_a_home_relative_background_image_is_found(tiny_model_dir, jax_cache, tmp_path):
    fx.write(tmp_path / "a.png", photo(20, 20))
    fx.write(tmp_path / "home" / "bg.png", np.full((8, 8, 3), (0, 0, 255), np.uint8))
    result = run_cli(tiny_model_dir, tmp_path / "a.png", "--output", tmp_path / "out", "--mode",
                     "background", "--background=~/bg.png", "--threshold=0.999999", cache=jax_cache,
                     env={"HOME": str(tmp_path / "home")})
    assert result.returncode == 0, result.stderr
    # At that threshold nothing is person: the output is the blue background image, scaled.
    np.testing.assert_array_equal(read_rgb(tmp_path / "out" / "a_background.png"),
                                  np.full((20, 20, 3), (0, 0, 255), np.uint8))


def test_a_colour_is_the_background_even_beside_a_folder_of_its_name(tiny_model_dir, jax_cache,
                                                                      tmp_path):
    """Run where photos are sorted into white/ and green/, `--background white` and the default
    green ended the run: "--background white: a folder, not an image or a colour"."""
    fx.write(tmp_path / "white" / "a.png", photo(20, 20))
    (tmp_path / "green").mkdir()
    for given in (["--background", "white"], []):
        result = run_cli(tiny_model_dir, "white", "--output", "out", "--mode", "background",
                         "--threshold=0.999999", *given, cache=jax_cache, cwd=tmp_path,
                         env={"PYTHONPATH": str(REPO)})
        assert result.returncode == 0, result.stderr
        colour = (255, 255, 255) if given else (0, 255, 0)  # nothing is person at that threshold
        np.testing.assert_array_equal(read_rgb(tmp_path / "out" / "white" / "a_background.png"),
                                      np.full((20, 20, 3), colour, np.uint8))


def test_cli_refine_writes_the_refined_soft_mask(tiny_model_dir, jax_cache, tmp_path):
    image = photo(*SIZES["a.png"], seed=0)
    fx.write(tmp_path / "a.png", image)
    result = run_cli(tiny_model_dir, tmp_path / "a.png", "--output", tmp_path / "out", "--soft",
                     "--refine", cache=jax_cache)
    assert result.returncode == 0, result.stderr
    model, config, _ = inference.load_pretrained(tiny_model_dir)
    expected = {refined: predict.Predictor(model, config.data.image_size, refined=refined)
                .probabilities([image])[0] for refined in (False, True)}
    written = read_rgb(tmp_path / "out" / "a_mask.png").astype(np.float32)
    assert np.abs(written - expected[True] * 255).max() <= 1
    assert np.abs(written - expected[False] * 255).max() > 1  # not the plain upsampling


def test_cli_threshold_and_flip_tta_reach_the_mask(tiny_model_dir, jax_cache, tmp_path):
    # The random model's probabilities lie within 0.005 of 0.5: a threshold among them.
    image = photo(*SIZES["a.png"], seed=0)
    fx.write(tmp_path / "a.png", image)
    result = run_cli(tiny_model_dir, tmp_path / "a.png", "--output", tmp_path / "out",
                     "--threshold", "0.501", "--flip_tta", cache=jax_cache)
    assert result.returncode == 0, result.stderr
    model, config, _ = inference.load_pretrained(tiny_model_dir)
    probs = {flip: predict.Predictor(model, config.data.image_size, flip_tta=flip)
             .probabilities([image])[0] for flip in (False, True)}
    written = read_rgb(tmp_path / "out" / "a_mask.png")
    expected = np.where(probs[True] >= 0.501, 255, 0)
    # Another process may round a probability at the threshold the other way, nothing more.
    assert np.all((written == expected) | (np.abs(probs[True] - 0.501) < 1e-5))
    assert (written != np.where(probs[True] >= 0.5, 255, 0)).sum() > 10  # not the default 0.5
    assert (written != np.where(probs[False] >= 0.501, 255, 0)).sum() > 10  # nor without flips


def test_cli_takes_jpegs_saved_as_jfif_or_jpe_and_names_their_outputs_as_a_jpgs(
        tiny_model_dir, jax_cache, tmp_path):
    """Browsers save JPEGs as .jfif or .jpe: a folder of them was passed over."""
    ok, jpeg = cv2.imencode(".jpg", cv2.cvtColor(photo(40, 56), cv2.COLOR_RGB2BGR))
    (tmp_path / "saved").mkdir()
    for name in ("x.jpg", "y.jfif", "z.jpe", "w.JFIF"):
        (tmp_path / "saved" / name).write_bytes(jpeg.tobytes())
    result = run_cli(tiny_model_dir, tmp_path / "saved", "--output", tmp_path / "out",
                     cache=jax_cache)
    assert result.returncode == 0, result.stderr
    assert "passed over" not in result.stdout
    out = tmp_path / "out" / "saved"
    assert sorted(p.name for p in out.iterdir()) == ["w_mask.png", "x_mask.png", "y_mask.png",
                                                     "z_mask.png"]
    for stem in "wyz":  # the same pixels as the .jpg, so the same mask
        np.testing.assert_array_equal(read_rgb(out / f"{stem}_mask.png"),
                                      read_rgb(out / "x_mask.png"))


def test_parse_colour():
    assert predict.parse_colour("white") == (255, 255, 255)
    assert predict.parse_colour("Green") == (0, 255, 0)
    assert predict.parse_colour("#00ff80") == (0, 255, 128)
    assert predict.parse_colour("1, 2,3") == (1, 2, 3)
    for bad in ("#00ff", "#zzzzzz", "300,0,0"):
        with pytest.raises(ValueError, match="not a colour"):
            predict.parse_colour(bad)


def test_collect_inputs_skips_earlier_outputs_only(tmp_path):
    photos = tmp_path / "photos"
    for name in ("a.png", "sub/b.png", "out/photos/a_mask.png", "photos/c_mask.png"):
        (photos / name).parent.mkdir(parents=True, exist_ok=True)
        (photos / name).write_bytes(b"")

    def names(output):
        images, *_ = predict.collect_inputs([photos], output)
        return sorted(str(p.relative_to(photos)) for p, _ in images)

    # Output inside the input folder: all of it skipped.
    assert names(photos / "out") == ["a.png", "photos/c_mask.png", "sub/b.png"]
    # Output = the input folder: only photos/photos/, where its outputs go, is skipped.
    assert names(photos) == ["a.png", "out/photos/a_mask.png", "sub/b.png"]
    # Output = the parent: outputs land in photos/ itself, told apart by name (next test).
    assert len(names(tmp_path)) == 4
    assert len(names(tmp_path / "elsewhere")) == 4


def test_collect_inputs_passes_over_outputs_beside_their_inputs_and_non_media(tmp_path,
                                                                             monkeypatch):
    photos = tmp_path / "photos"
    photos.mkdir()
    taken = ["x.jpg", "y_cutout.png", "x_overlay.jpg", "clip.mp4", "n_mask.png"]
    passed_over = ["x_mask.png", "x_mask_mask.png", "clip_overlay.mp4", "notes.txt", "n.txt"]
    for name in taken + passed_over:
        (photos / name).write_bytes(b"")
    monkeypatch.chdir(photos)
    images, videos, problems, n, unmarked = predict.collect_inputs(["."], tmp_path / "out")
    assert sorted(str(p) for p, _ in images + videos) == sorted(taken)
    assert n == len(passed_over) and not problems
    # None of them carries the output mark: the ones named as outputs are named to the user.
    assert sorted(map(str, unmarked)) == ["clip_overlay.mp4", "x_mask.png", "x_mask_mask.png"]
    # A folder that gives nothing to predict is said so (it once gave only "wrote 0 outputs").
    (tmp_path / "empty").mkdir()
    (tmp_path / "text").mkdir()
    (tmp_path / "text" / "notes.txt").write_bytes(b"")
    _, _, problems, *_ = predict.collect_inputs([tmp_path / "empty", tmp_path / "text"],
                                               tmp_path / "out")
    assert problems == [(tmp_path / d, "no images or videos in this folder")
                        for d in ("empty", "text")]
    # "." mirrors as the folder's own name under --output, not as the output folder itself.
    assert {str(stem) for _, stem in images} == {"photos/x", "photos/y_cutout", "photos/x_overlay",
                                                 "photos/n_mask"}
    # A linked folder mirrors under the link's name, not its target's.
    (tmp_path / "link").symlink_to(photos)
    images, *_ = predict.collect_inputs([tmp_path / "link"], tmp_path / "out")
    assert {stem.parts[0] for _, stem in images} == {"link"}
    # Linked folders inside an input folder are searched too (rglob left them out, and a
    # folder of links was "no images"), each real folder once: a link loop ends.
    album = tmp_path / "album"
    album.mkdir()
    (album / "2024").symlink_to(photos)
    (album / "again").symlink_to(photos)
    (album / "loop").symlink_to(album)
    images, _, problems, *_ = predict.collect_inputs([album], tmp_path / "out")
    assert not problems
    assert {str(stem) for _, stem in images} == {"album/2024/x", "album/2024/y_cutout",
                                                 "album/2024/x_overlay", "album/2024/n_mask"}
    # A real folder keeps its own name beside a link to it that sorts first.
    shelf = tmp_path / "shelf"
    (shelf / "photos_2024").mkdir(parents=True)
    fx.write(shelf / "photos_2024" / "z.png", photo(20, 20))
    (shelf / "latest").symlink_to(shelf / "photos_2024")
    images, *_ = predict.collect_inputs([shelf], tmp_path / "out")
    assert [str(stem) for _, stem in images] == ["shelf/photos_2024/z"]


# --------------------------------------------------------------------------------------------
# In process: batching by canvas bucket, and the evaluator's resolution rule on a real photo


def test_mixed_sizes_equal_one_at_a_time_one_compilation_per_bucket_and_rows(tiny_model_dir):
    model, config, _ = inference.load_pretrained(tiny_model_dir)
    predictor = predict.Predictor(model, config.data.image_size, batch_size=4)
    sizes = [(50, 70), (131, 40), (64, 64), (60, 33), (65, 64), (33, 60), (1, 1), (40, 64),
             (20, 30), (30, 100)]
    images = [photo(h, w, seed=i) for i, (h, w) in enumerate(sizes)]
    per_bucket = collections.Counter(resolution.canvas_for([s], predict.BUCKET) for s in sizes)
    assert sorted(per_bucket.values()) == [1, 1, 2, 6]

    # Two jits, the model's keyed by (model, rows), the way back by (canvas, rows), shared with
    # the earlier tests' predictors.
    predict._model_probabilities.clear_cache()
    predict._at_sizes.clear_cache()

    def cache():
        return predict._model_probabilities._cache_size(), predict._at_sizes._cache_size()

    together = predictor.probabilities(images)
    # Rows per call: 4 for full batches, else the next power of two: 1, 1, 2 and 4 + 2. The
    # model compiles once for each row count, whatever the bucket.
    assert cache() == (3, 5)
    alone = [predictor.probabilities([image])[0] for image in images]
    assert cache() == (3, 7)  # one image at a time: rows 1 in the 2- and 6-image buckets
    predictor.probabilities([images[i] for i in (2, 3, 5, 6)])  # 4 rows of 64x64: compiled
    assert cache() == (3, 7)
    for image, t, a in zip(images, together, alone):
        assert t.shape == a.shape == image.shape[:2] and t.dtype == np.float32
        np.testing.assert_allclose(t, a, atol=1e-6)
    assert predictor.probabilities([]) == []
    # Another predictor of the same model reuses those compilations, and a dropped one is freed.
    again = predict.Predictor(model, config.data.image_size, batch_size=4)
    again.probabilities(images)
    assert cache() == (3, 7)
    dropped = weakref.ref(predictor)
    del predictor
    gc.collect()
    assert dropped() is None


@pytest.fixture(scope="module")
def pretrained():
    return inference.load_pretrained()[:2]  # the whole ensemble, as predict uses it


@pytest.mark.parametrize("refined", [False, True])
def test_real_photo_mask_scores_as_the_evaluator_scores_the_model(manual_dir, pretrained, tmp_path,
                                                                  refined):
    from jaxseg import datasets, evaluate

    model, config = pretrained
    source = input_pipeline.Head(datasets.data_source("portrait_segmentation", "test"), 1)
    example = source[0]
    predictor = predict.Predictor(model, config.data.image_size, refined=refined)
    probs = predictor.probabilities([example["image"]])[0]
    mask = predict.Renderer(mode="mask").render(example["image"], probs)
    assert mask.shape == example["image"].shape[:2]
    predict.write_image(tmp_path / f"{example['id']}.png", mask)

    evaluator = evaluate.Evaluator(source, mesh=sharding.make_mesh(1),
                                   image_size=config.data.image_size, batch_size=1)
    of_masks = evaluator.evaluate_predictions(tmp_path)["per_image"][0]
    of_model = evaluator.evaluate_model(model, refined=refined)["per_image"][0]
    assert of_masks["iou"] > 0.8
    # Same probabilities, same upsampling rule (the evaluator's canvas is larger): the same
    # pixels, up to the last float bit at exactly the threshold.
    for k in ("tp", "fp", "fn"):
        assert abs(of_masks[k] - of_model[k]) <= 2, (k, of_masks, of_model)


class Everywhere:
    """A predictor without a model: person probability `value` on every pixel."""
    batch_size = 2

    def __init__(self, value):
        self.value = value

    def probabilities(self, images):
        return [np.full(image.shape[:2], self.value, np.float32) for image in images]


def test_video_frames_keep_their_colours(tmp_path):
    """Frames go RGB through the renderer and back to OpenCV's BGR: a red background stays red
    (without the conversions it came out blue), and where the person is the photo is kept."""
    source = write_video(tmp_path / "in.mp4", frames=3)
    renderer = predict.Renderer(mode="background", threshold=0.5, soft=False,
                                background=predict.parse_colour("red"))
    for value, name in ((0.0, "red.mp4"), (1.0, "kept.mp4")):
        assert predict.predict_video(Everywhere(value), renderer, source, tmp_path / name,
                                     max_pixels=10**6) == (3, [])
    red, _ = read_video(tmp_path / "red.mp4")
    assert np.abs(np.stack(red).astype(int).mean(axis=(0, 1, 2)) - [0, 0, 255]).max() < 8  # BGR
    kept, _ = read_video(tmp_path / "kept.mp4")
    original, _ = read_video(source)
    assert np.abs(np.stack(kept).astype(int) - np.stack(original)).mean() < 8
    # Cutouts of videos are on black: no person, no photo.
    cutout = predict.Renderer(mode="cutout", threshold=0.5, soft=False, background=None)
    for value, name in ((0.0, "black.mp4"), (1.0, "whole.mp4")):
        assert predict.predict_video(Everywhere(value), cutout, source, tmp_path / name,
                                     max_pixels=10**6) == (3, [])
    assert np.stack(read_video(tmp_path / "black.mp4")[0]).astype(int).mean() < 8
    whole, _ = read_video(tmp_path / "whole.mp4")
    assert np.abs(np.stack(whole).astype(int) - np.stack(original)).mean() < 8


@pytest.mark.parametrize("fps", [119.533, 66.667, 29.97, 240.0])
def test_a_video_at_an_uneven_high_frame_rate_is_written_at_its_rate(tmp_path, fps):
    """MPEG-4 counts at most 65535 time units a second: a slow-motion video averaging 119.533
    fps (a phone's variable rate) was refused ('could not open ... for writing'); it is written
    with all its frames at that rate to 0.01%."""
    source = write_video(tmp_path / "in.avi", frames=3, fps=fps, fourcc="MJPG")
    assert read_video(source)[1] == pytest.approx(fps, abs=1e-9)  # the rate the header gives
    renderer = predict.Renderer(mode="mask")
    assert predict.predict_video(Everywhere(1.0), renderer, source, tmp_path / "out.mp4",
                                 max_pixels=10**6) == (3, [])
    written, written_fps = read_video(tmp_path / "out.mp4")
    assert len(written) == 3 and written_fps == pytest.approx(fps, rel=1e-4)


def test_a_soft_background_replacement_blends_by_the_probability():
    image = photo(12, 16)
    probs = np.full((12, 16), 0.25, np.float32)
    out = predict.Renderer(mode="background", soft=True, background=(0, 0, 255)).render(image, probs)
    expected = 0.25 * image.astype(np.float64) + 0.75 * np.array([0, 0, 255], np.float64)
    assert np.abs(out.astype(np.float64) - expected).max() <= 1


def test_soft_compositions_round_as_numpy_alpha_compositing_does():
    """out = alpha * photo + (1 - alpha) * background, rounded: truncated, the soft edge of a
    white photo over white came out 254, and every blend half a level dark."""
    alpha = np.tile(np.linspace(0, 1, 301, dtype=np.float32), (7, 1))
    white = np.full((7, 301, 3), 255, np.uint8)
    over_white = predict.Renderer(mode="background", soft=True, background=(255, 255, 255))
    np.testing.assert_array_equal(over_white.render(white, alpha), white)
    image = photo(7, 301, seed=5)
    a = alpha.astype(np.float64)[..., None]
    colour = np.array([30, 200, 90], np.float64)
    cases = {"background": a * image + (1 - a) * colour,
             "overlay": image * (1 - a / 2) + np.array([255, 0, 160]) * a / 2}
    for mode, expected in cases.items():
        out = predict.Renderer(mode=mode, soft=True, background=(30, 200, 90)).render(image, alpha)
        assert np.abs(out - expected).max() <= 0.5 + 1e-3, mode


def test_a_soft_video_cutout_is_the_photo_composed_onto_black_by_its_alpha(tmp_path, monkeypatch):
    """A video's cutout frame is alpha * photo over black, rounded (it was truncated: half a
    level dark along every soft edge), with the alpha a cutout PNG holds."""
    source = write_video(tmp_path / "in.avi", frames=3, fourcc="MJPG")
    originals, _ = read_video(source)
    written = []

    class Recorder:  # the frames as given to the MPEG-4 encoder, before its losses
        def __init__(self, *args):
            pass

        def isOpened(self):
            return True

        def write(self, frame):
            written.append(frame)

        def release(self):
            pass

    monkeypatch.setattr(predict.cv2, "VideoWriter", Recorder)
    cutout = predict.Renderer(mode="cutout", soft=True)
    predict.predict_video(Everywhere(0.3), cutout, source, tmp_path / "out.mp4", max_pixels=10**6)
    alpha = np.round(0.3 * 255) / 255
    np.testing.assert_array_equal(np.stack(written), np.round(np.stack(originals) * alpha))


def test_odd_sized_and_short_videos_are_noted(tiny_model_dir, tmp_path, monkeypatch):
    """OpenCV's MPEG-4 writer silently made a 97x61 video 96x60, and a video that ended early
    was cut short without a word: the crop is now explicit and both are noted."""
    model, config, _ = inference.load_pretrained(tiny_model_dir)
    predictor = predict.Predictor(model, config.data.image_size, batch_size=2)
    renderer = predict.Renderer(mode="mask", threshold=0.5, soft=False, background=None)
    frames = [np.ascontiguousarray(photo(61, 97, seed=i)[..., ::-1]) for i in range(3)]  # BGR

    class ShortOddCapture:  # says 5 frames of 97x61; 3 can be read
        def __init__(self, _path):
            self.read_so_far = 0

        def isOpened(self):
            return True

        def get(self, prop):
            return {cv2.CAP_PROP_FPS: 10.0, cv2.CAP_PROP_FRAME_WIDTH: 97,
                    cv2.CAP_PROP_FRAME_HEIGHT: 61, cv2.CAP_PROP_FRAME_COUNT: 5}[prop]

        def read(self):
            if self.read_so_far == len(frames):
                return False, None
            self.read_so_far += 1
            return True, frames[self.read_so_far - 1]

        def release(self):
            pass

    with monkeypatch.context() as m:
        m.setattr(predict.cv2, "VideoCapture", ShortOddCapture)
        count, notes = predict.predict_video(predictor, renderer, tmp_path / "in.avi",
                                             tmp_path / "out.mp4", max_pixels=10**6)
    written, fps = read_video(tmp_path / "out.mp4")
    assert len(written) == count == 3 and written[0].shape == (60, 96, 3)
    assert fps == pytest.approx(10.0)
    assert len(notes) == 2
    assert "97x61 frames written as 96x60" in notes[0] and "only 3 of the 5 frames" in notes[1]


def test_collect_inputs_leaves_out_the_systems_files(tmp_path):
    """Windows' Thumbs.db and desktop.ini, macOS's Icon\\r: left out as .DS_Store is, not
    counted among the files passed over in the input folders."""
    photos = tmp_path / "photos"
    for name in ("a.png", ".DS_Store", "Thumbs.db", "sub/desktop.ini", "Icon\r"):
        (photos / name).parent.mkdir(parents=True, exist_ok=True)
        (photos / name).write_bytes(b"")
    images, videos, problems, passed_over, _ = predict.collect_inputs([photos], tmp_path / "out")
    assert [p.name for p, _ in images] == ["a.png"] and videos == []
    assert problems == [] and passed_over == 0


def test_collect_inputs_skips_hidden_files_and_repeats_and_knows_more_videos(tmp_path):
    photos = tmp_path / "photos"
    for name in ("a.png", "._a.png", ".thumbnails/a.png", "clip.3gp", "clip2.mpg"):
        (photos / name).parent.mkdir(parents=True, exist_ok=True)
        (photos / name).write_bytes(b"")
    images, videos, problems, passed_over, _ = predict.collect_inputs(
        [photos, photos / "a.png", str(photos) + "/"], tmp_path / "out")
    assert [p.name for p, _ in images] == ["a.png"]  # once, though named three times
    assert sorted(p.name for p, _ in videos) == ["clip.3gp", "clip2.mpg"]
    assert not problems and passed_over == 0
    # An earlier run's output (it carries the mark) under another --output is not an input.
    predict.write_image(photos / "out" / "photos" / "a_mask.png", photo(10, 10))
    images, _, _, passed_over, _ = predict.collect_inputs([photos], photos / "out2")
    assert [p.name for p, _ in images] == ["a.png"] and passed_over == 1
    # Nor beside its input, where it is not named to the user as an unmarked look-alike.
    predict.write_image(photos / "a_overlay.png", photo(10, 10))
    images, _, _, passed_over, unmarked = predict.collect_inputs([photos], photos / "out2")
    assert [p.name for p, _ in images] == ["a.png"] and passed_over == 2 and unmarked == []
    # With --output the folder itself, its outputs go to photos/photos/: a user's own photo
    # there is passed over, but named; the earlier run's marked output there is not.
    fx.write(photos / "photos" / "b.png", photo(10, 10))
    predict.write_image(photos / "photos" / "a_mask.png", photo(10, 10))
    images, _, _, passed_over, unmarked = predict.collect_inputs([photos], photos)
    assert [p.name for p, _ in images] == ["a.png"] and passed_over == 4
    assert unmarked == [photos / "photos" / "b.png"]
    # Named twice, the folder's passed-over files are counted, and named, once.
    (photos / "notes.txt").write_text("not an image\n")
    images, _, _, passed_over, unmarked = predict.collect_inputs([photos, str(photos) + "/"], photos)
    assert [p.name for p, _ in images] == ["a.png"] and passed_over == 5
    assert unmarked == [photos / "photos" / "b.png"]
    # A folder of earlier outputs says so, once however often it is named; a user's own photo
    # where outputs go is no earlier output.
    _, _, problems, passed_over, _ = predict.collect_inputs([photos / "out", photos / "out"],
                                                            tmp_path / "out3")
    assert problems == [(photos / "out", "no images or videos in this folder, only 1 earlier "
                                         "output(s) of jaxseg.predict")] and passed_over == 1
    fx.write(tmp_path / "solo" / "solo" / "b.png", photo(10, 10))
    _, _, problems, _, unmarked = predict.collect_inputs([tmp_path / "solo"], tmp_path / "solo")
    assert problems == [(tmp_path / "solo", "no images or videos in this folder")]
    assert unmarked == [tmp_path / "solo" / "solo" / "b.png"]


def test_a_link_to_a_missing_photo_in_a_folder_is_named_as_skipped(tmp_path):
    """A folder's links to photos that are gone (on a disk not mounted) were left out without a
    word, and a folder of only such links was said to hold no images or videos."""
    photos = tmp_path / "photos"
    fx.write(photos / "a.png", photo(10, 10))
    (photos / "b.jpg").symlink_to(tmp_path / "unmounted" / "b.jpg")
    (photos / "notes.txt").symlink_to(tmp_path / "unmounted" / "notes.txt")  # not a photo anyway
    (photos / "loop.png").symlink_to("loop.png")  # a link to itself: no target either
    images, _, problems, _, _ = predict.collect_inputs([photos, photos], tmp_path / "out")
    assert [p.name for p, _ in images] == ["a.png"]
    assert problems == [(photos / "b.jpg", "a link to a missing file"),  # once, though named twice
                        (photos / "loop.png", "a link to a missing file")]
    (photos / "a.png").unlink()
    _, _, problems, _, _ = predict.collect_inputs([photos], tmp_path / "out")
    assert [why for _, why in problems] == ["a link to a missing file"] * 2


def test_folders_that_cannot_be_listed_or_entered_are_named_as_skipped(tmp_path, monkeypatch):
    """A subfolder the user may not list was left out without a word (exit status 0), one named
    itself was said to hold no images; one listed but not entered (`chmod -R 644`) ended the run
    in a PermissionError traceback. Monkeypatched: chmod does not stop root."""
    photos = tmp_path / "photos"
    for name in ("a.png", "locked/b.png", "unentered/c.png", "lost+found/d.png", ".cache/e.png"):
        fx.write(photos / name, photo(10, 10))
    (photos / "unentered" / "notes.txt").write_text("not an image\n")  # no input: not named
    not_listed = {photos / "locked", photos / "lost+found", photos / ".cache"}
    scandir, stat = os.scandir, pathlib.Path.stat

    def denied(path):
        return PermissionError(13, "Permission denied", str(path))

    def refusing_scandir(path):
        if pathlib.Path(path) in not_listed:
            raise denied(path)
        return scandir(path)

    def refusing_stat(self, **kwargs):
        if self.parent == photos / "unentered":
            raise denied(self)
        return stat(self, **kwargs)

    monkeypatch.setattr(os, "scandir", refusing_scandir)
    monkeypatch.setattr(pathlib.Path, "stat", refusing_stat)
    images, _, problems, _, _ = predict.collect_inputs(
        [photos, photos / "unentered" / "c.png", photos / "locked"], tmp_path / "out")
    assert [p.name for p, _ in images] == ["a.png"]
    assert problems == [(photos / "unentered" / "c.png", "cannot be read (Permission denied)"),
                        (photos / "locked", "could not list this folder (Permission denied)")]
    _, _, problems, _, _ = predict.collect_inputs([photos / "locked"], tmp_path / "out")
    assert problems == [(photos / "locked", "could not list this folder (Permission denied)")]


def test_a_photo_linked_to_in_its_folder_keeps_its_own_name(tmp_path):
    """A link sorted before the photo it points at took the photo's place: the outputs had
    best_mask.png, and no portrait_mask.png, for a folder of portrait.jpg and best.jpg linking to
    it."""
    photos = tmp_path / "photos"
    fx.write(photos / "portrait.jpg", photo(10, 10))
    fx.write(photos / "sub" / "group.jpg", photo(10, 10))
    (photos / "best.jpg").symlink_to("portrait.jpg")
    (photos / "a.jpg").symlink_to(pathlib.Path("sub", "group.jpg"))
    images, _, _, _, _ = predict.collect_inputs([photos], tmp_path / "out")
    assert sorted(stem for _, stem in images) == [pathlib.Path("photos", "portrait"),
                                                  pathlib.Path("photos", "sub", "group")]


def test_outputs_are_marked_and_only_marked_files_are_replaced(tmp_path):
    image = photo(20, 30)
    predict.write_image(tmp_path / "a_mask.png", image)
    np.testing.assert_array_equal(read_rgb(tmp_path / "a_mask.png"), image)  # still a valid PNG
    assert predict.written_by_predict(tmp_path / "a_mask.png")
    fx.write(tmp_path / "b_mask.png", image)  # the user's own file, e.g. a ground-truth mask
    assert not predict.written_by_predict(tmp_path / "b_mask.png")
    claimed = {}
    assert predict.claim_output(tmp_path / "a_mask.png", tmp_path / "a.png", set(), claimed) is None
    why = predict.claim_output(tmp_path / "b_mask.png", tmp_path / "b.png", set(), claimed)
    assert why and "was not written by jaxseg.predict: not replaced" in why


def test_a_users_file_named_like_an_output_is_never_replaced(tiny_model_dir, jax_cache, tmp_path):
    # x.png with its ground truth x_mask.png beside it, and --output at the folder's parent, where
    # x.png's mask would go: the ground truth stays, the run says why, and y.png is still done.
    photos = tmp_path / "photos"
    fx.write(photos / "x.png", photo(30, 30, seed=1))
    fx.write(photos / "y.png", photo(30, 30, seed=2))
    truth = np.zeros((30, 30), np.uint8)
    truth[5:25, 10:20] = 255
    fx.write(photos / "x_mask.png", truth)
    before = (photos / "x_mask.png").read_bytes()
    for run in range(2):  # the second run replaces its own y_mask.png
        result = run_cli(tiny_model_dir, photos, "--output", tmp_path, cache=jax_cache)
        assert result.returncode == predict.EXIT_SKIPPED, result.stderr
        assert (f"skipped {photos / 'x.png'}: output {photos / 'x_mask.png'} exists and was not "
                "written by jaxseg.predict") in result.stderr
        assert "wrote 1 outputs" in result.stdout
        # Passed over as an input, by its name: said, unlike the run's own marked y_mask.png.
        assert (f"note: passed over 1 file(s) named like outputs of a file beside them, or where "
                f"outputs go, but not written by this tool: {photos / 'x_mask.png'};") in result.stderr
        assert (photos / "x_mask.png").read_bytes() == before
        assert predict.written_by_predict(photos / "y_mask.png")


def test_a_folder_name_that_is_not_utf8_reaches_the_summary_and_exit_status(tiny_model_dir, jax_cache,
                                                                            tmp_path):
    # Under a UTF-8 locale (PYTHONIOENCODING stands in for one) stdout refuses such a name; the
    # summary naming the output folder, and the skipped input's line, must still come.
    photos = pathlib.Path(os.fsdecode(os.fsencode(tmp_path) + b"/caf\xe9"))
    photos.mkdir()
    # Written through bytes: OpenCV's imwrite crashes on such a path.
    (photos / "a.png").write_bytes(cv2.imencode(".png", photo(30, 30))[1].tobytes())
    result = run_cli(tiny_model_dir, photos, tmp_path / "missing.png", "--output", photos / "out",
                     cache=jax_cache, env={"PYTHONIOENCODING": "utf-8"})
    assert result.returncode == predict.EXIT_SKIPPED, result.stderr
    assert "wrote 1 outputs to" in result.stdout and "caf\\udce9" in result.stdout  # as stderr writes it
    assert "1 input(s) skipped" in result.stderr
    assert predict.written_by_predict(photos / "out" / os.fsdecode(b"caf\xe9") / "a_mask.png")


def test_a_png_that_cannot_be_encoded_is_a_failed_write(tmp_path, monkeypatch):
    """The run lists failed writes and goes on; an encoding error ended it with a traceback."""
    from jaxseg import photo_pixels

    def refuse(array):
        raise photo_pixels.PhotoError("PNG encoding failed")

    monkeypatch.setattr(photo_pixels, "encode_png", refuse)
    with pytest.raises(OSError, match="PNG encoding failed"):
        predict.write_image(tmp_path / "x_mask.png", np.zeros((4, 4), np.uint8))
    assert not (tmp_path / "x_mask.png").exists()


# Rewrites an output under a file size limit that the new one exceeds: the write fails halfway,
# as on a full disk (with SIGXFSZ ignored the kernel refuses the write with EFBIG).
REWRITE_PAST_LIMIT = """
import pathlib, resource, signal, sys
import numpy as np
from jaxseg import predict

target = pathlib.Path(sys.argv[1])
predict.write_image(target, np.zeros((8, 8), np.uint8))
signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
resource.setrlimit(resource.RLIMIT_FSIZE, (target.stat().st_size + 100, resource.RLIM_INFINITY))
try:
    predict.write_image(target, np.random.default_rng(0).integers(0, 256, (64, 64, 3), np.uint8))
except OSError as e:
    print("failed", e.errno)
"""


def test_a_write_that_fails_halfway_leaves_the_earlier_output_whole(tmp_path):
    """A rerun whose write failed (a full disk) destroyed the earlier run's output: the file was
    truncated in place, leaving a broken PNG that carried the mark, while the run said only that
    it could not write."""
    import errno

    earlier = tmp_path / "earlier.png"
    predict.write_image(earlier, np.zeros((8, 8), np.uint8))
    result = python(REWRITE_PAST_LIMIT, tmp_path / "out" / "x_mask.png")
    assert result.stdout.split() == ["failed", str(errno.EFBIG)], result.stderr
    assert (tmp_path / "out" / "x_mask.png").read_bytes() == earlier.read_bytes()
    assert [p.name for p in (tmp_path / "out").iterdir()] == ["x_mask.png"]  # nothing half-written
    longest = tmp_path / ("x" * 246 + "_mask.png")  # 255 bytes, the most a file name can have
    predict.write_image(longest, np.zeros((8, 8), np.uint8))
    assert predict.written_by_predict(longest)


def test_an_opaque_png_is_decoded_once(tmp_path, monkeypatch):
    """Asking PIL for a PNG's orientation decoded the whole photo before OpenCV decoded it again."""
    from PIL import Image, PngImagePlugin

    upright = photo(30, 40, seed=5)
    info = PngImagePlugin.PngInfo()  # turned by XMP: without an eXIf chunk PIL looked after the pixels
    info.add_itxt("XML:com.adobe.xmp", '<x:xmpmeta xmlns:x="adobe:ns:meta/"><rdf:RDF xmlns:rdf="http'
                  '://www.w3.org/1999/02/22-rdf-syntax-ns#"><rdf:Description xmlns:tiff="http://ns.'
                  'adobe.com/tiff/1.0/" tiff:Orientation="6"/></rdf:RDF></x:xmpmeta>')
    Image.fromarray(np.ascontiguousarray(np.rot90(upright, 1))).save(tmp_path / "x.png", pnginfo=info)
    loads = []
    load = PngImagePlugin.PngImageFile.load
    monkeypatch.setattr(PngImagePlugin.PngImageFile, "load",
                        lambda self: loads.append(1) or load(self))
    image, alpha = predict.read_image(tmp_path / "x.png", 10**6)
    assert loads == [] and alpha is None
    np.testing.assert_array_equal(image, upright)


def test_a_video_name_that_is_not_utf8_is_skipped_not_a_crash(tiny_model_dir, tmp_path, monkeypatch):
    """OpenCV 5 crashes the process (SIGSEGV) on such a path: the run died with every later video."""
    model, config, _ = inference.load_pretrained(tiny_model_dir)
    predictor = predict.Predictor(model, config.data.image_size, batch_size=2)
    renderer = predict.Renderer(mode="mask")

    def must_not_open(*args):
        raise AssertionError("OpenCV was given the path")

    monkeypatch.setattr(predict.cv2, "VideoCapture", must_not_open)
    latin1 = tmp_path / os.fsdecode(b"caf\xe9.mp4")
    with pytest.raises(predict.InputError, match="is not UTF-8 text, which OpenCV cannot open"):
        predict.predict_video(predictor, renderer, latin1, tmp_path / "cafe_mask.mp4",
                              max_pixels=10**6)
    with pytest.raises(predict.InputError, match="its output's path"):
        predict.predict_video(predictor, renderer, tmp_path / "cafe.mp4", latin1, max_pixels=10**6)


def test_photos_are_predicted_in_chunks_of_bounded_pixels(tiny_model_dir, tmp_path, monkeypatch):
    """Large photos end a chunk early: all of a chunk's photos and maps are held at once."""
    model, config, _ = inference.load_pretrained(tiny_model_dir)
    predictor = predict.Predictor(model, config.data.image_size, batch_size=2)
    calls = []
    probabilities = predictor.probabilities
    monkeypatch.setattr(predictor, "probabilities",
                        lambda images: calls.append(len(images)) or probabilities(images))
    items = []
    for i in range(5):
        cv2.imwrite(str(tmp_path / f"p{i}.png"), photo(30, 40, seed=i))
        items.append((tmp_path / f"p{i}.png", pathlib.PurePath(f"p{i}")))
    (tmp_path / "broken.png").write_bytes(b"not a photo")  # skipped, and counted as done too
    items.append((tmp_path / "broken.png", pathlib.PurePath("broken")))

    class Progress:
        done = 0

        def update(self, n):
            self.done += n

    for budget, expected in ((10**9, [5]), (2 * 30 * 40, [2, 2, 1])):
        calls.clear()
        monkeypatch.setattr(predict, "CHUNK_PIXELS", budget)
        progress, out = Progress(), tmp_path / f"out{budget}"
        problems = predict.predict_images(predictor, predict.Renderer(mode="mask"), items, out,
                                          max_pixels=10**6, inputs_resolved=set(),
                                          progress=progress)
        assert [p for p, _ in problems] == [tmp_path / "broken.png"]
        assert calls == expected and progress.done == len(items)
        assert sorted(p.name for p in out.iterdir()) == [f"p{i}_mask.png" for i in range(5)]


def test_soft_masks_and_cutout_alphas_round_the_probability():
    """A probability of 0.999 is 255 in the written mask, not 254."""
    image = photo(4, 64)
    probs = np.tile(np.linspace(0, 1, 64, dtype=np.float32), (4, 1))
    expected = np.round(probs.astype(np.float64) * 255)
    mask = predict.Renderer(mode="mask", soft=True).render(image, probs)
    assert np.abs(mask - expected).max() == 0 and mask.dtype == np.uint8
    cutout = predict.Renderer(mode="cutout", soft=True).render(image, probs)
    np.testing.assert_array_equal(cutout[..., 3], expected)
    np.testing.assert_array_equal(cutout[..., :3], image)


def test_an_overlay_is_half_photo_half_one_tint_colour():
    """Where the person is, each pixel is the mean of the photo's and one colour: the photo
    stays visible under the tint. Elsewhere the photo is as it was."""
    image = photo(30, 40, seed=2)
    person = np.zeros((30, 40), bool)
    person[5:25, 10:30] = True
    overlay = predict.Renderer(mode="overlay").render(image, person.astype(np.float32))
    tint = 2 * overlay[person].astype(int) - image[person].astype(int)
    assert np.ptp(tint, axis=0).max() <= 2  # one colour, up to the rounding of the mean
    assert np.abs(tint.mean(axis=0) - image[person].mean(axis=0)).max() > 40  # not the photo
    np.testing.assert_array_equal(overlay[~person], image[~person])


def test_a_background_replacement_keeps_the_photos_transparent_parts_background():
    """What was invisible in the photo is not shown in front of the new background."""
    image = photo(20, 30, seed=4)
    alpha = np.full((20, 30), 255, np.uint8)
    alpha[:, 15:] = 0
    alpha[:, 10:15] = 128
    everywhere = np.ones((20, 30), np.float32)
    out = predict.Renderer(mode="background", background=(0, 0, 255)).render(image, everywhere, alpha)
    a = (alpha / 255)[..., None]
    expected = image * a + np.array([0, 0, 255]) * (1 - a)
    assert np.abs(out - expected).max() <= 1


def test_a_dangling_link_named_as_an_output_is_not_written_through(tmp_path):
    """A link at the output's name is not this tool's file, even when its target is missing:
    writing there would create a file wherever it points."""
    (tmp_path / "a_mask.png").symlink_to(tmp_path / "elsewhere" / "target.png")
    why = predict.claim_output(tmp_path / "a_mask.png", tmp_path / "a.png", set(), {})
    assert why and "was not written by jaxseg.predict: not replaced" in why


def test_a_probability_at_the_threshold_is_person_as_the_evaluator_counts_it():
    image = photo(2, 3)
    probs = np.array([[0.25, 0.5, 0.75], [0.7, 0.7, 0.1]], np.float32)
    for threshold in (0.5, 0.7):
        mask = predict.Renderer(mode="mask", threshold=threshold).render(image, probs)
        np.testing.assert_array_equal(mask, np.where(probs >= np.float32(threshold), 255, 0))


@pytest.mark.parametrize("orientation", range(1, 9))
def test_every_exif_orientation_is_read_as_pillow_shows_it(tmp_path, orientation):
    """Photos, opaque and transparent, tagged with each EXIF orientation, against Pillow's own
    exif_transpose (only 3 and 6 were read through prediction's path before)."""
    from PIL import Image, ImageOps

    stored = np.dstack([photo(30, 40, seed=6), np.tile(np.arange(40, dtype=np.uint8) * 6, (30, 1))])
    for name, pixels in (("opaque.png", stored[..., :3]), ("transparent.png", stored)):
        image = Image.fromarray(pixels)
        exif = image.getexif()
        exif[0x0112] = orientation
        image.save(tmp_path / name, exif=exif)
        with Image.open(tmp_path / name) as shown:
            expected = np.asarray(ImageOps.exif_transpose(shown).convert("RGBA"))
        rgb, alpha = predict.read_image(tmp_path / name, 10**6)
        np.testing.assert_array_equal(rgb, expected[..., :3], err_msg=name)
        if name == "opaque.png":
            assert alpha is None
        else:
            np.testing.assert_array_equal(alpha, expected[..., 3])


def test_cli_notes_the_options_it_ignores(tiny_model_dir, jax_cache, tmp_path):
    fx.write(tmp_path / "a.png", photo(20, 20))
    result = run_cli(tiny_model_dir, tmp_path / "a.png", "--output", tmp_path / "out", "--soft",
                     "--threshold", "0.3", "--background", "red", cache=jax_cache)
    assert result.returncode == 0, result.stderr
    notes = predict.ignored_option_notes(mode="mask", soft=True, background_given=True,
                                         threshold_given=True)
    assert len(notes) == 2
    for note in notes:
        assert f"note: {note}" in result.stderr


def test_a_larger_background_image_is_averaged_down_not_sampled():
    """Shrunk to cover a smaller photo, a background's fine detail averages out (as the model's
    inputs do when shrunk) instead of aliasing into stripes of its own."""
    stripes = np.tile(np.array([255, 0, 0, 0], np.uint8)[None, :, None], (200, 100, 3))
    bg = predict.Renderer(mode="background", background=stripes).background_for((50, 100))
    np.testing.assert_allclose(bg, stripes.mean(), atol=1)


def test_a_background_image_is_scaled_once_for_a_videos_frames(monkeypatch):
    """Each frame of a video scaled the background image anew: with a 24-megapixel background a
    1080p frame's render took 0.19 s instead of 0.04 s."""
    background = photo(90, 120, seed=3)
    renderer = predict.Renderer(mode="background", background=background)
    frame, probs = photo(40, 30), np.full((40, 30), 0.25, np.float32)
    expected = renderer.render(frame, probs)
    resized = []
    resize = cv2.resize
    monkeypatch.setattr(predict.cv2, "resize", lambda *a, **k: resized.append(1) or resize(*a, **k))
    renderer = predict.Renderer(mode="background", background=background)
    for _ in range(3):
        np.testing.assert_array_equal(renderer.render(frame, probs), expected)
    assert len(resized) == 1
    assert renderer.render(photo(30, 40), probs.T).shape == (30, 40, 3)  # another size: scaled anew
    assert len(resized) == 2


def test_a_photo_with_a_non_rgb_profile_is_read_as_it_is_without_a_note():
    """Only an RGB profile other than sRGB is converted; grey, CMYK and Lab ones (Lab here:
    Pillow builds no grey or CMYK profile) hold no RGB numbers to convert."""
    import io

    from PIL import Image, ImageCms

    from jaxseg import photo_pixels

    lab = ImageCms.ImageCmsProfile(ImageCms.createProfile("LAB")).tobytes()
    grey = np.tile(np.arange(0, 240, 8, dtype=np.uint8), (20, 1))
    encoded = io.BytesIO()
    Image.fromarray(grey).save(encoded, "PNG", icc_profile=lab)
    rgb, alpha, notes = photo_pixels.decode_photo(encoded.getvalue())
    np.testing.assert_array_equal(rgb, np.dstack([grey] * 3))
    assert alpha is None and notes == []


def test_cli_video_notes_start_their_own_line_after_the_progress_bar(tiny_model_dir, jax_cache,
                                                                      tmp_path):
    """They were printed while the video's progress bar was open, onto the end of its line."""
    # OpenCV's own MJPEG writer keeps an odd size (its FFmpeg writers round it down).
    writer = cv2.VideoWriter(str(tmp_path / "odd.avi"), cv2.CAP_OPENCV_MJPEG,
                             cv2.VideoWriter_fourcc(*"MJPG"), 10.0, (97, 61))
    if not writer.isOpened():
        pytest.skip("this OpenCV build has no MJPEG writer of its own")
    for i in range(3):
        writer.write(photo(61, 97, seed=i))
    writer.release()
    result = run_cli(tiny_model_dir, tmp_path / "odd.avi", "--output", tmp_path / "out",
                     cache=jax_cache)
    assert result.returncode == 0, result.stderr
    assert (f"note: {tmp_path / 'odd.avi'}: 97x61 frames written as 96x60 (MPEG-4 needs even "
            "sizes)") in result.stderr.splitlines()


def test_a_run_removes_the_partial_files_a_killed_run_left(tiny_model_dir, jax_cache, tmp_path):
    """A run killed outright (SIGKILL) left its unfinished output hidden in the output folder,
    where every later run left it too."""
    fx.write(tmp_path / "a.png", photo(20, 20))
    gone = subprocess.Popen([sys.executable, "-c", ""])
    gone.wait()
    out = tmp_path / "out"
    left = [out / f".jaxseg-{gone.pid}-0123456789ab.partial.png",
            out / f".jaxseg-{gone.pid}-0123456789ac.partial.mp4"]
    elsewhere = out / "sub" / f".jaxseg-{gone.pid}-0123456789ab.partial.png"  # not written to
    for path in left + [elsewhere]:
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(b"half")
    result = run_cli(tiny_model_dir, tmp_path / "a.png", "--output", out, cache=jax_cache)
    assert result.returncode == 0, result.stderr
    assert f"note: removed 2 partial file(s) that killed runs left in {out}" in result.stderr
    assert sorted(p.name for p in out.iterdir()) == ["a_mask.png", "sub"]
    assert elsewhere.exists()


# The CLI as run_cli runs it, where the Nth file sync (the first argument; an output's write syncs
# its hidden partial file, then, once it is renamed into place, the folder) says so on stderr and
# then waits there for a Ctrl-C.
WAITING_CLI = """
import signal, sys, time
# As under a terminal: a test run in the background starts it with SIGINT ignored.
signal.signal(signal.SIGINT, signal.default_int_handler)
from jaxseg import workdir
fsync, calls, wait_at = workdir._fsync, [], int(sys.argv.pop(1))
def waiting(path, **options):
    fsync(path, **options)
    calls.append(path)
    if len(calls) == wait_at:
        print("waiting for Ctrl-C", file=sys.stderr, flush=True)
        time.sleep(60)
workdir._fsync = waiting
""" + CLI


@pytest.mark.parametrize("wait_at, whole, existing, older", [
    (5, 2, 0, 0),  # the third output's partial file synced, not yet renamed: it is not written
    (6, 3, 0, 0),  # renamed, syncing the folder: it is written, whole
    (5, 2, 1, 0),  # with --skip_existing and the first output there: neither counted nor redone
    (5, 2, 0, 6),  # replacing an earlier run's outputs: --skip_existing would keep 4 of them
])
def test_ctrl_c_ends_a_run_in_one_line_with_whole_outputs_only(
        tiny_model_dir, jax_cache, tmp_path, wait_at, whole, existing, older):
    """A Ctrl-C ended a run with a KeyboardInterrupt traceback; it is one line now, counting the
    outputs written whole, and no output is left half-written under its name or hidden."""
    inputs = [fx.write(tmp_path / f"p{i}.png", photo(20 + i, 24, seed=i)) for i in range(6)]
    out = tmp_path / "out"
    for i in range(max(existing, older)):
        predict.write_image(out / f"p{i}_mask.png", np.zeros((20 + i, 24), np.uint8))
    proc = subprocess.Popen([sys.executable, "-c", WAITING_CLI, *map(str, [
                                wait_at, tiny_model_dir, *inputs, "--output", out])]
                            + ["--skip_existing"] * bool(existing), cwd=REPO,
                            env=subprocess_env(jax_cache), stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)
    _, err = fx.ctrl_c_once_said(proc)
    assert err.rstrip("\n").splitlines()[-1] == (
        f"interrupted: {whole} of {6 - existing} outputs written to {out}"
        + (f"; skipped {existing} input(s) whose output was already there (--skip_existing)"
           if existing else "")
        + (f"; {older - whole} output(s) of an earlier run are not replaced yet: rerun the same "
           "command to replace them (--skip_existing would keep them)" if older else
           "; rerun with --skip_existing to write the rest")), err[-2000:]
    assert sorted(p.name for p in out.iterdir()) == [f"p{i}_mask.png"
                                                     for i in range(max(existing + whole, older))]
    for i in range(existing, existing + whole):
        path = out / f"p{i}_mask.png"
        assert predict.written_by_predict(path) and read_rgb(path).shape == (20 + i, 24)


def test_skip_existing_writes_only_the_outputs_that_are_not_there(tiny_model_dir, jax_cache,
                                                                  tmp_path):
    """After a Ctrl-C a user was told to rerun the same command, which predicted every input
    again, thousands of photos for a few: --skip_existing reads only those without an output."""
    photos = tmp_path / "photos"
    for i in range(4):
        fx.write(photos / f"p{i}.png", photo(20 + i, 24, seed=i))
    write_video(photos / "clip.mp4", frames=2)
    out = tmp_path / "out" / "photos"
    names = [f"p{i}_mask.png" for i in range(4)] + ["clip_mask.mp4"]

    def stamps():  # a write renames a new file into place: another inode
        return {p.name: (p.stat().st_ino, p.stat().st_mtime_ns) for p in out.iterdir()}

    result = run_cli(tiny_model_dir, photos, "--output", out.parent, cache=jax_cache)
    assert result.returncode == 0 and "wrote 5 outputs" in result.stdout, result.stderr
    (out / "p2_mask.png").unlink()
    first = stamps()
    # A skipped input is not even read: a p0.png that no longer decodes goes unnoticed.
    kept = (photos / "p0.png").read_bytes()
    (photos / "p0.png").write_bytes(b"junk")
    result = run_cli(tiny_model_dir, photos, "--output", out.parent, "--skip_existing",
                     cache=jax_cache)
    assert result.returncode == 0, result.stderr
    assert (f"wrote 1 outputs to {out.parent}; skipped 4 input(s) whose output was already "
            "there (--skip_existing)") in result.stdout
    second = stamps()
    assert sorted(second) == sorted(names)
    assert {n for n in names if second[n] != first.get(n)} == {"p2_mask.png"}
    assert predict.written_by_predict(out / "p2_mask.png")
    assert read_rgb(out / "p2_mask.png").shape == (22, 24)
    (photos / "p0.png").write_bytes(kept)
    result = run_cli(tiny_model_dir, photos, "--output", out.parent, cache=jax_cache)
    assert result.returncode == 0 and "wrote 5 outputs" in result.stdout, result.stderr
    third = stamps()
    assert all(third[n] != second[n] for n in names)


def test_skip_existing_reads_every_input_of_a_shared_output(tmp_path):
    """a.jpg and a.png both go to a_mask.png, which the first readable one writes: skipping them
    for it took an unreadable a.jpg as done, and refused a.png as writing a.jpg's output."""
    out = tmp_path / "out"
    for name in ("a_mask.png", "b_mask.png"):
        predict.write_image(out / name, np.zeros((2, 2), np.uint8))
    items = [(tmp_path / name, pathlib.PurePath(name[0])) for name in ("a.jpg", "a.png", "b.png",
                                                                         "c.png")]
    problems, claimed = [], {}
    todo = predict.without_written(items, out, "mask", ".png", set(), claimed, problems)
    assert todo == [items[0], items[1], items[3]] and not problems
    assert claimed == {(out / "b_mask.png").resolve(): tmp_path / "b.png"}
