"""jaxseg.sweep: grid parsing, ranked tables by validation IoU, resumable runs."""
import itertools
import json
import os
import pathlib
import random
import re
import shlex
import sys

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
    # More draws than the grid holds: the whole grid, each combination once.
    every = sweep.trials(grid, num_random=10)
    assert sorted(map(sweep.trial_name, every)) == sorted(map(sweep.trial_name, sweep.trials(grid)))
    with pytest.raises(ValueError):
        sweep.parse_grid(["no_equals_sign"])
    with pytest.raises(ValueError, match="optim.learning_rate lists 0.001 twice"):
        sweep.parse_grid(["optim.learning_rate=1e-3,3e-3,0.001"])
    # A tuple field's values keep their commas.
    assert sweep.parse_grid(["optim.step_fractions=(0.5,0.8),(0.6, 0.85)"]) == {
        "optim.step_fractions": [(0.5, 0.8), (0.6, 0.85)]}
    # So does a quoted string's (a mixture), with either quote and a bracket inside.
    assert sweep.parse_grid(["data.train='a:1,b:1',\"a:2,b:1\",'(c,d'"]) == {
        "data.train": ["a:1,b:1", "a:2,b:1", "(c,d"]}


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="RLIMIT_AS")
def test_random_trials_are_drawn_without_listing_the_grid(tmp_path):
    """--random 3 over 10 fields of 10 values listed all 10**10 combinations first: memory ran
    out (a MemoryError here, under a 2 GB limit; hours of swapping without one)."""
    import subprocess

    script = ("import json, resource, sys\n"
              "resource.setrlimit(resource.RLIMIT_AS, (2 << 30, 2 << 30))\n"
              "from jaxseg import sweep\n"
              "grid = {f'f{i}': list(range(10)) for i in range(10)}\n"
              "print(json.dumps(sweep.trials(grid, 3, seed=5)))\n")
    done = subprocess.run([sys.executable, "-c", script], cwd=REPO, capture_output=True,
                          text=True, timeout=120)
    assert done.returncode == 0, done.stderr[-2000:]
    picked = json.loads(done.stdout)
    assert len(picked) == 3 and len({json.dumps(p) for p in picked}) == 3
    assert all(sorted(p) == sorted(f"f{i}" for i in range(10)) and set(p.values()) <= set(range(10))
               for p in picked)
    # A seed draws what it drew from the listed grid, so a rerun finds its trials finished.
    grid = {"a": [1, 2, 3], "b": ["x", "y"], "c": [0.1, 0.2, 0.3, 0.4]}
    listed = [dict(zip(grid, v)) for v in itertools.product(*grid.values())]
    for num, seed in ((1, 0), (5, 3), (30, 1)):
        assert sweep.trials(grid, num, seed) == random.Random(seed).sample(listed, min(num, 24))
    with pytest.raises(ValueError, match="too many to draw from"):
        sweep.trials({f"f{i}": list(range(10)) for i in range(20)}, 3)


def test_parallel_trials_fill_the_slot_that_frees_first(tmp_path, monkeypatch):
    """With --parallel 2, one long trial and three short ones: the short ones run one after
    another in the second slot while the long one runs (once they all waited for it). The long
    trial lasts until the short ones have ended, or 60 s."""
    def fake_train(config, tdir, values, extra):
        (tdir / "config.json").write_text(json.dumps({"train": {"num_steps": 1}}))
        (tdir / "metrics.jsonl").write_text(
            json.dumps({"step": 1, "kind": "train", "loss": 0.5}) + "\n"
            + json.dumps({"step": 1, "kind": "validation", "val_iou": values["x"]}) + "\n")
        others = [str(tdir.parent / f"x={x}" / "ended") for x in (1, 2, 3)] if values["x"] == 0 else []
        return [sys.executable, "-c", "import os, pathlib, sys, time\n"
                f"others, deadline = {others!r}, time.monotonic() + 60\n"
                "while not all(map(os.path.exists, others)) and time.monotonic() < deadline:\n"
                "    time.sleep(0.05)\n"
                "here = pathlib.Path(sys.argv[1])\n"
                "(here / 'saw_the_others_end').write_text(str(all(map(os.path.exists, others))))\n"
                "(here / 'ended').write_text('')\n", str(tdir)]

    monkeypatch.setattr(sweep, "_command", fake_train)
    combos = sweep.trials(sweep.parse_grid(["x=0,1,2,3"]))
    assert [sweep.trial_name(t) for t in combos] == ["x=0", "x=1", "x=2", "x=3"]
    sweep.run("configs/smoke.py", tmp_path, combos, parallel=2)
    assert (tmp_path / "x=0" / "saw_the_others_end").read_text() == "True"


def test_a_trials_printed_command_reruns_it_in_a_shell(tmp_path, monkeypatch, capsys):
    """The line naming a trial's command joined its words with spaces: pasted into a shell to
    rerun the trial, a tuple's parentheses were a syntax error and a value's space split it."""
    ran = []

    def started(command):  # the trial's real command, recorded; a no-op runs instead
        ran.append(command)
        return [sys.executable, "-c", "pass"]

    monkeypatch.setattr(sweep, "_dying_with_the_sweep", started)
    combos = sweep.trials(sweep.parse_grid(
        ["model.output_shift=(0.5, 0.0)", "data.train='portrait_segmentation:1, ccp_person:1'"]))
    with pytest.raises(sweep.SweepError, match="left no usable record"):  # trained nothing
        sweep.run("configs/smoke.py", tmp_path / "s w", combos, extra=["--config.seed=1"])
    name = sweep.trial_name(combos[0])
    printed, = [line.removeprefix(f"trial {name}: ")
                for line in capsys.readouterr().out.splitlines() if line.startswith("trial ")]
    assert shlex.split(printed) == ran[0]
    assert "--config.model.output_shift=(0.5, 0.0)" in ran[0]


