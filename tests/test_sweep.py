"""jaxseg.sweep: grid parsing, ranked tables by validation IoU, resumable runs."""
import json
import os
import pathlib
import re

import pytest

from jaxseg import sweep

REPO = pathlib.Path(__file__).resolve().parents[1]


def test_grid_and_random_trials():
    grid = sweep.parse_grid(["optim.learning_rate=1e-3,3e-3", "model.norm=batch,group"])
    assert grid == {"optim.learning_rate": [1e-3, 3e-3], "model.norm": ["batch", "group"]}
    assert len(sweep.trials(grid)) == 4
    picked = sweep.trials(grid, num_random=3, seed=1)
    assert len(picked) == 3 and len({sweep.trial_name(t) for t in picked}) == 3
    assert picked == sweep.trials(grid, num_random=3, seed=1)
    with pytest.raises(ValueError):
        sweep.parse_grid(["no_equals_sign"])


def test_sweep_ranks_by_validation_and_skips_finished(manual_dir, tmp_path, monkeypatch):
    monkeypatch.chdir(REPO)
    monkeypatch.setenv("JAXSEG_MANUAL_DIR", str(manual_dir))
    extra = ["--config.train.num_steps=2", "--config.train.eval_every=2",
             "--config.train.checkpoint_every=2", "--config.data.image_size=32",
             "--config.model.depth=2", "--config.eval.max_examples=8",
             "--config.train.num_logged_images=0"]
    combos = sweep.trials(sweep.parse_grid(["optim.learning_rate=0.001,0.01"]))
    rows = sweep.run("configs/smoke.py", tmp_path, combos, extra=extra)
    assert [r["val_iou"] for r in rows] == sorted((r["val_iou"] for r in rows), reverse=True)
    for row in rows:  # each row is the best validation record of its own trial
        records = [json.loads(l) for l in
                   (tmp_path / row["trial"] / "metrics.jsonl").read_text().splitlines()]
        assert row["val_iou"] == max(r["val_iou"] for r in records if r["kind"] == "validation")
    table = (tmp_path / "results.md").read_text()
    assert re.findall(r"^\| (\d+) \| ([^|]+) \|", table, re.M) == [
        ("1", rows[0]["trial"]), ("2", rows[1]["trial"])]
    stamp = {r["trial"]: os.path.getmtime(tmp_path / r["trial"] / sweep.RESULT_FILE) for r in rows}
    again = sweep.run("configs/smoke.py", tmp_path, combos, extra=extra)
    assert again == rows
    assert stamp == {r["trial"]: os.path.getmtime(tmp_path / r["trial"] / sweep.RESULT_FILE)
                     for r in rows}
