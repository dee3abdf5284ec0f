"""The report built from synthetic inputs: both files, every figure embedded, and recommendations
that follow from the numbers (checked against cases whose right answer is known by construction)."""
import base64
import json
import os
import pathlib
import re
import subprocess
import sys

import jax.numpy as jnp
import numpy as np
import pytest
from etils import epath
from flax import nnx

from fake_data import fake_source
from jaxseg import inference, metrics, report
from jaxseg.evaluate import SWEEP_THRESHOLDS

STEP = 20


class Brightness(nnx.Module):
    """A parameter-free stand-in for the U-Net (building one takes many seconds on a busy CPU):
    the fake source's people are 100 grey levels brighter than its background."""

    def __call__(self, images, *, train=False):
        del train
        return (images.astype(jnp.float32).mean(axis=-1, keepdims=True) - 125.0) / 10.0


def fake_eval(source, person_p, background_p, *, boundary_f1, resolution_gain, seed=0):
    """An eval JSON as jaxseg.evaluate writes it, for probability maps drawn uniformly within
    ±0.1 of `person_p` on person pixels and of `background_p` elsewhere."""
    rng = np.random.default_rng(seed)
    counts = {k: [] for k in metrics.COUNT_KEYS}
    person = np.zeros(len(SWEEP_THRESHOLDS), np.int64)
    pixels = np.zeros(len(SWEEP_THRESHOLDS), np.int64)
    per_image = []
    for i, ex in enumerate(source):
        target = ex["mask"][..., 0] > 0
        probs = np.where(target, person_p, background_p) + rng.uniform(-0.1, 0.1, target.shape)
        pred = probs >= 0.5
        c = {"tp": int((pred & target).sum()), "fp": int((pred & ~target).sum()),
             "fn": int((~pred & target).sum()), "tn": int((~pred & ~target).sum())}
        for k in metrics.COUNT_KEYS:
            counts[k].append(c.get(k, 0))
        iou = float(metrics.image_iou({k: [c[k]] for k in c})[0])
        per_image.append({"id": ex["id"], "iou": iou, "dice": 0.0, "regions": i % 3,
                          "person_fraction": float(target.mean()),
                          "tp": c["tp"], "fp": c["fp"], "fn": c["fn"]})
        for j, t in enumerate(SWEEP_THRESHOLDS):
            person[j] += int((target & (probs >= t)).sum())
            pixels[j] += int((probs >= t).sum())
    result = metrics.metrics_from_counts(counts)
    result["boundary_f1"] = boundary_f1
    result["model_resolution"] = dict(result, iou=result["iou"] + resolution_gain, boundary_f1=0.5)
    result.update(per_image=per_image, num_images=len(source), threshold=0.5, dataset="fake",
                  split="validation", model="W", checkpoint_step=STEP, flip_tta=False,
                  canvas=[64, 64], boundary_tolerance_px={"original": 1, "model": 1},
                  threshold_sweep={"thresholds": list(SWEEP_THRESHOLDS), "person": person.tolist(),
                                   "pixels": pixels.tolist()})
    return result


def make_workdir(tmp_path, result):
    """A workdir with a training log, an eval JSON, and a peers folder beside it."""
    workdir = tmp_path / "run"
    (workdir / "eval").mkdir(parents=True)
    records = [{"step": s, "kind": "train", "loss": 1 / s, "ce": 0.5 / s, "dice_loss": 0.5 / s,
                "learning_rate": 1e-3 / s} for s in (1, 2, 3)]
    records.append({"step": 3, "kind": "validation", "fake/iou": 0.5, "fake/model_res_iou": 0.55})
    (workdir / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records))
    (workdir / "config.json").write_text(json.dumps({"data": {"image_size": 32}}))
    (workdir / "eval" / "best_fake_validation.json").write_text(json.dumps(result))
    peers = tmp_path / "peers"
    peers.mkdir()
    peer = dict(result, iou=0.9, boundary_f1=0.8, model_resolution=None, model="peers/masks")
    (peers / "mediapipe_fake_validation.json").write_text(json.dumps(peer))
    other = dict(peer, dataset="other", split="test")  # no own row for it: left out
    (peers / "mediapipe_other_test.json").write_text(json.dumps(other))
    (peers / "timing.json").write_text(json.dumps({"ms": 3}))  # not an eval JSON: ignored
    return workdir


CASES = {
    # Person probabilities just under 0.5, background below 0.3: at 0.5 most person pixels are
    # missed, and every person pixel (none of the background) is >= 0.3.
    "under": dict(person_p=0.42, background_p=0.2, boundary_f1=0.0, resolution_gain=0.05,
                  expect=["Lower the threshold from 0.5 to 0.3", "under-segments",
                          "Upsampling costs 0.050 IoU", "now 32px; try 64px"]),
    # Background probabilities in [0.5, 0.7) and people above 0.8: at 0.5 everything is person.
    "over": dict(person_p=0.9, background_p=0.6, boundary_f1=0.0, resolution_gain=0.0,
                 expect=["Raise the threshold from 0.5 to 0.7", "over-segments",
                         "Boundaries are the weak point", "Try edge refinement (--refine",
                         "resolution is not the bottleneck"]),
}


