"""jaxseg.compare against numpy on the masks themselves, and its interval against the normal
approximation."""
import json

import cv2
import numpy as np
import pytest

from fake_data import fake_source
from jaxseg import compare, evaluate, sharding


def _eval_json(path, result, dataset="fake", split="test"):
    path.write_text(json.dumps(dict(result, dataset=dataset, split=split)))
    return path


def _counts_json(path, tp, fp, fn, ids=None, **meta):
    ids = ids or [f"{i:04d}" for i in range(len(tp))]
    rows = [{"id": i, "tp": int(a), "fp": int(b), "fn": int(c)} for i, a, b, c in zip(ids, tp, fp, fn)]
    return _eval_json(path, {"per_image": rows}, **meta)


def test_the_figures_are_those_of_the_masks_evaluate_scored(tmp_path, capsys):
    source = fake_source(12, seed=5)
    rng = np.random.default_rng(0)
    truth = [ex["mask"][..., 0] > 0 for ex in source]
    predicted = {}
    for name, most in (("a", 2), ("b", 6)):  # B's masks are shifted further than A's
        folder = tmp_path / name
        folder.mkdir()
        predicted[name] = []
        for ex, t in zip(source, truth):
            p = np.roll(t, int(rng.integers(0, most + 1)), axis=1)
            predicted[name].append(p)
            cv2.imwrite(str(folder / f"{ex['id']}.png"), p.astype(np.uint8) * 255)
    ev = evaluate.Evaluator(source, mesh=sharding.make_mesh(1), image_size=32, batch_size=4)
    a = _eval_json(tmp_path / "a.json", ev.evaluate_predictions(tmp_path / "a"))
    b_result = ev.evaluate_predictions(tmp_path / "b")
    b_result["per_image"].reverse()  # rows are paired by id, not by place
    b = _eval_json(tmp_path / "b.json", b_result)

    compare.main([str(a), str(b), "--samples", "500", "--output", str(tmp_path / "c.json")])
    result = json.loads((tmp_path / "c.json").read_text())
    image_iou = {name: np.array([(t & p).sum() / (t | p).sum() for t, p in zip(truth, masks)])
                 for name, masks in predicted.items()}
    dataset_iou = {name: sum((t & p).sum() for t, p in zip(truth, masks))
                   / sum((t | p).sum() for t, p in zip(truth, masks))
                   for name, masks in predicted.items()}
    np.testing.assert_allclose([result["iou"]["a"], result["iou"]["b"]],
                               [dataset_iou["a"], dataset_iou["b"]], rtol=1e-12)
    np.testing.assert_allclose(result["mean_image_iou"]["difference"],
                               image_iou["a"].mean() - image_iou["b"].mean(), rtol=1e-12)
    assert result["images"]["a_higher"] == int(np.sum(image_iou["a"] > image_iou["b"]))
    assert result["images"]["b_higher"] == int(np.sum(image_iou["a"] < image_iou["b"]))
    for name in ("iou", "mean_image_iou"):
        low, high = result[name]["interval_95"]
        assert low < result[name]["difference"] < high
    printed = capsys.readouterr().out
    assert f"A - B {result['iou']['difference']:+.4f}" in printed


def test_the_interval_is_the_normal_approximation_of_many_images(tmp_path):
    rng = np.random.default_rng(1)
    n = 600
    union = rng.integers(1000, 5000, n)
    iou_a, iou_b = rng.uniform(0.85, 1.0, n), rng.uniform(0.8, 1.0, n)
    paths = []
    for name, iou in (("a", iou_a), ("b", iou_b)):
        tp = np.round(union * iou).astype(int)
        paths.append(_counts_json(tmp_path / f"{name}.json", tp, (union - tp) // 2,
                                  union - tp - (union - tp) // 2))
    a, b = (compare.Evaluation.read(p) for p in paths)
    result = compare.compare(a, b, samples=4000, seed=3)
    image_a, image_b = (np.round(union * i) / union for i in (iou_a, iou_b))
    d = image_a - image_b
    half_width = 1.96 * d.std(ddof=1) / np.sqrt(n)
    low, high = result["mean_image_iou"]["interval_95"]
    np.testing.assert_allclose([low, high], [d.mean() - half_width, d.mean() + half_width],
                               atol=0.12 * half_width)
    same = compare.compare(a, a, samples=200)
    assert same["iou"]["interval_95"] == [0.0, 0.0]
    assert same["images"]["a_higher"] == same["images"]["b_higher"] == 0
    assert same["images"]["sign_test_p"] == 1.0


def test_the_sign_test_is_the_binomial_tail():
    assert compare.sign_test_p(6, 10) == (210 + 120 + 45 + 10 + 1) / 1024
    assert compare.sign_test_p(10, 10) == 1 / 1024
    assert compare.sign_test_p(0, 10) == 1.0


@pytest.mark.parametrize("case, said", [
    ("other_split", "scores fake/test and .* fake/validation: compare evaluations of one split"),
    ("other_images", "1 only in the first, e.g. \\['0002'\\]; 1 only in the second"),
    # Id 0001 scored twice in B (a split of several folders' photos repeats ids): the
    # same set of ids, but not the same images.
    ("repeated_id", "0 only in the first, e.g. \\[\\]; 1 only in the second, e.g. \\['0001'\\]"),
    ("not_an_eval", "is not an eval JSON of jaxseg.evaluate"),
    ("missing", "cannot read it"),
])
def test_evaluations_that_do_not_pair_are_one_line(tmp_path, case, said):
    a = _counts_json(tmp_path / "a.json", [5, 6, 7], [1, 1, 1], [1, 1, 1])
    b = {"other_split": lambda p: _counts_json(p, [5, 6, 7], [1, 1, 1], [1, 1, 1],
                                               split="validation"),
         "other_images": lambda p: _counts_json(p, [5, 6, 7], [1, 1, 1], [1, 1, 1],
                                                ids=["0000", "0001", "0003"]),
         "repeated_id": lambda p: _counts_json(p, [5, 6, 6, 7], [1, 1, 1, 1], [1, 1, 1, 1],
                                               ids=["0000", "0001", "0001", "0002"]),
         "not_an_eval": lambda p: p.write_text('{"iou": 0.9}') and p,
         "missing": lambda p: p}[case](tmp_path / "b.json")
    with pytest.raises(SystemExit, match=f"^error: .*{said}"):
        compare.main([str(a), str(b)])