def test_parallel_trials_do_not_each_preallocate_the_gpu(tmp_path, monkeypatch):
    """Side by side on one GPU, each trial took 75% of its memory at start (JAX's default), so
    the second ran out of it; one at a time, or with the user's own allocator settings, the
    trials get the sweep's environment as it is."""
    for name in ("XLA_PYTHON_CLIENT_PREALLOCATE", "XLA_PYTHON_CLIENT_MEM_FRACTION",
                 "XLA_PYTHON_CLIENT_ALLOCATOR"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setattr(sweep, "_command", lambda config, tdir, values, extra: [
        sys.executable, "-c", "import os, sys; open(sys.argv[1], 'w').write(repr("
        "os.environ.get('XLA_PYTHON_CLIENT_PREALLOCATE')))", str(tdir / "seen")])
    seen = {}
    for parallel, preset in ((2, None), (1, None), (2, ".9")):
        if preset:
            monkeypatch.setenv("XLA_PYTHON_CLIENT_MEM_FRACTION", preset)
        folder = tmp_path / f"{parallel}-{preset}"
        with pytest.raises(sweep.SweepError, match="left no usable record"):  # trained nothing
            sweep.run("configs/smoke.py", folder, sweep.trials(sweep.parse_grid(["x=0,1"])),
                      parallel=parallel)
        seen[parallel, preset] = {(folder / f"x={x}" / "seen").read_text() for x in (0, 1)}
    assert seen == {(2, None): {"'false'"}, (1, None): {"None"}, (2, ".9"): {"None"}}


def test_sweep_ranks_by_validation_and_skips_finished(manual_dir, tmp_path, monkeypatch):
    monkeypatch.chdir(REPO)
    monkeypatch.setenv("JAXSEG_MANUAL_DIR", str(manual_dir))
    extra = ["--config.train.num_steps=2", "--config.train.eval_every=2",
             "--config.train.checkpoint_every=2", "--config.data.image_size=32",
             "--config.model.depth=2", "--config.eval.max_examples=8",
             "--config.train.num_logged_images=0"]
    combos = sweep.trials(sweep.parse_grid(["optim.learning_rate=0.001,0.01"]))
    rows = sweep.run("configs/smoke.py", tmp_path, combos, parallel=2, extra=extra)
    assert [r["val_iou"] for r in rows] == sorted((r["val_iou"] for r in rows), reverse=True)
    assert sorted(r["optim.learning_rate"] for r in rows) == [0.001, 0.01]
    for row in rows:  # each row is the best validation record of its own trial, run with its values
        trained = json.loads((tmp_path / row["trial"] / "config.json").read_text())
        assert trained["optim"]["learning_rate"] == row["optim.learning_rate"]
        assert trained["data"]["image_size"] == 32  # and the extra arguments
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


def test_a_trial_stopped_early_is_not_recorded_and_resumes(tmp_path, monkeypatch):
    # The trial's training is a no-op that exits as jaxseg.train does after a SIGTERM save;
    # its workdir says how far it got.
    monkeypatch.setattr(sweep, "_command", lambda *args: [
        sys.executable, "-c", f"raise SystemExit({sweep.STOPPED_EXIT_STATUS})"])
    combos = sweep.trials(sweep.parse_grid(["optim.learning_rate=1e-5"]))
    tdir = tmp_path / sweep.trial_name(combos[0])
    tdir.mkdir()
    (tdir / "config.json").write_text(json.dumps({"train": {"num_steps": 4}}))

    def log(*records):
        with open(tdir / "metrics.jsonl", "a") as f:
            f.writelines(json.dumps(r) + "\n" for r in records)

    log({"step": 2, "kind": "train", "loss": 0.5},
        {"step": 2, "kind": "validation", "val_iou": 0.25})
    with pytest.raises(sweep.SweepError, match="stopped at step 2 of 4"):
        sweep.run("configs/smoke.py", tmp_path, combos, extra=["--config.train.typo=1"])
    assert not (tdir / sweep.RESULT_FILE).exists()
    # Nothing finished or saved yet: a corrected command may take the folder over.

    log({"step": 4, "kind": "train", "loss": 0.25},
        {"step": 4, "kind": "validation", "val_iou": 0.5})
    rows = sweep.run("./configs/smoke.py", tmp_path, combos)
    assert [(r["val_iou"], r["best_step"]) for r in rows] == [(0.5, 4)]
    assert sweep.run("configs/smoke.py", tmp_path, combos) == rows  # the same config file
    assert "| 1e-05 |" in (tmp_path / "results.md").read_text()  # not 0.0000

    # Its finished trials must not be reported as another command's.
    with pytest.raises(sweep.SweepError, match="use a new --workdir"):
        sweep.run("configs/smoke.py", tmp_path, combos, extra=["--config.train.num_steps=8"])


def test_an_interrupted_trial_is_not_resumed_by_another_command(tmp_path, monkeypatch):
    """With no trial finished, a rerun with other overrides rewrote sweep.json: the stopped trial
    resumed from the old command's checkpoint and was ranked as the new command's."""
    monkeypatch.chdir(REPO)
    runs = []

    def fake_train(config, tdir, values, extra):
        # Saves at step 2 and stops (preempted) the first time; resumes and finishes the next.
        runs.append(extra)
        done = 4 if (tdir / "checkpoints" / "2").is_dir() else 2
        (tdir / "checkpoints" / str(done)).mkdir(parents=True)
        (tdir / "config.json").write_text(json.dumps({"train": {"num_steps": 4}}))
        with open(tdir / "metrics.jsonl", "a") as f:
            f.write(json.dumps({"step": done, "kind": "train", "loss": 0.5}) + "\n"
                    + json.dumps({"step": done, "kind": "validation", "val_iou": done / 10}) + "\n")
        return [sys.executable, "-c", f"raise SystemExit({0 if done == 4 else 75})"]

    monkeypatch.setattr(sweep, "_command", fake_train)
    combos = [{"seed": 0}]
    with pytest.raises(sweep.SweepError, match="stopped at step 2 of 4"):
        sweep.run("configs/smoke.py", tmp_path, combos)
    stored = (tmp_path / sweep.SWEEP_FILE).read_text()
    for config, extra in (("configs/smoke.py", ["--config.train.num_steps=8"]),
                          ("configs/default.py", [])):
        with pytest.raises(sweep.SweepError, match=re.escape(
                f"{tmp_path} holds interrupted trials of --config {REPO / 'configs/smoke.py'} "
                f"with no overrides; this command is --config {REPO / config} with "
                f"{' '.join(extra) or 'no overrides'}: use a new --workdir")):
            sweep.run(config, tmp_path, combos, extra=extra)
    assert (tmp_path / sweep.SWEEP_FILE).read_text() == stored and len(runs) == 1
    rows = sweep.run("configs/smoke.py", tmp_path, combos)  # the same command resumes it
    assert runs == [[], []] and [(r["seed"], r["best_step"]) for r in rows] == [(0, 4)]


def test_a_trial_without_a_record_is_reported_not_a_crash(tmp_path, monkeypatch):
    monkeypatch.setattr(sweep, "_command", lambda *args: [sys.executable, "-c", ""])
    combos = sweep.trials(sweep.parse_grid(["optim.learning_rate=1e-5,1e-4"]))
    with pytest.raises(sweep.SweepError, match="left no usable record"):
        sweep.run("configs/smoke.py", tmp_path, combos, parallel=2)
    assert not list(tmp_path.glob(f"*/{sweep.RESULT_FILE}"))


def test_another_grid_joins_the_ranking_of_the_finished_trials(tmp_path):
    """A rerun with another --grid once rewrote results.md/csv with its own trials only."""
    (tmp_path / sweep.SWEEP_FILE).write_text(json.dumps({"config": "configs/smoke.py",
                                                         "extra": []}))

    def finished(values, iou):
        tdir = tmp_path / sweep.trial_name(values)
        tdir.mkdir()
        (tdir / sweep.RESULT_FILE).write_text(json.dumps(
            {"trial": tdir.name, **values, "val_iou": iou, "best_step": 2,
             "final_train_loss": 0.5}))

    finished({"optim.learning_rate": 0.001}, 0.5)
    finished({"optim.learning_rate": 0.01}, 0.7)
    finished({"model.base_features": 16}, 0.6)  # the new grid's trial (already finished here)
    rows = sweep.run("configs/smoke.py", tmp_path, [{"model.base_features": 16}])
    assert [r["val_iou"] for r in rows] == [0.7, 0.6, 0.5]
    header = (tmp_path / "results.csv").read_text().splitlines()[0].split(",")
    assert {"optim.learning_rate", "model.base_features"} <= set(header)
    table = (tmp_path / "results.md").read_text()
    assert len(re.findall(r"^\| \d+ \|", table, re.M)) == 3 and "| - |" in table


def test_the_same_grids_in_another_order_reuse_the_finished_trials(tmp_path, monkeypatch):
    """Folders are named by the fields in --grid's order: the same command with its --grid flags
    swapped named every trial otherwise, trained each finished one again and ranked it twice."""
    started = _record_trials(monkeypatch)
    first = sweep.run("configs/smoke.py", tmp_path, sweep.trials(sweep.parse_grid(["x=1,2", "y=0"])))
    assert len(started) == 2
    swapped = sweep.trials(sweep.parse_grid(["y=0", "x=1,2,3"]))
    rows = sweep.run("configs/smoke.py", tmp_path, swapped)
    assert started[2:] == [{"y": 0, "x": 3}]  # the one trial not run before
    assert [(r["x"], r["y"]) for r in rows] == [(3, 0), (2, 0), (1, 0)]
    assert rows[1:] == first


def test_a_field_given_twice_or_sharing_its_last_name_is_kept_apart():
    with pytest.raises(ValueError, match="optim.learning_rate is given twice"):
        sweep.parse_grid(["optim.learning_rate=1e-3,3e-3", "optim.learning_rate=1e-2"])
    grid = sweep.parse_grid(["train.batch_size=16", "eval.batch_size=16,32", "seed=1"])
    names = [sweep.trial_name(t) for t in sweep.trials(grid)]
    assert names == ["train.batch_size=16_eval.batch_size=16_seed=1",
                     "train.batch_size=16_eval.batch_size=32_seed=1"]


def test_the_same_config_file_named_another_way_is_the_same_sweep(tmp_path, monkeypatch):
    monkeypatch.chdir(REPO)
    monkeypatch.setattr(sweep, "_command", lambda *args: [sys.executable, "-c", ""])
    (tmp_path / sweep.SWEEP_FILE).write_text(json.dumps({"config": "configs/smoke.py",
                                                         "extra": []}))
    done = tmp_path / "learning_rate=0.001"
    done.mkdir()
    (done / sweep.RESULT_FILE).write_text(json.dumps(
        {"trial": done.name, "optim.learning_rate": 0.001, "val_iou": 0.5, "best_step": 2,
         "final_train_loss": 0.5}))
    combos = [{"optim.learning_rate": 0.001}]
    assert len(sweep.run(str(REPO / "configs" / "smoke.py"), tmp_path, combos)) == 1
    with pytest.raises(sweep.SweepError, match="use a new --workdir"):
        sweep.run("configs/default.py", tmp_path, combos)


def test_a_config_file_edited_after_trials_finished_is_refused(tmp_path, monkeypatch):
    """Its finished trials, trained with the file as it was, were skipped and ranked beside the
    trials of the edited file (here 1000 training steps against 20)."""
    monkeypatch.chdir(REPO)
    monkeypatch.delitem(sys.modules, "config_config", raising=False)
    _record_trials(monkeypatch)
    config = tmp_path / "mine.py"
    body = "from configs import smoke\n\ndef get_config():\n    c = smoke.get_config()\n"
    config.write_text(body + "    return c\n")
    sweep.run(str(config), tmp_path / "s", [{"seed": 0}])
    assert len(sweep.run(str(config), tmp_path / "s", [{"seed": 1}])) == 2  # unchanged: joins
    config.write_text(body + "    c.train.num_steps = 1000\n    return c\n")
    with pytest.raises(sweep.SweepError,
                       match=r"it has changed since \(train.num_steps: 20 -> 1000\): use a new"):
        sweep.run(str(config), tmp_path / "s", [{"seed": 2}])
    assert not (tmp_path / "s" / "seed=2").exists()


@pytest.mark.parametrize("sig", ["SIGTERM", "SIGINT"])
def test_a_stop_signal_reaches_the_running_trial_and_starts_no_other(tmp_path, monkeypatch, sig):
    """The sweep once died alone on SIGTERM: its trial trained on unwatched, and a rerun started
    it twice. On Ctrl-C it died on KeyboardInterrupt while its trial was still saving."""
    import signal
    import threading
    import time

    trial = ("import os, pathlib, signal, sys, time\n"
             "here = pathlib.Path(sys.argv[1])\n"
             f"signal.signal(signal.{sig}, lambda *a: ((here / 'got_signal').write_text(''), "
             "time.sleep(1), sys.exit(75)))\n"  # a save takes a while
             "(here / 'ready').write_text(str(os.getpid()))\n"
             "time.sleep(120)\n")
    monkeypatch.setattr(sweep, "_command", lambda config, tdir, values, extra: [
        sys.executable, "-c", trial, str(tdir)])
    combos = sweep.trials(sweep.parse_grid(["optim.learning_rate=1e-3,1e-2"]))
    first = tmp_path / sweep.trial_name(combos[0])

    def terminate_once_ready():
        deadline = time.monotonic() + 60
        while not (first / "ready").exists() and time.monotonic() < deadline:
            time.sleep(0.05)
        time.sleep(0.1)  # the pid is written
        if sig == "SIGINT":  # a terminal's Ctrl-C reaches the trial itself, not through the sweep
            os.kill(int((first / "ready").read_text()), signal.SIGINT)
        os.kill(os.getpid(), getattr(signal, sig))

    before = signal.getsignal(signal.SIGTERM), signal.getsignal(signal.SIGINT)
    threading.Thread(target=terminate_once_ready, daemon=True).start()
    start = time.monotonic()
    with pytest.raises(sweep.SweepError, match="1 trial\\(s\\) not started") as stopped:
        sweep.run("configs/smoke.py", tmp_path, combos)
    assert stopped.value.stopped  # main exits with STOPPED_EXIT_STATUS: a rerun resumes
    assert time.monotonic() - start < 60  # the trial stopped, it did not sleep on
    assert (first / "got_signal").exists()
    assert not (tmp_path / sweep.trial_name(combos[1])).exists()
    # The sweep's handlers are gone again.
    assert (signal.getsignal(signal.SIGTERM), signal.getsignal(signal.SIGINT)) == before


def _record_trials(monkeypatch) -> list[dict]:
    """Makes each trial a finished one-step run whose validation IoU is 0.1 x its number, and
    returns the list of trials' values it appends to as they start."""
    runs = []

    def fake_train(config, tdir, values, extra):
        runs.append(values)
        (tdir / "config.json").write_text(json.dumps({"train": {"num_steps": 1}}))
        (tdir / "metrics.jsonl").write_text(
            json.dumps({"step": 1, "kind": "train", "loss": 0.5}) + "\n"
            + json.dumps({"step": 1, "kind": "validation", "val_iou": 0.1 * len(runs)}) + "\n")
        return [sys.executable, "-c", ""]

    monkeypatch.setattr(sweep, "_command", fake_train)
    return runs


def test_another_grids_trial_of_the_same_short_name_gets_its_own_folder(tmp_path, monkeypatch):
    # train.batch_size=4 from a first --grid, then eval.batch_size=4 from a second: both are
    # "batch_size=4" by short name, and the second was taken for finished.
    runs = _record_trials(monkeypatch)
    for grid in ("train.batch_size=4", "eval.batch_size=4"):
        rows = sweep.run("configs/smoke.py", tmp_path, sweep.trials(sweep.parse_grid([grid])))
    assert runs == [{"train.batch_size": 4}, {"eval.batch_size": 4}]
    assert sorted(r["trial"] for r in rows) == ["batch_size=4", "eval.batch_size=4"]
    # Rerun: both found finished, in their own folders.
    for grid in ("train.batch_size=4", "eval.batch_size=4"):
        sweep.run("configs/smoke.py", tmp_path, sweep.trials(sweep.parse_grid([grid])))
    assert len(runs) == 2


def test_values_a_folder_name_cannot_tell_apart_get_folders_of_their_own(tmp_path, monkeypatch):
    """'a/b' and 'a b' are both folder 'x=a-b': the two trials trained in one folder and one
    result row stood for both. A name over the file system's 255 characters (a random search over
    many fields) ended the sweep in an OSError traceback."""
    runs = _record_trials(monkeypatch)
    long = {f"section{i}.field_number_{i}": 0.001 for i in range(15)}
    combos = sweep.trials(sweep.parse_grid(["x='a/b','a b','a-b'"])) + [long]
    rows = sweep.run("configs/smoke.py", tmp_path, combos, parallel=2)
    assert len(runs) == 4 and sorted(json.dumps(r) for r in runs) == sorted(map(json.dumps, combos))
    for row in rows:  # each row is its own trial's, in a folder of its own
        assert json.loads((tmp_path / row["trial"] / sweep.TRIAL_FILE).read_text()) == {
            k: v for k, v in row.items() if k not in ("trial", "val_iou", "best_step",
                                                      "final_train_loss")}
        assert len(row["trial"]) <= 255
    assert len({r["trial"] for r in rows}) == 4
    assert sweep.run("configs/smoke.py", tmp_path, combos) == rows and len(runs) == 4  # finished


def test_a_value_with_a_pipe_keeps_its_markdown_cell(tmp_path):
    rows = [{"trial": "init_checkpoint=runs-a-b", "train.init_checkpoint": "runs/a|b",
             "val_iou": 0.5, "best_step": 2, "final_train_loss": 0.25}]
    sweep.write_table(tmp_path, rows)
    row = (tmp_path / "results.md").read_text().splitlines()[-1]
    cells = [c.strip() for c in re.split(r"(?<!\\)\|", row)[1:-1]]
    assert cells == ["1", "init_checkpoint=runs-a-b", r"runs/a\|b", "0.5", "2", "0.25"]


def test_trials_of_equal_validation_iou_share_their_rank(tmp_path):
    """Trials that tie (as all of a few-step sweep's may, at IoU 0) were ranked 1, 2, 3 by their
    folder names."""
    ious = [0.5, 0.5, 0.25, 0.0, 0.0]
    rows = [{"trial": f"seed={i}", "seed": i, "val_iou": iou, "best_step": 2,
             "final_train_loss": 0.5} for i, iou in enumerate(ious)]
    sweep.write_table(tmp_path, rows)
    ranks = re.findall(r"^\| (\d+) \| seed=", (tmp_path / "results.md").read_text(), re.M)
    expected = [1 + sum(other > iou for other in ious) for iou in ious]  # 1 + how many beat it
    assert [int(r) for r in ranks] == expected == [1, 1, 3, 4, 4]


def test_a_workdir_that_cannot_be_made_is_one_line(tmp_path, capsys):
    (tmp_path / "file").write_text("")
    with pytest.raises(sweep.SweepError, match="cannot create it"):
        sweep.run("configs/smoke.py", tmp_path / "file", [{"seed": 0}])
    with pytest.raises(SystemExit) as usage:
        sweep.main(["--workdir=", "--grid", "seed=0"])
    assert usage.value.code == 2 and "--workdir: give the sweep's folder" in capsys.readouterr().err


def test_a_sweep_folder_that_cannot_be_written_is_one_line(tmp_path, monkeypatch, capsys):
    """A full disk (or a read-only folder) ended the sweep in OSError's traceback: at its start,
    between trials, and at its end, where it lost the summary of those that failed."""
    import errno

    full, write = set(), sweep.write_text_whole

    def write_unless_full(path, text):
        if path.name in full:
            raise OSError(errno.ENOSPC, "No space left on device")
        write(path, text)

    monkeypatch.setattr(sweep, "write_text_whole", write_unless_full)
    _record_trials(monkeypatch)
    record = sweep._command
    monkeypatch.setattr(sweep, "_command", lambda config, tdir, values, extra: (
        record(config, tdir, values, extra) if values["seed"] == 0
        else [sys.executable, "-c", "import sys; sys.exit('error: boom')"]))
    full.add(sweep.SWEEP_FILE)
    with pytest.raises(sweep.SweepError, match=r"^--workdir .*: cannot write in it \(No space "):
        sweep.run("configs/smoke.py", tmp_path / "s", [{"seed": 0}])
    assert not (tmp_path / "s" / "seed=0").exists()  # refused before any trial
    full = {"results.csv", "results.md"}
    with pytest.raises(sweep.SweepError) as failed:
        sweep.run("configs/smoke.py", tmp_path / "s", [{"seed": 0}, {"seed": 1}])
    assert "seed=1 failed (exit 1: error: boom" in str(failed.value)
    assert "results.md and results.csv not written (No space left on device)" in str(failed.value)
    assert not failed.value.ranked
    assert (tmp_path / "s" / "seed=0" / sweep.RESULT_FILE).exists()
    full = {sweep.TRIAL_FILE}  # between trials: the next cannot start
    with pytest.raises(sweep.SweepError, match=r"unfinished trials: 2 trial\(s\) not started, from "
                       r"seed=1 on \(No space left on device\): run the same command again"):
        sweep.run("configs/smoke.py", tmp_path / "s", [{"seed": 0}, {"seed": 1}, {"seed": 2}])
    assert (tmp_path / "s" / "results.md").exists()  # the finished trial's ranking
    full = set()  # the command line shows that ranking above the failure
    capsys.readouterr()
    with pytest.raises(SystemExit):
        sweep.main(["--config", "configs/smoke.py", "--workdir", str(tmp_path / "s"),
                    "--grid", "seed=0,1"])
    out, err = capsys.readouterr()
    assert out.endswith((tmp_path / "s" / "results.md").read_text() + "\n")
    assert "| seed=0 |" in out and "seed=1 failed (exit 1: error: boom" in err


def test_a_storage_url_workdir_is_refused_not_made_a_local_folder(tmp_path, monkeypatch, capsys):
    """--workdir gs://bucket/s trained every trial in the local folder gs:/bucket/s."""
    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(sweep, "run", lambda *args, **kwargs: pytest.fail("the sweep ran"))
    with pytest.raises(SystemExit) as usage:
        sweep.main(["--config", str(REPO / "configs" / "smoke.py"), "--workdir", "gs://bucket/s",
                    "--grid", "seed=0"])
    assert usage.value.code == 2
    err = capsys.readouterr().err
    assert "--workdir gs://bucket/s: the sweep's folder must be a local one" in err
    assert not list(tmp_path.iterdir())


@pytest.mark.parametrize("args", [
    ["--grid", "data.eval_split=validation,test"],
    ["--grid", "seed=0,1", "--config.data.eval_split=test"],
    ["--grid", "seed=0", "--config.data.train_split", "train+test"]])
def test_a_sweep_on_the_test_split_is_refused_before_any_trial(tmp_path, capsys, args):
    with pytest.raises(SystemExit) as usage:
        sweep.main(["--workdir", str(tmp_path / "sweep"), *args])
    assert usage.value.code == 2
    assert "the test split is kept for the final score" in capsys.readouterr().err
    assert not (tmp_path / "sweep").exists()


def test_a_trial_is_ranked_by_its_best_validation_not_its_last(tmp_path, monkeypatch):
    def fake_train(config, tdir, values, extra):
        (tdir / "config.json").write_text(json.dumps({"train": {"num_steps": 4}}))
        (tdir / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in [
            {"step": 2, "kind": "train", "loss": 0.6}, {"step": 2, "kind": "validation", "val_iou": 0.6},
            {"step": 4, "kind": "train", "loss": 0.5}, {"step": 4, "kind": "validation", "val_iou": 0.4}]))
        return [sys.executable, "-c", ""]

    monkeypatch.setattr(sweep, "_command", fake_train)
    (row,) = sweep.run("configs/smoke.py", tmp_path, sweep.trials(sweep.parse_grid(["x=1"])))
    assert (row["val_iou"], row["best_step"], row["final_train_loss"]) == (0.6, 2, 0.5)