@pytest.mark.parametrize("case", sorted(CASES))
def test_report_files_figures_and_recommendations(tmp_path, case):
    params = dict(CASES[case])
    expect = params.pop("expect")
    source = fake_source(8, seed=3, min_size=40, max_size=60)
    result = fake_eval(source, **params)
    workdir = make_workdir(tmp_path, result)
    if case == "under":  # the real overlay path (Predictor, id lookup) on the fake source
        examples = report.ModelExamples(Brightness(), 32, STEP,
                                        source_for=lambda dataset, split, folder, data_dir: source)
    else:
        examples = None
    paths = report.build_report(workdir, k=2, examples=examples)

    assert paths["html"] == workdir / "report" / "report.html"  # the default output folder
    page, markdown = paths["html"].read_text(), paths["markdown"].read_text()
    names = [p.stem for p in paths["figures"]]
    expected = {"training_curves", "best-fake-validation_distribution",
                "best-fake-validation_threshold"}
    if examples is not None:
        expected |= {"best-fake-validation_best", "best-fake-validation_worst"}
    else:
        assert "Overlays skipped" in page
    assert set(names) == expected and len(names) == len(expected)
    # Charts are PNG; photo overlays (best/worst) JPEG, which is a fifth of their PNG size.
    magic = {"png": b"\x89PNG", "jpeg": b"\xff\xd8\xff"}
    formats = {p.stem: "jpeg" if p.stem.endswith(("_best", "_worst")) else "png"
               for p in paths["figures"]}
    assert {p.suffix for p in paths["figures"]} <= {".png", ".jpg"}
    assert all((p.suffix == ".jpg") == (formats[p.stem] == "jpeg") for p in paths["figures"])
    # Self-contained HTML: every source is an embedded image, one per figure, in figure order.
    sources = re.findall(r'(?:src|href)="([^"]*)"', page)
    assert len(sources) == len(names)
    for name, src in zip(names, sources):
        prefix = f"data:image/{formats[name]};base64,"
        assert src.startswith(prefix)
        assert base64.b64decode(src[len(prefix):]).startswith(magic[formats[name]])
    # Markdown: every figure is a file beside it.
    for path in paths["figures"]:
        assert f"]({path.name})" in markdown
        assert path.parent == paths["markdown"].parent
        assert path.read_bytes().startswith(magic[formats[path.stem]])

    for phrase in expect:
        assert phrase in page and phrase in markdown, phrase
    # The peer of the same dataset and split sits in the metric table; the other one does not.
    assert "| mediapipe (peer) | 0.900 |" in markdown
    assert "Behind mediapipe (peer)" in markdown
    assert "other / test" not in markdown and "timing" not in markdown


def test_threshold_curves_match_the_headline_counts():
    source = fake_source(5, seed=1)
    result = fake_eval(source, 0.55, 0.35, boundary_f1=0.5, resolution_gain=0.0)
    curves = report.threshold_curves(result["threshold_sweep"])
    at = SWEEP_THRESHOLDS.index(0.5)
    assert curves["iou"][at] == pytest.approx(result["iou"])
    assert curves["precision"][at] == pytest.approx(result["precision"])
    assert curves["recall"][at] == pytest.approx(result["recall"])
    # At every threshold, against the masks themselves: where false positives outnumber the
    # person pixels found too (low thresholds), which the headline's 0.5 does not reach.
    rng = np.random.default_rng(2)
    target = rng.random(5000) < 0.3
    probs = np.where(target, rng.uniform(0.2, 1, target.size), rng.uniform(0, 0.6, target.size))
    sweep = {"thresholds": list(SWEEP_THRESHOLDS),
             "person": [int((target & (probs >= t)).sum()) for t in SWEEP_THRESHOLDS],
             "pixels": [int((probs >= t).sum()) for t in SWEEP_THRESHOLDS]}
    curves = report.threshold_curves(sweep)
    for j, t in enumerate(SWEEP_THRESHOLDS):
        pred = probs >= t
        tp = (pred & target).sum()
        assert curves["iou"][j] == pytest.approx(tp / (pred | target).sum()), t
        assert curves["precision"][j] == pytest.approx(tp / pred.sum() if pred.any() else 1.0), t
        assert curves["recall"][j] == pytest.approx(tp / target.sum()), t
    assert any((probs >= t).sum() > 2 * (target & (probs >= t)).sum() for t in SWEEP_THRESHOLDS)


def test_threshold_advice_is_a_threshold_evaluate_takes():
    """The sweep's 0 marks every pixel a person; evaluate and predict refuse --threshold 0."""
    person = [90] + [60 - 3 * j for j in range(len(SWEEP_THRESHOLDS) - 1)]
    sweep = {"thresholds": list(SWEEP_THRESHOLDS), "person": person,
             "pixels": [100] + [p + 1 for p in person[1:]]}
    curves = report.threshold_curves(sweep)
    assert int(np.argmax(curves["iou"])) == 0  # IoU 0.9 there: the case in question
    result = {"threshold_sweep": sweep, "threshold": 0.5, "split": "validation",
              "iou": float(curves["iou"][SWEEP_THRESHOLDS.index(0.5)])}
    advice = report._threshold_recommendation(result)
    assert "from 0.5 to 0.05:" in advice and "--threshold 0.05 " in advice, advice
    assert "Choose it on a validation split" not in advice
    for test_split in ("test", "test[:50%]", "validation+test"):  # a slice of it tunes on it too
        on_test = report._threshold_recommendation(dict(result, split=test_split))
        assert on_test.endswith("Choose it on a validation split: tuned on this test split, the "
                                "gain is optimistic."), test_split
    masks = report._threshold_recommendation(dict(result, predictions_read_as="masks"))
    assert masks == "No threshold to tune: the predictions scored are 0/1 masks."


def test_the_error_map_tints_each_kind_of_pixel_its_legend_colour():
    image = np.full((1, 3, 3), 100, np.uint8)
    target, pred = np.array([[True, False, True]]), np.array([[True, True, False]])
    tinted = report.error_map(image, target, pred)[0].astype(float)
    for pixel, kind in enumerate(("tp", "fp", "fn")):
        distances = {k: np.abs(tinted[pixel] - report.ERROR_COLOURS[k]).sum()
                     for k in report.ERROR_COLOURS}
        assert min(distances, key=distances.get) == kind


