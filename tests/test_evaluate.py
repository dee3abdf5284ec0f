"""The evaluator's integer counts do not depend on the device count or on batch padding."""
import os
import pathlib
import re
import shutil

import cv2
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from fake_data import fake_source, tiny_config
from guided_filter_reference import reference_coefficients
from jaxseg import evaluate, metrics, refine, resolution, sharding
from jaxseg.models.unet import UNet


@pytest.fixture(scope="module")
def model():
    m = UNet(depth=2, base_features=4, norm="group", rngs=nnx.Rngs(0))
    return m


def run(model, source, num_devices, batch_per_device=2, threshold=0.5, **options):
    mesh = sharding.make_mesh(num_devices)
    ev = evaluate.Evaluator(source, mesh=mesh, image_size=32,
                            batch_size=batch_per_device * num_devices, threshold=threshold)
    return ev.evaluate_model(model, **options)


def test_counts_identical_on_1_3_8_devices(model):
    source = fake_source(11)  # 11 examples: every device count ends on a padded batch
    results = [run(model, source, n) for n in (1, 3, 8)]
    for r in results[1:]:
        assert r["per_image"] == results[0]["per_image"]
        assert r["iou"] == results[0]["iou"]
        assert r["model_resolution"] == results[0]["model_resolution"]
        assert r["threshold_sweep"] == results[0]["threshold_sweep"]
    assert results[0]["num_images"] == 11


def test_original_resolution_counts_match_an_independent_numpy_pipeline(model):
    """At a threshold of 0.4: per-image counts at original resolution, the model-resolution IoU
    and the threshold sweep (its 0.4 entry, and at 0 every photo pixel, none of the padding)."""
    source = fake_source(5, seed=4)
    result = run(model, source, 1, threshold=0.4)
    images = np.stack([resolution.resize_image(ex["image"], 32) for ex in source])
    probs = np.asarray(nnx.sigmoid(model(jnp.asarray(images)))[..., 0])
    tp = fp = fn = 0
    for ex, p, rec in zip(source, probs, result["per_image"]):
        h, w = ex["mask"].shape[:2]
        up = cv2.resize(p, (w, h), interpolation=cv2.INTER_LINEAR) >= 0.4
        target = ex["mask"][..., 0] > 0
        assert rec["id"] == ex["id"]
        # OpenCV and JAX bilinear weights differ in the last float bits: allow a pixel or two
        # at probabilities of exactly the threshold.
        assert abs(rec["tp"] - int((up & target).sum())) <= 2
        assert abs(rec["fp"] - int((up & ~target).sum())) <= 2
        assert rec["person_fraction"] == pytest.approx(target.mean())  # of the truth, not the guess
        small = resolution.resize_mask(ex["mask"], 32)[..., 0] > 0
        tp += int((p >= 0.4)[small].sum())
        fp += int((p >= 0.4)[~small].sum())
        fn += int((p < 0.4)[small].sum())
    assert result["model_resolution"]["iou"] == pytest.approx(tp / (tp + fp + fn), abs=1e-3)
    sweep = result["threshold_sweep"]
    at = sweep["thresholds"].index(0.4)
    assert sweep["person"][at] == sum(r["tp"] for r in result["per_image"])
    assert sweep["pixels"][at] == sum(r["tp"] + r["fp"] for r in result["per_image"])
    assert sweep["thresholds"][0] == 0.0
    assert sweep["pixels"][0] == sum(ex["mask"].size for ex in source)


def test_a_probability_at_the_threshold_is_person_at_both_resolutions():
    """A model sure of nothing (logit 0: P(person) = 0.5 exactly) at the threshold 0.5 marks every
    pixel a person, as predict and the threshold sweep count it; the random model's
    probabilities above never fall on the threshold, so `>` passed them as well as `>=`."""
    class Unsure(nnx.Module):
        def __call__(self, images, *, train=False):
            return jnp.zeros((*images.shape[:3], 1), jnp.float32)

    result = run(Unsure(), fake_source(3, seed=2), 1)
    assert result["model_resolution"]["recall"] == 1.0 and result["recall"] == 1.0