def test_a_finished_trial_of_tuple_values_is_not_run_again(tmp_path, monkeypatch):
    """A trial's values come back from its JSON file with lists for tuples: a rerun of
    optim.step_fractions=(0.5,0.8),... must still find its trials finished."""
    runs = _record_trials(monkeypatch)
    combos = sweep.trials(sweep.parse_grid(["optim.step_fractions=(0.5,0.8),(0.6,0.9)"]))
    first = sweep.run("configs/smoke.py", tmp_path, combos)
    assert len(runs) == 2
    assert sweep.run("configs/smoke.py", tmp_path, combos) == first
    assert len(runs) == 2 and (sorted(p.name for p in tmp_path.iterdir() if p.is_dir())
                               == sorted(map(sweep.trial_name, runs)))


def test_parallel_below_one_is_a_usage_error(tmp_path, monkeypatch, capsys):
    """With --parallel 0 the sweep would wait forever for a free slot once a trial started."""
    monkeypatch.setattr(sweep, "run", lambda *args, **kwargs: pytest.fail("the sweep ran"))
    with pytest.raises(SystemExit) as usage:
        sweep.main(["--workdir", str(tmp_path / "sweep"), "--grid", "seed=0", "--parallel", "0"])
    assert usage.value.code == 2 and "--parallel must be at least 1" in capsys.readouterr().err