def test_calibration_of_calibrated_probabilities():
    # Labels drawn with P(person) = p: each bin's person fraction is its centre, ECE near zero.
    rng = np.random.default_rng(0)
    p = rng.uniform(0, 1, 400_000)
    label = rng.uniform(0, 1, p.size) < p
    sweep = {"thresholds": list(SWEEP_THRESHOLDS),
             "person": [int((label & (p >= t)).sum()) for t in SWEEP_THRESHOLDS],
             "pixels": [int((p >= t).sum()) for t in SWEEP_THRESHOLDS]}
    cal = report.calibration(sweep)
    np.testing.assert_allclose(cal["fraction"], cal["centre"], atol=0.02)
    assert cal["ece"] < 0.01 and cal["pixels"].sum() == p.size


def test_calibration_error_weighs_each_bin_by_its_pixels():
    """An overconfident model (P(person) = p**2) with most pixels in its lowest bins: ECE is the
    pixel-weighted mean gap between each bin's person fraction and its centre, against numpy."""
    rng = np.random.default_rng(1)
    p = rng.beta(0.5, 3.0, 200_000)
    label = rng.uniform(0, 1, p.size) < p ** 2
    thresholds = np.asarray(SWEEP_THRESHOLDS)
    sweep = {"thresholds": list(SWEEP_THRESHOLDS),
             "person": [int((label & (p >= t)).sum()) for t in SWEEP_THRESHOLDS],
             "pixels": [int((p >= t).sum()) for t in SWEEP_THRESHOLDS]}
    bins = np.digitize(p, thresholds) - 1
    upper = np.append(thresholds[1:], 1.0)
    ece = sum(np.sum(bins == i) * abs(label[bins == i].mean() - (thresholds[i] + upper[i]) / 2)
              for i in range(len(thresholds)) if np.any(bins == i)) / p.size
    assert report.calibration(sweep)["ece"] == pytest.approx(ece, rel=1e-9)


def test_buckets_name_the_costliest_failure():
    # Totals: tp 100, fp 10, fn 90 -> IoU 0.5. The two small people hold every miss: without them
    # IoU would be 190 / 200; each people bucket holds only part of them.
    per_image = [
        {"id": "a", "iou": 0.1, "person_fraction": 0.05, "regions": 1, "tp": 5, "fp": 0, "fn": 50},
        {"id": "b", "iou": 0.1, "person_fraction": 0.08, "regions": 2, "tp": 5, "fp": 0, "fn": 40},
        {"id": "c", "iou": 0.9, "person_fraction": 0.6, "regions": 3, "tp": 90, "fp": 10, "fn": 0}]
    area = report.bucket_rows(per_image, "person_fraction", report.AREA_BUCKETS)
    people = report.bucket_rows(per_image, "regions", report.REGION_BUCKETS)
    assert area[0]["iou_lost"] == pytest.approx(0.95 - 0.5)
    assert area[3]["iou_lost"] == pytest.approx(100 / 190 - 0.5)
    assert people[1]["iou_lost"] == pytest.approx(150 / 200 - 0.5)
    assert area[0]["error_share"] == pytest.approx(0.9) and area[0]["images"] == 2
    assert area[1]["images"] == 0 and np.isnan(area[1]["mean_iou"])
    result = {"per_image": per_image, "iou": 0.5, "threshold": 0.5, "split": "validation",
              "precision": 100 / 110, "recall": 0.5, "boundary_f1": 0.45,
              "threshold_sweep": {"thresholds": [0.0, 0.5], "person": [190, 100],
                                  "pixels": [400, 110]}}
    recs = report.recommendations(result, area, people, [], None)
    assert recs[0].startswith("Most IoU is lost on images whose person covers <10% of them") and "small people" in recs[0]


def test_false_positives_on_person_free_photos_are_not_blamed_on_small_people():
    # "e" has no person and holds most errors: its bucket is people "0", in no area bucket.
    per_image = [
        {"id": "e", "iou": 0.0, "person_fraction": 0.0, "regions": 0, "tp": 0, "fp": 300, "fn": 0},
        {"id": "s", "iou": 0.8, "person_fraction": 0.05, "regions": 1, "tp": 40, "fp": 5, "fn": 5},
        {"id": "b", "iou": 0.9, "person_fraction": 0.4, "regions": 1, "tp": 90, "fp": 5, "fn": 5},
        {"id": "c", "iou": 0.9, "person_fraction": 0.6, "regions": 1, "tp": 90, "fp": 5, "fn": 5}]
    area = report.bucket_rows(per_image, "person_fraction", report.AREA_BUCKETS)
    people = report.bucket_rows(per_image, "regions", report.REGION_BUCKETS)
    assert sum(r["images"] for r in area) == 3 and area[0]["images"] == 1
    assert area[0]["fp"] == 5 and people[0]["fp"] == 300
    result = {"per_image": per_image, "iou": 220 / 545, "threshold": 0.5, "split": "validation",
              "precision": 220 / 535, "recall": 220 / 235, "boundary_f1": 0.45,
              "threshold_sweep": {"thresholds": [0.0, 0.5], "person": [235, 220],
                                  "pixels": [1000, 535]}}
    recs = report.recommendations(result, area, people, [], None)
    assert recs[0].startswith("Most IoU is lost on images with no person") and "person-free" in recs[0]
    assert "small people" not in " ".join(recs)


def test_a_bucket_failing_only_by_its_size_gets_no_specific_advice():
    per_image = [{"id": str(i), "iou": 0.5, "person_fraction": 0.3, "regions": 3, "tp": 50,
                  "fp": 25, "fn": 25} for i in range(4)]
    area = report.bucket_rows(per_image, "person_fraction", report.AREA_BUCKETS)
    people = report.bucket_rows(per_image, "regions", report.REGION_BUCKETS)
    result = {"per_image": per_image, "iou": 0.5, "threshold": 0.5, "split": "validation",
              "precision": 2 / 3, "recall": 2 / 3, "boundary_f1": 0.45,
              "threshold_sweep": {"thresholds": [0.0, 0.5], "person": [300, 200],
                                  "pixels": [1000, 300]}}
    recs = report.recommendations(result, area, people, [], None)
    assert "in proportion" in recs[0] and "Suggested" not in recs[0]
    assert not any(r.startswith("Out of proportion") for r in recs)
    assert "balanced" in recs[2]