def test_boundary_tolerance_at_original_resolution_follows_the_canvas(model):
    """0.75% of the canvas diagonal (5 px for photos up to 448 px), not of the model's input."""
    source = fake_source(2, seed=1, min_size=300, max_size=400)
    result = run(model, source, 1)
    canvas = [-(-max(ex["mask"].shape[axis] for ex in source) // 64) * 64 for axis in (0, 1)]
    assert result["canvas"] == canvas
    assert result["boundary_tolerance_px"] == {
        "original": round(0.0075 * float(np.hypot(*canvas))), "model": 1}
    assert result["boundary_tolerance_px"]["original"] > 1


def test_refined_counts_do_not_depend_on_devices_and_match_numpy(model):
    source = fake_source(5, seed=4)
    options = dict(refined=True, refine_radius=2, refine_eps=1e-3)  # not the defaults
    result = run(model, source, 1, **options)
    on_8 = run(model, source, 8, batch_per_device=1, **options)
    assert on_8["per_image"] == result["per_image"]
    assert result["per_image"] != run(model, source, 1)["per_image"]  # refinement changed masks
    images = np.stack([resolution.resize_image(ex["image"], 32) for ex in source])
    probs = np.asarray(nnx.sigmoid(model(jnp.asarray(images)))[..., 0])
    for ex, guide, p, rec in zip(source, images, probs, result["per_image"]):
        h, w = ex["mask"].shape[:2]
        a, b = reference_coefficients(guide, p, radius=2, eps=1e-3)

        def up(x):
            return cv2.resize(x.astype(np.float32), (w, h), interpolation=cv2.INTER_LINEAR)

        refined = np.sum(up(a) * (ex["image"] / 255), axis=-1) + up(b) >= 0.5
        target = ex["mask"][..., 0] > 0
        # float64 per-window reference against float32 box sums, and OpenCV's bilinear weights:
        # a few pixels near exactly 0.5 may fall either way.
        assert abs(rec["tp"] - int((refined & target).sum())) <= 3, rec
        assert abs(rec["fp"] - int((refined & ~target).sum())) <= 3, rec


def test_prediction_folder_scoring(tmp_path):
    source = fake_source(6, seed=2)
    for ex in source:  # even sizes, masks of 2x2 blocks: a half-size copy resizes back exactly
        h, w = (n // 2 * 2 for n in ex["mask"].shape[:2])
        ex["image"] = ex["image"][:h, :w]
        ex["mask"] = ex["mask"][:h:2, :w:2].repeat(2, axis=0).repeat(2, axis=1)
    mesh = sharding.make_mesh(2)
    ev = evaluate.Evaluator(source, mesh=mesh, image_size=32, batch_size=4)
    for i, ex in enumerate(source[:-1]):  # ground truth as 0/255 PNGs, half of them at half size
        m = ex["mask"][..., 0] * 255
        cv2.imwrite(str(tmp_path / f"{ex['id']}.png"), m[::2, ::2] if i % 2 else m)
    with pytest.raises(FileNotFoundError, match=source[-1]["id"]):
        ev.evaluate_predictions(tmp_path)
    cv2.imwrite(str(tmp_path / f"{source[-1]['id']}.png"), source[-1]["mask"][..., 0])  # 0/1
    perfect = ev.evaluate_predictions(tmp_path)
    assert perfect["iou"] == 1.0 and perfect["boundary_f1"] == 1.0
    assert perfect["model_resolution"] is None


def test_predictions_are_read_like_masks_and_meet_the_threshold(tmp_path):
    from PIL import Image

    source = fake_source(4, seed=3)
    truth = [ex["mask"][..., 0] > 0 for ex in source]
    # Soft maps: 0.75 inside the person, 0.2 on a band of background beside it (51/255 and
    # 13107/65535 exactly: at the threshold 0.2 it is person, as predict counts it); the first
    # holds only 0 and 1/255 (as predict --soft writes a photo it finds no person in).
    soft = []
    for t in truth:
        p = np.where(t, 0.75, 0.0)
        p[:, :4][~t[:, :4]] = 0.2
        soft.append(p)
    soft[0] = np.where(truth[0], 0.0, 1 / 255)
    mesh = sharding.make_mesh(1)

    def score(folder, threshold=0.5):
        ev = evaluate.Evaluator(source, mesh=mesh, image_size=32, batch_size=2,
                                threshold=threshold)
        return ev.evaluate_predictions(folder)

    def numpy_iou(threshold):
        inter = sum(int((t & (p >= threshold)).sum()) for t, p in zip(truth, soft))
        union = sum(int((t | (p >= threshold)).sum()) for t, p in zip(truth, soft))
        return inter / union

    kinds = ("red", "dark", "voc", "mask16", "named", "soft8", "soft16")
    folders = {k: tmp_path / k for k in kinds}
    for folder in folders.values():
        folder.mkdir()
    for ex, t, p in zip(source, truth, soft):
        name = f"{ex['id']}.png"
        for kind, colour in (("red", (255, 0, 0)), ("dark", (0, 100, 0))):
            rgb = np.zeros((*t.shape, 3), np.uint8)
            rgb[t] = colour  # RGB red: a blue-channel read saw nothing; dark: under half of 255
            Image.fromarray(rgb).save(folders[kind] / name)
        voc = Image.fromarray(t.astype(np.uint8), mode="P")  # index 1 = VOC's (128, 0, 0)
        voc.putpalette([0, 0, 0, 128, 0, 0])
        voc.save(folders["voc"] / name)
        cv2.imwrite(str(folders["mask16"] / name), t.astype(np.uint16) * 255)  # 0/255 in 16 bits
        cv2.imwrite(str(folders["named"] / f"{ex['id']}_mask.png"), t.astype(np.uint8) * 255)
        Image.fromarray(np.round(p * 255).astype(np.uint8)).save(folders["soft8"] / name)
        cv2.imwrite(str(folders["soft16"] / name), np.round(p * 65535).astype(np.uint16))
    for kind in ("red", "dark", "voc", "mask16", "named"):
        for threshold in (0.5, 0.6):  # masks do not depend on the threshold
            r = score(folders[kind], threshold)
            assert r["iou"] == 1.0 and r["predictions_read_as"] == "masks", (kind, threshold)
    for kind in ("soft8", "soft16"):
        for threshold in (0.2, 0.5, 0.8):
            r = score(folders[kind], threshold)
            assert r["iou"] == pytest.approx(numpy_iou(threshold)), (kind, threshold)
            assert r["threshold"] == threshold and r["predictions_read_as"] == "soft maps"
            # One person-free map of 0 and 1 is no mask; at 0.8, above every value of every map,
            # nothing is a person, and that is said.
            assert ("predictions_warning" in r) == (threshold == 0.8), (kind, threshold)
    assert numpy_iou(0.2) < numpy_iou(0.5) < 1.0 and numpy_iou(0.8) == 0.0
    # 0/1 masks with one antialiased file among them: all read soft, as the rule says, and said.
    zero_one = tmp_path / "zero_one"
    zero_one.mkdir()
    for i, (ex, t) in enumerate(zip(source, truth)):
        mask = t.astype(np.uint8)
        mask[0, 0] = 128 if i == 0 else mask[0, 0]
        cv2.imwrite(str(zero_one / f"{ex['id']}.png"), mask)
    warning = score(zero_one)["predictions_warning"]
    assert warning.startswith(f"{len(source) - 1} file(s) hold only 0 and 1")
    assert f"(e.g. {source[0]['id']}.png)" in warning
    # As many soft files as 0/1 ones: the 0/1 files do not outnumber them, so no warning.
    mask = truth[1].astype(np.uint8)
    mask[0, 0] = 128
    cv2.imwrite(str(zero_one / f"{source[1]['id']}.png"), mask)
    assert "predictions_warning" not in score(zero_one)
    # Two files for one photo: refused, not one picked silently.
    cv2.imwrite(str(folders["named"] / f"{source[0]['id']}.png"), truth[0].astype(np.uint8))
    with pytest.raises(ValueError, match="several predictions"):
        score(folders["named"])


def test_soft_maps_that_never_reach_the_threshold_are_said(tmp_path):
    """Label maps (0 background, 1 person, 2 another class) and 8-bit soft values saved in 16-bit
    files are soft maps whose values never reach the threshold: IoU 0, said with the file and
    value, not without a word."""
    source = fake_source(3, seed=5)
    truth = [ex["mask"][..., 0] > 0 for ex in source]
    labels, wide = tmp_path / "labels", tmp_path / "wide"
    labels.mkdir()
    wide.mkdir()
    for ex, t in zip(source, truth):
        label = t.astype(np.uint8)
        label[0, 0] = 2
        cv2.imwrite(str(labels / f"{ex['id']}.png"), label)
        soft = np.where(t, 0.9, 0.1)
        soft[0, 0] = 0.5  # three levels: a soft map
        cv2.imwrite(str(wide / f"{ex['id']}.png"), np.round(soft * 255).astype(np.uint16))
    ev = evaluate.Evaluator(source, mesh=sharding.make_mesh(1), image_size=32, batch_size=2)
    for folder, highest in ((labels, "2 of 255"), (wide, "230 of 65535")):
        r = ev.evaluate_predictions(folder)
        assert r["predictions_read_as"] == "soft maps" and r["iou"] == 0.0
        assert sum(map(np.sum, truth)) > 0  # the photos hold people that nothing was scored as
        assert r["predictions_warning"].startswith("no value of any file reaches the threshold 0.5")
        assert f"(the highest is {highest}, in {source[0]['id']}.png)" in r["predictions_warning"]


def test_a_prediction_of_another_aspect_ratio_is_refused(tmp_path):
    source = fake_source(1, seed=4, min_size=40, max_size=41)
    h, w = source[0]["mask"].shape[:2]
    cv2.imwrite(str(tmp_path / f"{source[0]['id']}.png"), np.zeros((w * 2, h), np.uint8))
    ev = evaluate.Evaluator(source, mesh=sharding.make_mesh(1), image_size=32, batch_size=1)
    with pytest.raises(ValueError, match="different aspect ratio"):
        ev.evaluate_predictions(tmp_path)


def test_large_photos_are_evaluated_in_smaller_batches():
    mesh = sharding.make_mesh(2)
    assert evaluate.fitting_batch_size(16, (832, 640), mesh) == 16  # the datasets here
    phone = (3072, 4032)  # 12 megapixels: about 2.5 GB per row, one row per device
    assert evaluate.fitting_batch_size(16, phone, mesh) == 2
    rows = evaluate.EVAL_MEMORY_BUDGET // (2048 * 2048 * evaluate.EVAL_BYTES_PER_CANVAS_PIXEL)
    assert rows >= 2
    # CPU devices share the host's budget.
    assert evaluate.fitting_batch_size(64, (2048, 2048), mesh) == rows // 2 * 2


def test_empty_prediction_scores_zero(tmp_path):
    source = fake_source(3, seed=5)
    for ex in source:
        cv2.imwrite(str(tmp_path / f"{ex['id']}.png"), np.zeros(ex["mask"].shape[:2], np.uint8))
    ev = evaluate.Evaluator(source, mesh=sharding.make_mesh(1), image_size=32, batch_size=2)
    r = ev.evaluate_predictions(tmp_path)
    assert r["iou"] == 0.0 and r["recall"] == 0.0
    assert metrics.image_iou({"tp": [0], "fp": [0], "fn": [0]})[0] == 1.0


@pytest.mark.parametrize("options, message", [
    (["--refine"], "they do not apply to --predictions"),
    (["--flip_tta"], "they do not apply to --predictions"),
    (["--threshold", "0"], "--threshold=0.0 must be between 0 and 1"),  # was silently 0.5
    (["--batch_size", "0"], "0 is not a positive integer"),
    (["--members", "1"], "--predictions scores another model's masks instead"),  # were ignored
    (["--checkpoint", "latest"], "--predictions scores another model's masks instead"),
    (["--images", "x", "--masks", "y"], "--dataset and --images/--masks each name what to score"),
    (["--refine_eps", "1e-9"], "--refine_eps=1e-09 a finite number >= 1e-6"),
    (["--refine_eps", "nan"], "--refine_eps=nan a finite number >= 1e-6"),
    (["--refine_eps", "inf"], "--refine_eps=inf a finite number >= 1e-6"),
    (["--refine_radius", "0"], "--refine_radius=0 must be >= 1"),
    (["--refine_eps", "1e-3"], "--refine_radius and --refine_eps set how --refine refines"),
    (["--data_dir", "/dev/null"], "[Errno 20] Not a directory: '/dev/null/ccp_person'"),
    # Refused only once the whole split had been scored.
    (["--output", "/"], "--output /: is a folder: name the file to write"),
    (["--output", "/dev/null/r.json"], "--output /dev/null/r.json: /dev/null is not a folder"),
    # Words without a flag were left unread: this scored the default split, test.
    (["validation"], "unexpected argument(s) validation: every setting is a --flag"),
])
def test_bad_options_are_a_usage_error_before_any_work(options, message, tmp_path):
    import subprocess
    import sys

    predictions = tmp_path / "masks"
    predictions.mkdir()
    result = subprocess.run(
        [sys.executable, "-m", "jaxseg.evaluate", "--dataset", "ccp_person", "--predictions",
         str(predictions), *options], capture_output=True, text=True, timeout=120)
    assert result.returncode != 0
    # One line beginning `error:` (absl's own flag errors: `... error: flag --batch_size=0: ...`).
    assert re.search(r"error: .*" + re.escape(message), result.stderr), result.stderr[-2000:]
    assert "Traceback" not in result.stderr
    # Refused before any work: no metrics JSON beside the folder, where it would have gone.
    assert [p.name for p in tmp_path.iterdir()] == ["masks"]


def test_a_model_or_predictions_that_cannot_be_scored_is_an_error_line(tmp_path):
    """A missing --workdir and a --predictions folder without the split's masks ended in lines
    without the `error:` that evaluate's other one-line errors (and train's) begin with."""
    import subprocess
    import sys

    import fixtures_data as fx

    root = fx.make_simple_folder(tmp_path / "mine", ["a", "b"])
    (tmp_path / "pred").mkdir()
    command = [sys.executable, "-m", "jaxseg.evaluate", "--images", str(root / "images"),
               "--masks", str(root / "masks"), "--data_dir", str(tmp_path / "dd"), "--output",
               str(tmp_path / "out.json")]
    for options, line in (
            (["--workdir", str(tmp_path / "nowhere")],
             f"error: --workdir {tmp_path / 'nowhere'}: no such folder"),
            (["--predictions", str(tmp_path / "pred")],
             f"error: --predictions {tmp_path / 'pred'}: 2 of 2 ids have no prediction")):
        result = subprocess.run(command + options, capture_output=True, text=True, timeout=300)
        assert result.returncode == 1
        assert result.stderr.splitlines()[-1].startswith(line), result.stderr[-2000:]
    assert not (tmp_path / "out.json").exists()


def test_a_predictions_folder_that_cannot_be_listed_is_an_error_line(tmp_path):
    """Another user's folder (mode 700; chmod does not stop root, who may run the tests, so
    listing it is refused here by hand) ended in a PermissionError traceback."""
    import subprocess
    import sys

    import fixtures_data as fx

    root = fx.make_simple_folder(tmp_path / "mine", ["a"])
    refused = tmp_path / "pred"
    refused.mkdir()
    prelude = (
        "import pathlib, runpy, sys\n"
        "iterdir = pathlib.Path.iterdir\n"
        "def refusing(path):\n"
        f"    if path == pathlib.Path({str(refused)!r}):\n"
        "        raise PermissionError(13, 'Permission denied', str(path))\n"
        "    return iterdir(path)\n"
        "pathlib.Path.iterdir = refusing; sys.argv = ['jaxseg.evaluate'] + sys.argv[1:]\n"
        "runpy.run_module('jaxseg.evaluate', run_name='__main__', alter_sys=True)")
    result = subprocess.run(
        [sys.executable, "-c", prelude, "--images", str(root / "images"), "--masks",
         str(root / "masks"), "--predictions", str(refused), "--data_dir", str(tmp_path / "dd"),
         "--output", str(tmp_path / "out.json")], capture_output=True, text=True, timeout=300)
    assert result.returncode == 1 and "Traceback" not in result.stderr, result.stderr[-2000:]
    assert result.stderr.splitlines()[-1] == (
        f"error: --predictions {refused}: [Errno 13] Permission denied: '{refused}'")


def test_a_users_folder_says_which_files_are_not_scored(tmp_path, monkeypatch):
    import subprocess
    import sys

    import fixtures_data as fx

    root = fx.make_simple_folder(tmp_path / "mine", ["a", "b"])
    fx.write(root / "images" / "lonely.jpg", fx.photo(7))
    predictions = tmp_path / "pred"
    for stem in ("a", "b"):  # the truth itself: IoU 1
        fx.write(predictions / f"{stem}.png", fx.person(["a", "b"].index(stem)) * 255)
    result = subprocess.run(
        [sys.executable, "-m", "jaxseg.evaluate", "--images", str(root / "images"), "--masks",
         str(root / "masks"), "--predictions", str(predictions), "--data_dir", str(tmp_path / "dd"),
         "--output", str(tmp_path / "out.json")], capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-2000:]
    assert "1 file(s) of the folder are not scored:\n  images/lonely.jpg: image without mask" \
        in result.stderr
    assert '"num_images": 2' in result.stdout and '"iou": 1.0' in result.stdout
    # The results name the folder, so that jaxseg.report can show the photos again.
    import json

    from jaxseg import report

    scored = json.loads((tmp_path / "out.json").read_text())
    assert scored["not_scored"] == [{"file": "images/lonely.jpg", "reason": "image without mask"}]
    assert scored["data_dir"] == str((tmp_path / "dd").resolve())
    # The report reads the data where evaluate prepared it, not in TFDS_DATA_DIR.
    monkeypatch.setenv("TFDS_DATA_DIR", str(tmp_path / "report_dd"))
    source = report._prepared_source("person_folder", scored["split"], scored["folder"],
                                     scored["data_dir"])
    assert sorted(source[i]["id"] for i in range(len(source))) == ["a", "b"]
    assert not (tmp_path / "report_dd").exists()


def test_masks_of_odd_values_are_named_once(tmp_path):
    """--images and --masks swapped (photos scored as masks) gave IoU 0.14 without a word."""
    import subprocess
    import sys

    import fixtures_data as fx

    root = fx.make_simple_folder(tmp_path / "mine", ["a", "b"])
    result = subprocess.run(
        [sys.executable, "-m", "jaxseg.evaluate", "--images", str(root / "masks"), "--masks",
         str(root / "images"), "--data_dir", str(tmp_path / "dd"), "--output",
         str(tmp_path / "out.json"), "--members", "1"], capture_output=True, text=True,
        timeout=300)
    assert result.returncode == 0, result.stderr[-2000:]
    said = [line for line in result.stderr.splitlines() if "values other than 0/1/255" in line]
    assert len(said) == 1 and said[0].startswith("2 mask(s) hold values other than 0/1/255 "
                                                 "(first: "), result.stderr[-2000:]
    assert said[0].endswith("check that --masks names the masks")


def test_a_threshold_that_masks_do_not_use_is_noted(tmp_path):
    """--threshold cuts soft maps; a folder of masks was scored as it is without a word."""
    import subprocess
    import sys

    import fixtures_data as fx

    root = fx.make_simple_folder(tmp_path / "mine", ["a", "b"])
    predictions = tmp_path / "pred"
    for i, stem in enumerate(["a", "b"]):
        fx.write(predictions / f"{stem}.png", fx.person(i) * 255)
    command = [sys.executable, "-m", "jaxseg.evaluate", "--images", str(root / "images"),
               "--masks", str(root / "masks"), "--predictions", str(predictions), "--data_dir",
               str(tmp_path / "dd"), "--output", str(tmp_path / "out.json")]
    for threshold, noted in (("0.5", False), ("0.3", True)):
        result = subprocess.run(command + ["--threshold", threshold], capture_output=True,
                                text=True, timeout=300)
        assert result.returncode == 0, result.stderr[-2000:]
        assert (f"note: --threshold 0.3 cuts soft maps only; --predictions {predictions} holds "
                "masks, scored as they are" in result.stderr) == noted, result.stderr[-2000:]


# `python -m jaxseg.evaluate ARGS...`, where scoring's first batch says so on stderr and then
# waits there for a Ctrl-C.
WAITING_EVALUATE = """
import runpy, signal, sys, time
# As under a terminal: a test run in the background starts it with SIGINT ignored.
signal.signal(signal.SIGINT, signal.default_int_handler)
from jaxseg import sharding
to_global = sharding.to_global
def waiting(*args, **kwargs):
    print("waiting for Ctrl-C", file=sys.stderr, flush=True)
    time.sleep(60)
    return to_global(*args, **kwargs)
sharding.to_global = waiting
sys.argv[0] = "jaxseg.evaluate"
runpy.run_module("jaxseg.evaluate", run_name="__main__", alter_sys=True)
"""


def test_ctrl_c_while_scoring_is_one_line_and_writes_nothing(tmp_path):
    """A Ctrl-C ended an evaluation with a KeyboardInterrupt traceback."""
    import subprocess
    import sys

    import fixtures_data as fx

    root = fx.make_simple_folder(tmp_path / "mine", ["a", "b"])
    predictions = tmp_path / "pred"
    for i, stem in enumerate(["a", "b"]):
        fx.write(predictions / f"{stem}.png", fx.person(i) * 255)
    output = tmp_path / "out.json"
    proc = subprocess.Popen(
        [sys.executable, "-c", WAITING_EVALUATE, "--images", str(root / "images"), "--masks",
         str(root / "masks"), "--predictions", str(predictions), "--data_dir",
         str(tmp_path / "dd"), "--output", str(output)],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    out, err = fx.ctrl_c_once_said(proc)
    assert err.splitlines()[-1] == (f"interrupted: nothing written to {output}; rerun the same "
                                    "command to score the split"), err[-2000:]
    assert not output.exists() and "\"iou\"" not in out


def test_folders_with_a_tilde_are_the_home_folders(tmp_path):
    """No shell expands --images=~/x: the three folders were looked for in ./~/."""
    import subprocess
    import sys

    import fixtures_data as fx

    fx.make_simple_folder(tmp_path / "mine", ["a"])
    fx.write(tmp_path / "pred" / "a.png", fx.person(0) * 255)  # the truth itself: IoU 1
    (tmp_path / "work").mkdir()
    result = subprocess.run(
        [sys.executable, "-m", "jaxseg.evaluate", "--images=~/mine/images", "--masks=~/mine/masks",
         "--predictions=~/pred", "--data_dir", str(tmp_path / "dd"), "--output",
         str(tmp_path / "out.json")], capture_output=True, text=True, timeout=300,
        cwd=tmp_path / "work", env=dict(os.environ, HOME=str(tmp_path), PYTHONPATH=str(
            pathlib.Path(__file__).resolve().parents[1])))
    assert result.returncode == 0, result.stderr[-2000:]
    assert '"num_images": 1' in result.stdout and '"iou": 1.0' in result.stdout
    assert not (tmp_path / "work" / "~").exists()


def test_a_results_path_that_is_not_utf8_is_written_and_said(tmp_path):
    """Under a UTF-8 locale (strict), `wrote PATH` raised UnicodeEncodeError once the results of
    the whole split were written: a traceback and status 1 instead of the line."""
    import subprocess
    import sys

    import fixtures_data as fx

    root = fx.make_simple_folder(tmp_path / "mine", ["a"])
    fx.write(tmp_path / "pred" / "a.png", fx.person(0) * 255)  # the truth itself: IoU 1
    output = tmp_path / os.fsdecode(b"r\xe9sultats.json")
    result = subprocess.run(
        [sys.executable, "-m", "jaxseg.evaluate", "--images", str(root / "images"), "--masks",
         str(root / "masks"), "--predictions", str(tmp_path / "pred"), "--data_dir",
         str(tmp_path / "dd"), "--output", str(output)], capture_output=True, timeout=300,
        env=dict(os.environ, PYTHONIOENCODING="utf-8:strict"))
    assert result.returncode == 0, result.stderr[-2000:]
    assert b'"iou": 1.0' in result.stdout
    # Escaped, as stderr prints such a name.
    assert result.stdout.splitlines()[-1] == b"wrote " + str(output).encode("utf-8",
                                                                           "backslashreplace")
    assert output.exists()


def test_a_default_results_path_that_cannot_be_written_is_refused_before_any_work(tmp_path):
    """Only --output was checked first: the default path (here under a file named runs, as a
    read-only share beside a --predictions folder would be) failed once the split was scored."""
    import subprocess
    import sys

    import fixtures_data as fx

    fx.make_simple_folder(tmp_path / "mine", ["a"])
    (tmp_path / "runs").write_text("not a folder")
    result = subprocess.run(
        [sys.executable, "-m", "jaxseg.evaluate", "--images", "mine/images", "--masks",
         "mine/masks", "--data_dir", str(tmp_path / "dd")], capture_output=True, text=True,
        timeout=300, cwd=tmp_path, env=dict(os.environ, PYTHONPATH=str(
            pathlib.Path(__file__).resolve().parents[1])))
    assert result.returncode != 0
    assert ": runs is not a folder; pass --output" in result.stderr
    assert "Traceback" not in result.stderr
    assert '"iou"' not in result.stdout  # nothing was scored


def test_a_slice_of_a_users_folder_is_scored_as_asked(tmp_path, monkeypatch):
    """--split train[:2] scored the whole folder (its one split, whatever --split said), and
    after a first fix test[:2] (the default split, sliced) still did: the folder has no `test`."""
    import types

    import fixtures_data as fx

    root = fx.make_simple_folder(tmp_path / "mine", ["a", "b", "c"])
    monkeypatch.setenv("TFDS_DATA_DIR", str(tmp_path / "dd"))
    for asked, split, count in (("train[:2]", "train[:2]", 2), ("test", "train", 3),
                                ("test[:2]", "train[:2]", 2), ("validation[-1:]", "train[-1:]", 1),
                                ("validation+test", "train", 3)):
        flags = types.SimpleNamespace(images=str(root / "images"), masks=str(root / "masks"),
                                      split=asked, data_dir="", dataset="")
        _, scored, source, _, _ = evaluate._source_for(flags)
        assert (scored, len(source)) == (split, count)


def test_a_data_dir_with_a_tilde_is_built_where_the_results_say(tmp_path, monkeypatch):
    """--data_dir=~/d (which no shell expands) was built in ./~/d while the results named ~/d,
    where jaxseg.report then looked for the photos."""
    import types

    import fixtures_data as fx

    root = fx.make_simple_folder(tmp_path / "mine", ["a", "b"])
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    monkeypatch.chdir(tmp_path)
    flags = types.SimpleNamespace(images=str(root / "images"), masks=str(root / "masks"),
                                  split="train", data_dir="~/d", dataset="")
    assert len(evaluate._source_for(flags)[2]) == 2
    assert (tmp_path / "home" / "d" / "person_folder").is_dir()
    assert not (tmp_path / "~").exists()


def test_a_workdir_is_scored_on_its_best_checkpoint_by_default(tmp_path):
    """The latest checkpoint (step 4) is not the best (step 2): the default scores the best, names
    its file so and records its step; a batch under the device count is rounded up to it."""
    import json
    import os
    import subprocess
    import sys

    import jax

    import fixtures_data as fx

    from jaxseg import checkpointing, train_step

    config = tiny_config()
    # States of the train state's shapes (initialising a real one takes seconds of eager ops).
    _, abstract = nnx.eval_shape(lambda: train_step.create_train_state(config))

    def state(value):
        return jax.tree.map(lambda s: np.full(s.shape, value).astype(s.dtype), abstract)

    meta = {"config": json.loads(config.to_json())}
    ckpts = checkpointing.Checkpoints(tmp_path / "run", async_save=False)
    ckpts.save_best(2, state(0.01), dict(meta, step=2), val_iou=0.5)
    ckpts.save(4, state(-0.01), dict(meta, step=4), force=True)
    ckpts.close()
    root = fx.make_simple_folder(tmp_path / "mine", ["a", "b"])
    result = subprocess.run(
        [sys.executable, "-m", "jaxseg.evaluate", "--workdir", str(tmp_path / "run"),
         "--images", str(root / "images"), "--masks", str(root / "masks"),
         "--data_dir", str(tmp_path / "dd"), "--batch_size", "1"],
        capture_output=True, text=True, timeout=300,
        env=dict(os.environ, XLA_FLAGS="--xla_force_host_platform_device_count=2"))
    assert result.returncode == 0, result.stderr[-2000:]
    (written,) = (tmp_path / "run" / "eval").iterdir()
    assert written.name.startswith("best_person_folder_train_")
    scored = json.loads(written.read_text())
    assert scored["checkpoint_step"] == 2 and scored["num_images"] == 2


def test_folder_evaluations_keep_their_own_results_file(tmp_path):
    """Two --images/--masks pairs once wrote the same default JSON, the second replacing the first."""
    import types

    from jaxseg import evaluate

    def flags(images, masks):
        return types.SimpleNamespace(predictions="", workdir="", flip_tta=False, refine=False,
                                     members=0, checkpoint="best", images=str(images),
                                     masks=str(masks), dataset="", split="test", data_dir="",
                                     threshold=0.5)

    a, b = tmp_path / "holiday photos", tmp_path / "b"
    outputs = {evaluate._default_output(flags(d, tmp_path / "m"), "person_folder", "train")
               for d in (a, b, a)}
    assert len(outputs) == 2
    assert any(p.name.startswith("best_person_folder_train_holiday_photos-") for p in outputs)
    # Another threshold, or another folder scored against one predictions folder: other files.
    at_04 = evaluate._default_output(types.SimpleNamespace(**{**vars(flags(a, tmp_path / "m")),
                                                              "threshold": 0.4}),
                                     "person_folder", "train")
    assert at_04 not in outputs and at_04.name.startswith("best_person_folder_train_t0.4_")
    # Flip averaging, refinement and its settings change the figures: each has its own file.
    variants = [{}, {"flip_tta": True}, {"refine": True}, {"refine": True, "flip_tta": True},
                {"refine": True, "refine_radius": refine.RADIUS + 1},
                {"refine": True, "refine_eps": refine.EPS * 10}]
    named = {evaluate._default_output(types.SimpleNamespace(**{
        **vars(flags(a, tmp_path / "m")), "refine_radius": refine.RADIUS, "refine_eps": refine.EPS,
        **variant}), "person_folder", "train") for variant in variants}
    assert len(named) == len(variants)
    predicted = {evaluate._default_output(
        types.SimpleNamespace(**{**vars(flags(d, tmp_path / "m")), "predictions": "p"}),
        "person_folder", "train") for d in (a, b)}
    assert len(predicted) == 2 and all(p.parent == pathlib.Path.cwd() for p in predicted)
    a.mkdir()
    (tmp_path / "m").mkdir()
    with pytest.raises(FileNotFoundError, match="--images: no files in"):
        evaluate.folder_root(str(a), str(tmp_path / "m"))
    (a / "x.jpg").write_bytes(b"")  # with x_mask.png beside it: each file its own mask
    with pytest.raises(ValueError, match="--images and --masks are the same folder"):
        evaluate.folder_root(str(a), str(a) + "/")
    with pytest.raises(ValueError, match="--images and --masks go together"):  # not cwd's files
        evaluate._source_for(flags(a, ""))
    with pytest.raises(ValueError, match="pass --images DIR --masks DIR"):
        evaluate._source_for(types.SimpleNamespace(**{**vars(flags("", "")), "images": "",
                                                      "masks": "", "dataset": "person_folder"}))


def test_results_of_the_current_predictions_folder_go_beside_it(tmp_path, monkeypatch):
    """`--predictions .` wrote its results into the folder as `_ccp_person_test.json`, and
    `--predictions ..` into the current folder as the hidden `.._ccp_person_test.json`."""
    import types

    from jaxseg import evaluate

    masks = tmp_path / "mediapipe masks"
    (masks / "sub").mkdir(parents=True)
    for folder, given in ((masks, "."), (masks / "sub", ".."), (tmp_path, "mediapipe masks/")):
        monkeypatch.chdir(folder)
        flags = types.SimpleNamespace(predictions=given, threshold=0.5, images="")
        output = evaluate._default_output(flags, "ccp_person", "test")
        assert output == tmp_path / "mediapipe masks_ccp_person_test.json", given


def test_sibling_folders_beside_split_folders_are_linked_not_read_as_their_parent(tmp_path,
                                                                                  monkeypatch):
    """--images X/images --masks X/masks where X also holds test/: the two named folders are
    scored (X itself is refused by person_folder: two layouts at once)."""
    monkeypatch.setenv("TFDS_DATA_DIR", str(tmp_path / "tfds"))  # where the links are made
    for d in ("images", "masks", "test/images", "test/masks"):
        (tmp_path / "x" / d).mkdir(parents=True)
    (tmp_path / "x" / "images" / "a.jpg").write_bytes(b"x")
    (tmp_path / "x" / "masks" / "a.png").write_bytes(b"x")
    root = evaluate.folder_root(str(tmp_path / "x" / "images"), str(tmp_path / "x" / "masks"))
    assert root != tmp_path / "x"
    assert (root / "images").resolve() == tmp_path / "x" / "images"
    assert (root / "masks").resolve() == tmp_path / "x" / "masks"
    # Scored again: the same links (and so the data prepared from them) serve.
    assert evaluate.folder_root(str(tmp_path / "x" / "images"), str(tmp_path / "x" / "masks")) == root
    shutil.rmtree(tmp_path / "x" / "test")  # now a plain folder of the two: used in place
    assert evaluate.folder_root(str(tmp_path / "x" / "images"),
                                str(tmp_path / "x" / "masks")) == tmp_path / "x"


def test_prediction_files_match_ids_in_either_unicode_form(tmp_path):
    """person_folder's ids are NFC; jaxseg.predict names outputs after the photo's own stem,
    which a Mac writes decomposed (NFD)."""
    composed, decomposed = "Jos\u00e9", "Jose\u0301"
    (tmp_path / f"{decomposed}_mask.png").write_bytes(b"")
    (tmp_path / "b.png").write_bytes(b"")
    files = evaluate.prediction_files(tmp_path, [composed, "b"])
    assert files == {composed: tmp_path / f"{decomposed}_mask.png", "b": tmp_path / "b.png"}


def test_prediction_files_take_cutouts_and_any_case_of_png(tmp_path):
    """jaxseg.predict --mode cutout writes <id>_cutout.png; other tools write .PNG."""
    (tmp_path / "a_cutout.png").write_bytes(b"")
    (tmp_path / "b.PNG").write_bytes(b"")
    (tmp_path / "c.jpg").write_bytes(b"")  # not a PNG: no prediction for c
    assert evaluate.prediction_files(tmp_path, ["a", "b"]) == {
        "a": tmp_path / "a_cutout.png", "b": tmp_path / "b.PNG"}
    with pytest.raises(FileNotFoundError, match="1 of 3 ids"):
        evaluate.prediction_files(tmp_path, ["a", "b", "c"])
    # Missing and doubled ids sorted, each once: a TFDS split's order is shuffled, and a split
    # of several folders may repeat an id.
    (tmp_path / "a.png").write_bytes(b"")
    ids = ["z9", "c", "y", "b", "x", "c"] + [f"m{i:02d}" for i in range(25, -1, -1)]
    named = sorted(set(ids) - {"a", "b"})
    with pytest.raises(FileNotFoundError, match=re.escape(
            f"{len(named)} of {len(set(ids))} ids have no prediction <id>.png, <id>_mask.png or "
            f"<id>_cutout.png in {tmp_path}: " + ", ".join(named[:20]) + " ...")):
        evaluate.prediction_files(tmp_path, ids)
    (tmp_path / "b.png").write_bytes(b"")
    with pytest.raises(ValueError, match=re.escape(
            "2 ids have several predictions, keep one of: a.png or a_cutout.png; b.PNG or b.png")):
        evaluate.prediction_files(tmp_path, ["b", "a"])
    with pytest.raises(FileNotFoundError, match="no folder .*c.jpg"):  # not a traceback
        evaluate.prediction_files(tmp_path / "c.jpg", ["c"])


def test_missing_predictions_say_where_their_files_are_instead(tmp_path):
    """jaxseg.predict writes a folder's masks to OUTPUT/<folder's name>/, and other tools may
    write JPEGs: the error named every id as missing, without a word of either."""
    (tmp_path / "photos").mkdir()
    for stem in ("a", "b"):
        (tmp_path / "photos" / f"{stem}_mask.png").write_bytes(b"")
    with pytest.raises(FileNotFoundError, match=r"2 of 2 ids .*: a, b; 2 of them are in photos/: "
                       rf"pass --predictions {tmp_path / 'photos'}$"):
        evaluate.prediction_files(tmp_path, ["a", "b"])
    # A subfolder it may not list (a volume's lost+found; chmod does not stop root) is passed
    # over: the hint came as a PermissionError traceback instead of the missing ids.
    (tmp_path / "lost+found").mkdir()
    iterdir = pathlib.Path.iterdir

    def unlistable(path):
        if path.name == "lost+found":
            raise PermissionError(13, "Permission denied", str(path))
        return iterdir(path)

    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(pathlib.Path, "iterdir", unlistable)
        with pytest.raises(FileNotFoundError, match=r": a, b; 2 of them are in photos/"):
            evaluate.prediction_files(tmp_path, ["a", "b"])
    (tmp_path / "a.jpg").write_bytes(b"")
    (tmp_path / "b_mask.JPG").write_bytes(b"")
    with pytest.raises(FileNotFoundError, match=r": a, b; the files named for them are \.jpg, "
                       "and predictions are read from PNG files only$"):
        evaluate.prediction_files(tmp_path, ["a", "b"])


def test_an_empty_split_is_named_not_a_numpy_error():
    with pytest.raises(ValueError, match="nothing to evaluate: the split has no examples"):
        evaluate.Evaluator([], mesh=sharding.make_mesh(1), image_size=32, batch_size=2)


def test_processes_must_agree_on_the_weights_the_options_and_the_data(model):
    """What distributed.disagreement compares between the processes of an evaluation: each
    scores its share of the split, and shares of other models or data were summed silently."""
    import types

    flags = types.SimpleNamespace(members=0, flip_tta=False, refine=False,
                                  refine_radius=refine.RADIUS, refine_eps=refine.EPS,
                                  predictions="")
    mesh = sharding.make_mesh(1)

    def must_agree(f=flags, n=5, m=model):
        ev = evaluate.Evaluator(fake_source(n, seed=4), mesh=mesh, image_size=32, batch_size=2)
        return evaluate._must_agree(f, "ccp_person", "test", ev, m)

    base = must_agree()
    assert must_agree() == base  # the same weights loaded again, the same data read again
    other = UNet(depth=2, base_features=4, norm="group", rngs=nnx.Rngs(1))
    flipped = types.SimpleNamespace(**{**vars(flags), "flip_tta": True})
    for changed, what in ((must_agree(m=other), "the model"), (must_agree(f=flipped), "the options"),
                          (must_agree(n=4), "the data")):
        assert [k for k in base if changed[k] != base[k]] == [what]


def test_repeated_ids_are_ordered_alike_whatever_order_the_rows_arrive_in(model):
    """A split of several folders (a person_folder's train+validation) can repeat a photo's id.
    Rows arrive interleaved by process (each process's part of each batch in turn), and rows of one
    id were kept in that order: their records, and the float means, depended on the processes."""
    source = fake_source(6, seed=2)
    source[1]["id"] = source[4]["id"] = "same"
    ev = evaluate.Evaluator(source, mesh=sharding.make_mesh(1), image_size=32,
                            batch_size=len(source))
    outputs = []
    result = ev._result
    ev._result = lambda o: outputs.append(o) or result(o)
    expected = ev.evaluate_model(model)
    (batch,) = jax.device_get(outputs[0])  # every row in one batch, in the source's order
    backwards = jax.tree.map(lambda a: a[::-1], batch)
    assert [r["id"] for r in expected["per_image"]].count("same") == 2
    assert result([backwards]) == expected