@pytest.mark.parametrize("stopped", [True, False])
def test_a_stopped_sweep_exits_as_a_stopped_training_does(tmp_path, monkeypatch, capsys, stopped):
    """A launch script reruns a sweep stopped by a signal (EX_TEMPFAIL) but not a failed one."""
    def run(*args, **kwargs):
        raise sweep.SweepError("unfinished trials: x", stopped=stopped)

    monkeypatch.setattr(sweep, "run", run)
    with pytest.raises(SystemExit) as exited:
        sweep.main(["--workdir", str(tmp_path), "--grid", "seed=0"])
    assert exited.value.code == (sweep.STOPPED_EXIT_STATUS if stopped else 1)
    assert exited.value.code != 0 and "error: unfinished trials: x" in capsys.readouterr().err


@pytest.mark.parametrize("args, error", [
    (["--grid", "optim.learnig_rate=1e-3,3e-3"],
     "--grid optim.learnig_rate: the config has no field 'learnig_rate' (did you mean "
     "'learning_rate'?)"),
    (["--grid", "seed=0,1", "--config.train.num_stpes=4"],
     "--config.train.num_stpes: the config has no field 'num_stpes' (did you mean 'num_steps'?)"),
    (["--grid", "seed=0", "--paralel=2"], "unrecognized arguments: --paralel=2"),
    # random.sample's own words, which blamed the grid: "Sample larger than population or is
    # negative"
    (["--grid", "seed=0,1", "--random", "-1"], "argument --random: must be at least 0, got -1"),
    # Ignored without a word: every trial ran, in the grid's order.
    (["--grid", "seed=0,1", "--seed", "3"], "--seed seeds --random's draw and nothing else"),
    (["--grid", "seed=0,1", "--seed", "3", "--random", "0"],
     "--seed seeds --random's draw and nothing else"),
    (["--grid", "seed=0", "--config.train.num_steps", "4", "stray"],
     "unrecognized arguments: stray"),
    (["--grid", "seed=0", "--config.train.num_steps=four"],
     "flag --config.train.num_steps=four: invalid literal for int()"),
    (["--grid", "data.image_size=32,30"],
     "trial image_size=30: invalid config: data.image_size=30 must be divisible by 2**model.depth"),
    # Validated on the whole split, and decoded by one thread, without a word.
    (["--grid", "eval.max_examples=8,-1"],
     "trial max_examples=-1: invalid config: eval.max_examples=-1 must be >= 0"),
    (["--grid", "data.num_workers=2,0"],
     "trial num_workers=0: invalid config: data.num_workers=0 must be positive"),
    # A tuple field's items are Python literals, so a word stays a string: validation compared
    # it with numbers and the sweep (as training) ended in a TypeError's traceback.
    (["--grid", "optim.step_fractions=(0.5,0.8),abc"],
     "trial step_fractions=abc: invalid config: optim.step_fractions=('abc',) must hold numbers"),
    (["--grid", "seed=0", "--config.model.output_shift=(0.5,'x')"],
     "trial seed=0: invalid config: model.output_shift=(0.5, 'x') must hold numbers"),
    (["--config", "configs/no_such_config.py", "--grid", "seed=0"],
     "--config: [Errno 2] No such file or directory: 'configs/no_such_config.py'")])