def test_boundary_advice_leaves_out_refinement_once_it_is_applied():
    result = {"boundary_f1": 0.70, "iou": 0.95, "model_resolution": None}
    plain = report._boundary_recommendation(result)
    refined = report._boundary_recommendation(dict(result, refine=True))
    assert "--refine" in plain and "--refine" not in refined
    assert "boundary-aware loss" in plain and "boundary-aware loss" in refined
    assert "of the wrong pixels" not in plain  # an eval file from before the edge counts


def test_boundary_advice_offers_no_refinement_for_scored_predictions():
    """A --predictions eval was told to try --refine in evaluate, which refuses it there."""
    result = {"boundary_f1": 0.70, "iou": 0.95, "model_resolution": None}
    for read_as in ("masks", "soft maps"):
        advice = report._boundary_recommendation(dict(result, predictions_read_as=read_as))
        assert "--refine" not in advice and "boundary-aware loss" in advice


def test_boundary_advice_splits_errors_between_edges_and_regions():
    result = {"boundary_f1": 0.95, "iou": 0.96, "model_resolution": None,
              "boundary_tolerance_px": {"original": 8, "model": 3},
              "near_edge_error_share": 0.3, "iou_without_edge_errors": 0.972}
    advice = report._boundary_recommendation(result)
    assert "keeps pace" in advice
    assert "30% of the wrong pixels lie within 8 px of the true edge (IoU 0.972" in advice
    assert "the other 70% are regions" in advice
    perfect = dict(result, iou=1.0, near_edge_error_share=0.0, iou_without_edge_errors=1.0)
    assert "wrong pixels" not in report._boundary_recommendation(perfect)


class Constant(nnx.Module):
    """A member whose logits are one value: which members an ensemble kept shows in its output."""

    def __init__(self, value):
        self.value = value

    def __call__(self, images, *, train=False):
        return jnp.full(images.shape[:3] + (1,), self.value, jnp.float32)


def test_an_eval_of_the_first_members_gets_overlays_of_those_members():
    from jaxseg.models import LogitAverage

    ensemble = LogitAverage([Constant(1.0), Constant(3.0), Constant(8.0)])
    images = jnp.zeros((1, 4, 4, 3), jnp.uint8)
    for members, logit in ((None, 4.0), (0, 4.0), (1, 1.0), (2, 2.0), (3, 4.0)):
        model = report.first_members(ensemble, members)
        assert float(model(images)[0, 0, 0, 0]) == logit, members
    # The step an eval of the first N members records (inference.load's rule).
    assert inference.member_steps([4000, 6000], 1) == 4000
    assert inference.member_steps([4000, 6000, 7000], 2) == [4000, 6000]
    assert inference.member_steps([4000, 6000], None) == [4000, 6000]
    assert inference.member_steps(4000, None) == 4000


def test_slices_whose_names_slug_alike_keep_their_own_figures(tmp_path):
    """test[:50%] and test[50%:] both slug to test-50: the second's figures overwrote the first's
    files, and the Markdown showed the second's charts in both sections."""
    source = fake_source(8, seed=3, min_size=40, max_size=60)
    params = {case: {k: v for k, v in CASES[case].items() if k != "expect"} for case in CASES}
    workdir = make_workdir(tmp_path, fake_eval(source, **params["over"]))
    for split, case in (("validation[:50%]", "under"), ("validation[50%:]", "over")):
        result = dict(fake_eval(source, **params[case], seed=1), split=split)
        (workdir / "eval" / f"best_fake_{split}.json").write_text(json.dumps(result))
    paths = report.build_report(workdir, k=2)
    figures = paths["figures"]
    assert len(figures) == len(set(figures)) == 1 + 3 * 2  # training; 2 charts per evaluation
    charts = {p.name: p.read_bytes() for p in figures
              if "validation-50_threshold" in p.stem}
    assert len(set(charts.values())) == 2  # the under- and the over-segmenting slice
    markdown = paths["markdown"].read_text()
    assert all(markdown.count(f"]({name})") == 1 for name in charts)


def test_an_eval_without_images_gets_no_advice(tmp_path):
    source = fake_source(8, seed=3, min_size=40, max_size=60)
    result = fake_eval(source, **{k: v for k, v in CASES["over"].items() if k != "expect"})
    result.update(num_images=0, per_image=[])
    paths = report.build_report(make_workdir(tmp_path, result), k=2)
    markdown = paths["markdown"].read_text()
    assert "No images were evaluated: nothing to analyse." in markdown
    assert "over-segments" not in markdown and "Boundaries are the weak point" not in markdown


def test_two_scored_folders_are_two_tables(tmp_path):
    """Results of two --images/--masks folders share dataset and split; they used to share a table."""
    def result(folder):
        return {"dataset": "person_folder", "split": "train", "folder": folder, "iou": 0.9,
                "precision": 0.9, "recall": 0.9, "checkpoint_step": 1}

    files = [report.EvalFile(tmp_path / f"best_person_folder_train_{n}.json", result(f"/d/{n}"),
                             peer=False) for n in ("a", "b")]
    headings = [b.text for b in report.metric_tables(files, []) if isinstance(b, report.Heading)]
    assert headings == ["person_folder / train (/d/a)", "person_folder / train (/d/b)"]


def test_an_unwritable_report_folder_is_one_line_before_any_work(tmp_path):
    (tmp_path / "w").mkdir()
    (tmp_path / "file").write_text("")
    result = subprocess.run(
        [sys.executable, "-m", "jaxseg.report", "--workdir", str(tmp_path / "w"), "--output",
         str(tmp_path / "file" / "sub")], capture_output=True, text=True, timeout=300,
        cwd=pathlib.Path(__file__).resolve().parents[1])
    assert result.returncode != 0
    assert "cannot create it (Not a directory); give --output a writable folder" in result.stderr
    assert "Traceback" not in result.stderr
    # The pretrained model's report: nothing written where it is run.
    (tmp_path / "elsewhere").mkdir()
    result = subprocess.run(
        [sys.executable, "-m", "jaxseg.report", "--output", str(tmp_path / "file" / "sub")],
        capture_output=True, text=True, timeout=300, cwd=tmp_path / "elsewhere",
        env=dict(os.environ, PYTHONPATH=str(pathlib.Path(__file__).resolve().parents[1])))
    assert result.returncode != 0 and "give --output a writable folder" in result.stderr
    assert list((tmp_path / "elsewhere").iterdir()) == []