def test_a_mistyped_field_option_or_override_is_refused_before_any_trial(
        tmp_path, monkeypatch, capsys, args, error):
    """Each was passed on to every trial, which failed on it ('failed (exit 1, log ...)'), and a
    mistyped sweep option was recorded in sweep.json as an override."""
    monkeypatch.chdir(REPO)
    monkeypatch.setattr(sweep, "run", lambda *args, **kwargs: pytest.fail("the sweep ran"))
    with pytest.raises(SystemExit) as usage:
        sweep.main(["--workdir", str(tmp_path / "sweep"), *args])
    assert usage.value.code == 2
    assert f"error: {error}" in capsys.readouterr().err.splitlines()[-1]
    assert not (tmp_path / "sweep").exists()


@pytest.mark.parametrize("text, message", [
    ("seed = 1\n", "{} defines no get_config(): a config file must define get_config()"),
    ("def get_config(:\n", "{}, line 1: invalid syntax"),
    ("def get_config():\n    pass\n", "{}: get_config() returned None, not a config"),
    ("def get_config():\n    return {'seed': 1}\n",
     "{}: get_config() returned a dict, not an ml_collections ConfigDict"),
])
def test_a_config_file_that_cannot_be_loaded_is_refused_in_one_line(tmp_path, monkeypatch, capsys,
                                                                     text, message):
    """Each ended in a traceback (AttributeError, SyntaxError; KeyError: "Attribute <class
    'NoneType'>.seed does not exist…" for the grid's override; AttributeError: 'dict' object has
    no attribute 'to_dict'), exit status 1."""
    monkeypatch.setattr(sweep, "run", lambda *args, **kwargs: pytest.fail("the sweep ran"))
    # ml_collections loads each config file into this one module, keeping what an earlier load
    # (another test's) defined: a command line loads one.
    monkeypatch.delitem(sys.modules, "config_config", raising=False)
    config = tmp_path / "mine.py"
    config.write_text(text)
    with pytest.raises(SystemExit) as usage:
        sweep.main(["--config", str(config), "--workdir", str(tmp_path / "sweep"), "--grid",
                    "seed=0"])
    assert usage.value.code == 2
    assert ("error: --config: " + message.format(config)
            in capsys.readouterr().err.splitlines()[-1])
    assert not (tmp_path / "sweep").exists()


def test_seed_draws_the_random_trials(tmp_path, monkeypatch):
    monkeypatch.chdir(REPO)
    ran = []
    monkeypatch.setattr(sweep, "run", lambda config, workdir, combos, **k: ran.append(combos) or (
        pathlib.Path(workdir).mkdir() or (pathlib.Path(workdir) / "results.md").write_text("")))
    sweep.main(["--workdir", str(tmp_path / "s"), "--grid", "seed=0,1,2,3", "--random", "2",
                "--seed", "3"])
    assert ran == [sweep.trials({"seed": [0, 1, 2, 3]}, 2, 3)]


def test_a_workdir_with_a_tilde_is_the_home_folders(tmp_path, monkeypatch, capsys):
    """As jaxseg.train reads its trials' --workdir: the sweep's own files went to ./~/s."""
    monkeypatch.chdir(REPO)
    monkeypatch.setenv("HOME", str(tmp_path))
    ran = []
    monkeypatch.setattr(sweep, "run", lambda config, workdir, *a, **k: ran.append(workdir) or (
        pathlib.Path(workdir).mkdir() or (pathlib.Path(workdir) / "results.md").write_text("")))
    sweep.main(["--workdir=~/s", "--grid", "seed=0"])
    assert ran == [str(tmp_path / "s")] and not (REPO / "~").exists()