def test_damaged_pretrained_weights_are_one_line_before_anything_is_written(tmp_path):
    """The report of the pretrained model loaded it outside any handler: weights cut short (a
    damaged copy) ended it in a traceback, where predict, evaluate and export say one line."""
    from fake_data import tiny_config
    from jaxseg.models import create_model

    config = tiny_config()
    pretrained = tmp_path / "pretrained"
    inference.save_pretrained(create_model(config.model, seed=1), config, {"steps": 1}, pretrained)
    for data in (pretrained / inference.PRETRAINED_WEIGHTS).rglob("d/*"):
        data.write_bytes(data.read_bytes()[:data.stat().st_size // 2])
    (tmp_path / "elsewhere").mkdir()
    result = subprocess.run(
        [sys.executable, "-c", "import pathlib, runpy, sys; from jaxseg import inference; "
         "inference.PRETRAINED_DIR = pathlib.Path(sys.argv.pop(1)); "
         "runpy.run_module('jaxseg.report', run_name='__main__')",
         str(pretrained), "--output", str(tmp_path / "r")],
        capture_output=True, text=True, timeout=300, cwd=tmp_path / "elsewhere",
        env=dict(os.environ, PYTHONPATH=str(pathlib.Path(__file__).resolve().parents[1])))
    assert result.returncode == 1 and "Traceback" not in result.stderr, result.stderr[-2000:]
    assert result.stderr.strip().splitlines()[-1].startswith(
        f"error: pretrained weights {pretrained / inference.PRETRAINED_WEIGHTS} cannot be read (")
    assert list((tmp_path / "elsewhere").iterdir()) == []


def test_a_checkpoint_without_a_workdir_is_refused(tmp_path):
    """Once ignored: the report then showed the pretrained model's overlays."""
    result = subprocess.run(
        [sys.executable, "-m", "jaxseg.report", "--checkpoint", "latest", "--output",
         str(tmp_path / "r")], capture_output=True, text=True, timeout=300,
        cwd=pathlib.Path(__file__).resolve().parents[1])
    assert result.returncode != 0
    assert "--checkpoint latest needs --workdir" in result.stderr
    assert "Traceback" not in result.stderr and not (tmp_path / "r").exists()


def test_a_workdir_with_a_bracket_in_its_path_finds_its_evals(tmp_path):
    """A '[' in the folder's own path is a character, not a glob pattern."""
    source = fake_source(8, seed=3, min_size=40, max_size=60)
    result = fake_eval(source, **{k: v for k, v in CASES["over"].items() if k != "expect"})
    workdir = make_workdir(tmp_path / "run[1]", result)
    found = report.find_evals(epath.Path(workdir) / "eval", peer=False)
    assert [e.path.name for e in found] == ["best_fake_validation.json"]


def test_a_partial_file_left_by_a_killed_evaluation_is_not_an_evaluation(tmp_path):
    """evaluate writes its results to a hidden partial file and renames it; one a SIGKILL left
    complete before the rename was read as a second evaluation of the split."""
    workdir = make_workdir(tmp_path, {"dataset": "fake", "split": "validation", "iou": 0.9,
                                      "precision": 0.9, "recall": 0.9, "checkpoint_step": 1})
    evals = workdir / "eval"
    (evals / ".jaxseg-7-0123456789ab.partial.json").write_text(
        (evals / "best_fake_validation.json").read_text())
    found = report.find_evals(epath.Path(evals), peer=False)
    assert [e.path.name for e in found] == ["best_fake_validation.json"]


def test_an_eval_json_cut_short_is_named_not_left_out_without_a_word(tmp_path, capsys):
    """A damaged eval JSON was skipped silently (the report read as if it had never run), and a
    folder named like one stopped the report with IsADirectoryError."""
    source = fake_source(4, seed=3, min_size=40, max_size=60)
    result = fake_eval(source, **{k: v for k, v in CASES["over"].items() if k != "expect"})
    evals = make_workdir(tmp_path, result) / "eval"
    whole = (evals / "best_fake_validation.json").read_text()
    (evals / "best_fake_test.json").write_text(whole[: len(whole) // 2])
    (evals / "old.json").mkdir()
    found = report.find_evals(epath.Path(evals), peer=False)
    assert [e.path.name for e in found] == ["best_fake_validation.json"]
    lines = capsys.readouterr().err.splitlines()
    assert len(lines) == 2, lines
    assert lines[0].startswith(f"warning: {evals / 'best_fake_test.json'} left out: not a "
                               "readable JSON file (")
    assert lines[1].startswith(f"warning: {evals / 'old.json'} left out: ")


def test_an_eval_json_without_what_the_analysis_reads_is_a_line_not_a_traceback(tmp_path):
    """A cut-down eval JSON (no per-image results, no sweep) stopped the whole report with a
    KeyError, and so did a peer without a boundary F1 beside a complete own eval."""
    summary = {"dataset": "fake", "split": "validation", "iou": 0.9, "precision": 0.9,
               "recall": 0.9, "checkpoint_step": STEP}
    workdir = make_workdir(tmp_path / "cut", summary)
    markdown = report.build_report(workdir, k=2)["markdown"].read_text()
    assert ("Not analysed: best_fake_validation.json lacks num_images, per_image, threshold, "
            "threshold_sweep, mean_image_iou, boundary_f1") in markdown
    assert "| best (step 20) | 0.900 |" in markdown  # still a row of the metric table

    source = fake_source(8, seed=3, min_size=40, max_size=60)
    result = fake_eval(source, **{k: v for k, v in CASES["over"].items() if k != "expect"})
    workdir = make_workdir(tmp_path / "peer", result)
    peer = workdir.parent / "peers" / "mediapipe_fake_validation.json"
    peer.write_text(json.dumps({k: v for k, v in json.loads(peer.read_text()).items()
                                if k != "boundary_f1"}))
    markdown = report.build_report(workdir, k=2)["markdown"].read_text()
    assert f"boundary F1 {result['boundary_f1']:.3f} vs —." in markdown


def test_a_split_with_nothing_to_show_says_so_instead_of_an_overlay_error():
    """Person-free photos with nothing predicted: no best or worst example to draw."""
    per_image = [{"id": str(i), "iou": 1.0, "dice": 1.0, "regions": 0, "person_fraction": 0.0,
                  "tp": 0, "fp": 0, "fn": 0} for i in range(3)]
    result = {"per_image": per_image, "num_images": 3, "dataset": "fake", "split": "test",
              "threshold": 0.5, "iou": 1.0, "mean_image_iou": 1.0, "boundary_f1": 1.0,
              "precision": 1.0, "recall": 1.0, "checkpoint_step": STEP,
              "threshold_sweep": {"thresholds": list(SWEEP_THRESHOLDS),
                                  "person": [0] * len(SWEEP_THRESHOLDS),
                                  "pixels": [0] * len(SWEEP_THRESHOLDS)}}
    class NothingToFetch:  # a loaded model: the overlay path itself is reached
        def fetch(self, *args, **kwargs):
            return []

    blocks, _ = report.eval_section(report.EvalFile(epath.Path("best_fake_test.json"), result, False),
                                    [], examples=NothingToFetch(), k=2, image_size=None)
    texts = [b.text for b in blocks if isinstance(b, report.Text)]
    assert "No overlays: no image has a person or a prediction to show." in texts
    assert not any("skipped" in t for t in texts)


def test_best_and_worst_examples_are_picked_by_iou():
    """Images with neither person nor prediction are no example; ties go by id."""
    def record(id_, iou, tp=10, fp=1, fn=1):
        return {"id": id_, "iou": iou, "tp": tp, "fp": fp, "fn": fn}

    per_image = [record("a", 0.9), record("b", 0.2), record("c", 0.95), record("d", 0.5),
                 record("e", 0.2), record("empty", 1.0, tp=0, fp=0, fn=0)]
    best, worst = report.pick_examples(per_image, 2)
    assert [r["id"] for r in best] == ["c", "a"]
    assert [r["id"] for r in worst] == ["b", "e"]


def _sweep_with_best_gain(gain_pixels):
    """A two-threshold sweep scored at 0.5 whose 0.6 removes GAIN_PIXELS false positives."""
    sweep = {"thresholds": [0.0, 0.5, 0.6], "person": [1000, 800, 800],
             "pixels": [10000, 1000, 1000 - gain_pixels]}
    tp, fp, fn = 800, np.array([200, 200 - gain_pixels]), 200
    iou = tp / (tp + fp + fn)  # at 0.5 and at 0.6, by the definition
    return sweep, float(iou[0]), float(iou[1] - iou[0])


def test_a_threshold_gain_within_the_noise_keeps_the_threshold():
    """Below THRESHOLD_MIN_GAIN the advice is to keep the threshold, above it to move it."""
    for gain_pixels in (1, 2, 30):
        sweep, iou, gain = _sweep_with_best_gain(gain_pixels)
        result = {"threshold_sweep": sweep, "threshold": 0.5, "split": "validation", "iou": iou}
        advice = report._threshold_recommendation(result)
        if gain < report.THRESHOLD_MIN_GAIN:
            assert advice.startswith("Keep the threshold at 0.5: the best sweep threshold (0.6)"), advice
        else:
            assert advice.startswith("Raise the threshold from 0.5 to 0.6:"), advice
    assert _sweep_with_best_gain(1)[2] < report.THRESHOLD_MIN_GAIN < _sweep_with_best_gain(30)[2]


def test_boundary_advice_blames_upsampling_only_when_model_resolution_edges_are_better():
    result = {"boundary_f1": 0.5, "iou": 0.9}
    lost = dict(result, model_resolution={"boundary_f1": 0.5 + 2 * report.BOUNDARY_MIN_GAP})
    kept = dict(result, model_resolution={"boundary_f1": 0.5 + report.BOUNDARY_MIN_GAP / 2})
    assert (f"at model resolution boundary F1 is {0.5 + 2 * report.BOUNDARY_MIN_GAP:.3f}, so "
            "edges are lost in upsampling") in report._boundary_recommendation(lost)
    assert "upsampling" not in report._boundary_recommendation(kept)
    assert "upsampling" not in report._boundary_recommendation(dict(result, model_resolution=None))


def test_the_costliest_bucket_is_not_named_again_as_out_of_proportion():
    # Four small people hold 90% of the errors: the costliest bucket, and the most out of
    # proportion one. One and two people alternate in both sizes: the people buckets hold half
    # the images and half the errors each.
    per_image = ([{"id": f"s{i}", "iou": 0.3, "person_fraction": 0.05, "regions": 1 + i % 2,
                   "tp": 30, "fp": 20, "fn": 50} for i in range(4)]
                 + [{"id": f"b{i}", "iou": 0.9, "person_fraction": 0.6, "regions": 1 + i % 2,
                     "tp": 300, "fp": 3, "fn": 2} for i in range(6)])
    area = report.bucket_rows(per_image, "person_fraction", report.AREA_BUCKETS)
    people = report.bucket_rows(per_image, "regions", report.REGION_BUCKETS)
    recs = report._bucket_recommendations(area, people, len(per_image))
    assert recs[0].startswith("Most IoU is lost on images whose person covers <10% of them") and "Suggested" in recs[0]
    assert len(recs) == 1, recs


def test_a_sizeable_bucket_out_of_proportion_is_named_and_a_single_image_is_not():
    """The costliest bucket (one person: 19 of 20 images, 480 of 540 error pixels) is in
    proportion; five small people (25% of the images, 200/540 = 37% of the errors, 1.5x) are
    named as out of proportion. One crowded image with 60 errors (2.2x) is too few to name."""
    def rows(n, fraction, regions, tp, fp, fn, name):
        return [{"id": f"{name}{i}", "iou": tp / (tp + fp + fn), "person_fraction": fraction,
                 "regions": regions, "tp": tp, "fp": fp, "fn": fn} for i in range(n)]

    per_image = (rows(14, 0.6, 1, 300, 10, 10, "b") + rows(5, 0.05, 1, 30, 20, 20, "s")
                 + rows(1, 0.3, 3, 50, 30, 30, "c"))
    area = report.bucket_rows(per_image, "person_fraction", report.AREA_BUCKETS)
    people = report.bucket_rows(per_image, "regions", report.REGION_BUCKETS)
    recs = report._bucket_recommendations(area, people, len(per_image))
    assert recs[0].startswith("Most IoU is lost on images with 1 person") and "in proportion" in recs[0]
    assert len(recs) == 2, recs
    assert recs[1].startswith("Out of proportion: images whose person covers <10% of them are 25% "
                              "of the images but 37% of the error pixels (1.5x)"), recs[1]
    assert "small people" in recs[1]


class RecordingExamples:
    """Stands in for ModelExamples: records what each fetch asked for and returns the fake
    source's examples with the brightness model's probabilities."""

    def __init__(self, source, step=STEP):
        self.step = step
        self.calls = []
        self.by_id = {ex["id"]: ex for ex in source}

    def fetch(self, dataset, split, ids, **options):
        self.calls.append(options)

        def probs(image):
            return 1 / (1 + np.exp(-np.asarray(Brightness()(image[None]))[0, ..., 0]))

        return [{"image": self.by_id[i]["image"], "mask": self.by_id[i]["mask"][..., 0] > 0,
                 "probs": probs(self.by_id[i]["image"])} for i in ids]


def test_overlays_are_predicted_with_the_options_the_eval_used():
    source = fake_source(4, seed=3, min_size=40, max_size=60)
    result = fake_eval(source, 0.42, 0.2, boundary_f1=0.0, resolution_gain=0.0)
    result.update(flip_tta=True, refine=True, members=2, folder="/photos", data_dir="/prepared")
    examples = RecordingExamples(source)
    blocks, _ = report.eval_section(report.EvalFile(epath.Path("best_fake_validation.json"),
                                                    result, False), [], examples, 2, 32)
    assert [b.name for b in blocks if isinstance(b, report.Image)][-2:] == [
        "best-fake-validation_worst", "best-fake-validation_best"]
    assert examples.calls == [dict(flip_tta=True, refined=True, members=2, folder="/photos",
                                   data_dir="/prepared")] * 2


def test_only_the_examples_checkpoint_gets_the_detailed_analysis(tmp_path):
    source = fake_source(4, seed=3, min_size=40, max_size=60)
    result = fake_eval(source, 0.42, 0.2, boundary_f1=0.0, resolution_gain=0.0)
    workdir = make_workdir(tmp_path, result)
    (workdir / "eval" / "latest_fake_validation.json").write_text(
        json.dumps(dict(result, checkpoint_step=STEP // 2)))
    examples = RecordingExamples(source)
    markdown = report.build_report(workdir, k=2, examples=examples)["markdown"].read_text()
    # Both rows are in the metric table; only the examples' step is analysed.
    assert f"| best (step {STEP}) |" in markdown and f"| latest (step {STEP // 2}) |" in markdown
    assert f"## fake / validation: best (step {STEP})" in markdown
    assert f"fake / validation: latest (step {STEP // 2})" not in markdown
    assert len(examples.calls) == 2  # worst and best of the one analysed eval


def test_without_an_eval_of_the_checkpoint_the_advice_scores_that_checkpoint(tmp_path):
    """The command given scored 'best' whatever --checkpoint the report was for (its evals then
    still had another step), and without a model the report spoke of 'checkpoint step None'."""
    source = fake_source(4, seed=3, min_size=40, max_size=60)
    result = fake_eval(source, 0.42, 0.2, boundary_f1=0.0, resolution_gain=0.0)
    workdir = make_workdir(tmp_path, result)
    markdown = report.build_report(workdir, k=2, examples=RecordingExamples(source, 2 * STEP),
                                   checkpoint="latest")["markdown"].read_text()
    assert (f"No eval JSON of checkpoint step {2 * STEP} under {workdir / 'eval'}: run python -m "
            f"jaxseg.evaluate --workdir {workdir} --checkpoint latest --dataset NAME --split SPLIT "
            "first.") in markdown
    (workdir / "eval" / "best_fake_validation.json").unlink()
    markdown = report.build_report(workdir, k=2)["markdown"].read_text()
    assert (f"No eval JSON under {workdir / 'eval'}: run python -m jaxseg.evaluate --workdir "
            f"{workdir} --dataset NAME --split SPLIT first.") in markdown


def test_overlays_of_two_member_counts_come_from_two_models():
    """The predictor is cached per options: an eval of the first member and one of the whole
    ensemble must not share one."""
    from jaxseg.models import LogitAverage

    source = fake_source(2, seed=5, min_size=20, max_size=30)
    examples = report.ModelExamples(LogitAverage([Constant(1.0), Constant(3.0), Constant(8.0)]), 32,
                                    STEP, source_for=lambda *_: source)
    ids = [ex["id"] for ex in source]
    for members, logit in ((1, 1.0), (None, 4.0), (2, 2.0)):
        for fetched, ex in zip(examples.fetch("fake", "validation", ids, members=members), source):
            np.testing.assert_allclose(fetched["probs"], np.full(ex["image"].shape[:2],
                                                                 1 / (1 + np.exp(-logit))), rtol=1e-6)


def test_overlays_mark_the_pixels_at_the_evals_threshold(monkeypatch):
    image = np.full((8, 8, 3), 100, np.uint8)
    probs = np.tile(np.linspace(0.05, 0.95, 8, dtype=np.float32), (8, 1))
    mask = np.zeros((8, 8), bool)
    seen = []
    monkeypatch.setattr(report, "error_map", lambda image, target, pred: seen.append(pred) or image)
    report.overlay_figure("x", "worst 1 by IoU", [{"id": "a", "iou": 0.5}],
                          [{"image": image, "mask": mask, "probs": probs}], 0.7)
    np.testing.assert_array_equal(seen[0], probs >= 0.7)


def test_nothing_predicted_is_precision_one_in_the_sweep_as_in_the_metrics():
    # At the sweep's top threshold nothing is predicted: no false positives.
    sweep = {"thresholds": [0.0, 0.5, 0.9], "person": [100, 60, 0], "pixels": [1000, 80, 0]}
    curves = report.threshold_curves(sweep)
    from_counts = metrics.metrics_from_counts({"tp": [0], "fp": [0], "fn": [100], "tn": [900],
                                               **{k: [0] for k in metrics.COUNT_KEYS[4:]}})
    assert curves["precision"][2] == from_counts["precision"] == 1.0
    assert curves["precision"][1] == pytest.approx(60 / 80) and curves["recall"][2] == 0.0


def test_a_missing_peer_folder_is_refused(tmp_path):
    """A mistyped --peer_dir must not give a report without the peers and without a word."""
    (tmp_path / "w").mkdir()
    result = subprocess.run(
        [sys.executable, "-m", "jaxseg.report", "--workdir", str(tmp_path / "w"), "--peer_dir",
         str(tmp_path / "nowhere"), "--output", str(tmp_path / "r")], capture_output=True,
        text=True, timeout=300, cwd=pathlib.Path(__file__).resolve().parents[1])
    assert result.returncode != 0
    assert f"--peer_dir {tmp_path / 'nowhere'}: no such folder" in result.stderr
    assert "Traceback" not in result.stderr and not (tmp_path / "r").exists()


def test_a_word_without_a_flag_is_refused(tmp_path):
    """absl leaves such words unread: `--workdir a b` reported on a alone, without a word."""
    (tmp_path / "w").mkdir()
    result = subprocess.run(
        [sys.executable, "-m", "jaxseg.report", "--workdir", str(tmp_path / "w"), "runs/other",
         "--output", str(tmp_path / "r")], capture_output=True, text=True, timeout=300,
        cwd=pathlib.Path(__file__).resolve().parents[1])
    assert result.returncode != 0
    assert "unexpected argument(s) runs/other: every setting is a --flag" in result.stderr
    assert "Traceback" not in result.stderr and not (tmp_path / "r").exists()


def test_the_metric_table_shows_both_resolutions_and_the_balance_its_numbers():
    def eval_file(name, iou, at_model):
        return report.EvalFile(epath.Path(f"{name}_fake_validation.json"),
                               {"dataset": "fake", "split": "validation", "iou": iou,
                                "precision": 0.9, "recall": 0.8, "checkpoint_step": STEP,
                                "model_resolution": {"iou": at_model}}, peer=False)

    table = next(b for b in report.metric_tables([eval_file("best", 0.71, 0.83)], [])
                 if isinstance(b, report.Table))
    row = dict(zip(table.header, table.rows[0]))
    assert (row["IoU"], row["IoU (model res)"]) == ("0.710", "0.830")
    # 90 misses against 30 false positives: 3 misses per false positive, and the reverse.
    per_image = [{"fp": 10, "fn": 60}, {"fp": 20, "fn": 30}]
    result = {"per_image": per_image, "precision": 0.9, "recall": 0.8}
    assert "3.0 missed person pixels per false positive" in report._balance_recommendation(result)
    swapped = [{"fp": r["fn"], "fn": r["fp"]} for r in per_image]
    assert "3.0 false-positive pixels per missed person pixel" in report._balance_recommendation(
        dict(result, per_image=swapped))


def test_a_peer_is_compared_image_by_image_where_it_scores_the_same_images(tmp_path):
    source = fake_source(30, seed=4, min_size=40, max_size=60)
    own = fake_eval(source, 0.575, 0.3, boundary_f1=0.8, resolution_gain=0.0)
    other = fake_eval(source, 0.57, 0.3, boundary_f1=0.7, resolution_gain=0.0, seed=1)
    path = epath.Path(tmp_path / "mediapipe_fake_validation.json")
    own_iou = np.array([r["iou"] for r in own["per_image"]])
    other_iou = np.array([r["iou"] for r in other["per_image"]])
    wins, losses = int(np.sum(own_iou > other_iou)), int(np.sum(own_iou < other_iou))
    assert wins > losses > 0  # the peer misses a few more person pixels, not on every image

    said = report.peer_comparison(own, report.EvalFile(path, other, peer=True))
    assert said.startswith(f"Ahead of mediapipe (peer) by {own['iou'] - other['iou']:.3f} IoU")
    assert f"higher IoU on {wins} of 30 images, mediapipe (peer) on {losses};" in said
    low, high = map(float, re.search(r"interval over images is (\S+) to (\S+?)[ ;]", said).groups())
    assert low < own["iou"] - other["iou"] < high
    assert ("(within noise)" in said) == (low <= 0 <= high)
    # Rows of other images (another cut of the split), or none: the two IoUs alone.
    for peer in (dict(other, per_image=other["per_image"][1:]),
                 {k: v for k, v in other.items() if k != "per_image"}):
        said = report.peer_comparison(own, report.EvalFile(path, peer, peer=True))
        assert "interval" not in said and "higher IoU" not in said
        assert said.endswith("boundary F1 0.800 vs 0.700.")