def test_the_checked_overrides_go_to_every_trial_as_given(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(REPO)
    ran = []

    def run(*args, **kwargs):
        ran.append((args, kwargs))
        (tmp_path / "results.md").write_text("")

    monkeypatch.setattr(sweep, "run", run)
    extra = ["--config.train.num_steps", "4", "--config.seed", "-1"]  # -1: a value, not an option
    with pytest.raises(SystemExit) as usage:
        sweep.main(["--workdir", str(tmp_path), "--grid", "optim.learning_rate=1e-3", *extra])
    assert usage.value.code == 2 and not ran
    assert "invalid config: seed=-1 must be >= 0" in capsys.readouterr().err
    extra[-1] = "1"
    sweep.main(["--config", "configs/smoke.py", "--workdir", str(tmp_path), "--grid",
                "optim.learning_rate=1e-3,3e-3", *extra])
    ((config, _, combos), kwargs), = ran
    assert config == "configs/smoke.py" and kwargs["extra"] == extra and len(combos) == 2


def test_a_failed_trial_is_summed_up_with_its_error(tmp_path, monkeypatch):
    monkeypatch.setattr(sweep, "_command", lambda config, tdir, values, extra: [
        sys.executable, "-c", "import sys\nprint('training...')\n"
        "sys.exit('error: train.batch_size=6 must be a positive multiple of the 4 devices\\n')"])
    with pytest.raises(sweep.SweepError) as failed:
        sweep.run("configs/smoke.py", tmp_path, [{"seed": 0}])
    assert (f"seed=0 failed (exit 1: error: train.batch_size=6 must be a positive multiple of the "
            f"4 devices; log {tmp_path / 'seed=0' / 'train.log'})") in str(failed.value)


def test_a_killed_trial_is_summed_up_as_killed_not_by_its_progress_bar(tmp_path, monkeypatch):
    """A trial killed mid-run (the OOM killer's SIGKILL, as parallel trials may meet) was reported
    as 'failed (exit -9: train:  45%|###  | 9/20 ...)': its log's last line, a progress bar."""
    import signal

    monkeypatch.setattr(sweep, "_command", lambda config, tdir, values, extra: [
        sys.executable, "-c", "import os, signal\nprint('train:  45%|###  | 9/20', flush=True)\n"
        "os.kill(os.getpid(), signal.SIGKILL)"])
    with pytest.raises(sweep.SweepError) as failed:
        sweep.run("configs/smoke.py", tmp_path, [{"seed": 0}])
    assert (f"seed=0 was killed by signal {int(signal.SIGKILL)} "
            f"({signal.strsignal(signal.SIGKILL)}; log {tmp_path / 'seed=0' / 'train.log'})"
            in str(failed.value))
    assert "9/20" not in str(failed.value)


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="prctl(PR_SET_PDEATHSIG)")
def test_a_trial_stops_when_its_sweep_is_killed(tmp_path):
    """SIGKILL to the sweep (which no handler sees) left its trial training on as an orphan, and a
    rerun started a second training in the trial's folder."""
    import signal
    import subprocess
    import time

    trial = ("import os, pathlib, signal, sys, time\n"
             "here = pathlib.Path(sys.argv[1])\n"
             "signal.signal(signal.SIGTERM, lambda *a: ((here / 'got_sigterm').write_text(''), "
             "sys.exit(75)))\n"
             "(here / 'pid').write_text(str(os.getpid()))\n"
             "time.sleep(120)\n")
    sweep_script = ("import sys\n"
                    "from jaxseg import sweep\n"
                    "sweep._command = lambda config, tdir, values, extra: "
                    f"[sys.executable, '-c', {trial!r}, str(tdir)]\n"
                    f"sweep.run('configs/smoke.py', {str(tmp_path)!r}, [{{'seed': 0}}])\n")
    proc = subprocess.Popen([sys.executable, "-c", sweep_script], cwd=REPO)
    pid_file = tmp_path / "seed=0" / "pid"
    pid = None
    try:
        deadline = time.monotonic() + 60
        while not (pid_file.exists() and pid_file.read_text()) and time.monotonic() < deadline:
            time.sleep(0.05)
        pid = int(pid_file.read_text())
        proc.kill()
        proc.wait()
        deadline = time.monotonic() + 20
        while not (tmp_path / "seed=0" / "got_sigterm").exists() and time.monotonic() < deadline:
            time.sleep(0.05)
        assert (tmp_path / "seed=0" / "got_sigterm").exists()

        def running():
            try:  # an orphan that exited may wait as a zombie for an init that never reaps
                return pathlib.Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] != "Z"
            except (OSError, IndexError):
                return False

        while running() and time.monotonic() < deadline:
            time.sleep(0.05)
        assert not running()
    finally:
        if proc.poll() is None:
            proc.kill()
        if pid is not None:
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass


def test_an_unknown_field_is_an_overrides_only_when_an_override_names_it():
    """ml_collections' KeyError names the field; one that no --config./--noconfig. override
    names comes from the config file's own code, and is not blamed on an override."""
    from jaxseg import config_check

    from configs import default

    with pytest.raises(AttributeError) as caught:
        default.get_config().train.num_stpes  # noqa: B018 (the lookup is the point)
    error = caught.value
    assert config_check.unknown_field(error, ["--config.train.num_stpes=4"]) == ("num_stpes",
                                                                                 "num_steps")
    assert config_check.unknown_field(error, ["--noconfig.train.num_stpes"])[0] == "num_stpes"
    assert config_check.unknown_field(KeyError("'oops'"), ["--config.train.num_steps=4"]) is None


def test_a_grid_over_how_validation_is_measured_is_noted(tmp_path, monkeypatch, capsys):
    """Trials validated at other thresholds (or on other examples) rank by unlike IoUs: the sweep
    says so, and still runs; a grid over training fields, or over the eval batch, says nothing."""
    monkeypatch.setattr(sweep, "run", lambda *args, **kwargs: [])
    (tmp_path / "results.md").write_text("")  # what main prints after the run
    for grid, noted in ((["eval.threshold=0.4,0.5", "seed=0,1"], "eval.threshold"),
                        (["data.eval=ccp_person,portrait_segmentation"], "data.eval"),
                        (["data.eval_split=validation,train[:10%]"], "data.eval_split"),
                        (["eval.batch_size=16,32", "optim.learning_rate=1e-3,3e-3"], None)):
        sweep.main(["--workdir", str(tmp_path), *[a for g in grid for a in ("--grid", g)]])
        err = capsys.readouterr().err
        assert (f"note: the grid varies {noted}:" in err) if noted else "note:" not in err, err


def test_every_option_says_what_it_does():
    """--config, --workdir, --seed and --parallel were listed without a word (nor the default)."""
    parser = sweep._parser()
    assert [a.dest for a in parser._actions if a.option_strings and not a.help] == []
