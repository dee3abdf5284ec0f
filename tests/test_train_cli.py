"""Training through its command line on the real data: checkpoints, exact resume, preemption."""
import json
import os
import pathlib
import signal
import subprocess
import sys
import time

import jax
import numpy as np
import pytest

import fixtures_data as fx
from jaxseg import checkpointing, inference

REPO = pathlib.Path(__file__).resolve().parents[1]
STEPS = 12
OVERRIDES = [f"--config.train.num_steps={STEPS}", "--config.train.checkpoint_every=4",
             "--config.train.eval_every=12", "--config.train.log_every=2",
             "--config.eval.max_examples=16", "--config.data.image_size=32",
             "--config.model.depth=2", "--config.train.keep_checkpoints=2"]


def train_command(workdir, *extra):
    return [sys.executable, "-m", "jaxseg.train", "--config", "configs/smoke.py",
            "--workdir", str(workdir), *OVERRIDES, *extra]


def run_env(manual_dir):
    env = dict(os.environ, JAXSEG_MANUAL_DIR=str(manual_dir))
    env.setdefault("TFDS_DATA_DIR", str(pathlib.Path.home() / "tensorflow_datasets"))
    return env


def final_state(workdir):
    model, config, step = inference.load_from_workdir(str(workdir), "latest")
    from flax import nnx
    return jax.device_get(nnx.state(model)), step


def last_train_record(workdir):
    records = [json.loads(l) for l in (workdir / "metrics.jsonl").read_text().splitlines()]
    return [r for r in records if r["kind"] == "train"][-1]


@pytest.fixture(scope="module")
def uninterrupted_run(manual_dir, tmp_path_factory):
    workdir = tmp_path_factory.mktemp("uninterrupted")
    return workdir, subprocess.run(train_command(workdir), cwd=REPO, env=run_env(manual_dir),
                                   check=True, timeout=600, capture_output=True, text=True)


@pytest.fixture(scope="module")
def uninterrupted(uninterrupted_run):
    return uninterrupted_run[0]


def test_run_writes_checkpoints_logs_and_best(uninterrupted_run):
    uninterrupted, finished = uninterrupted_run
    # stdout is the JSON summary alone; the last line of stderr says where the model is.
    assert json.loads(finished.stdout)["step"] == STEPS
    assert finished.stderr.rstrip("\n").splitlines()[-1] == (
        f"done: the best checkpoint by validation IoU is step {STEPS} in {uninterrupted}/best; "
        f"score it with: python -m jaxseg.evaluate --workdir {uninterrupted} --dataset D --split "
        "test (D: portrait_segmentation or ccp_person); logs: "
        f"{uninterrupted}/metrics.jsonl and TensorBoard's {uninterrupted}/tensorboard")
    ckpts = checkpointing.Checkpoints(uninterrupted, read_only=True)
    assert ckpts.latest.all_steps() == [8, 12]  # saved at 4, 8 and 12, keeping two
    assert ckpts.best_step() == STEPS
    meta, _ = ckpts.read_meta("best")
    assert 0.0 <= meta["validation"]["val_iou"] <= 1.0
    assert meta["config"]["train"]["num_steps"] == STEPS
    records = [json.loads(l) for l in (uninterrupted / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in records if r["kind"] == "train"] == list(range(2, STEPS + 1, 2))
    assert any(r["kind"] == "validation" and "val_iou" in r for r in records)
    events = b"".join(f.read_bytes() for f in (uninterrupted / "tensorboard").iterdir())
    assert b"train/loss" in events and b"validation/predictions" in events  # scalars and overlays


def test_sigkill_then_rerun_equals_uninterrupted_run(manual_dir, uninterrupted, tmp_path):
    env = run_env(manual_dir)
    proc = subprocess.Popen(train_command(tmp_path), cwd=REPO, env=env,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.time() + 600
    while not (tmp_path / "checkpoints" / "8").is_dir():  # orbax renames a save when complete
        assert proc.poll() is None and time.time() < deadline, "training ended before step 8"
        time.sleep(0.2)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    steps = checkpointing.Checkpoints(tmp_path, read_only=True).latest.all_steps()
    assert steps and max(steps) < STEPS
    subprocess.run(train_command(tmp_path), cwd=REPO, env=env, check=True, timeout=600,
                   capture_output=True)
    resumed, step = final_state(tmp_path)
    reference, ref_step = final_state(uninterrupted)
    assert step == ref_step == STEPS
    for a, b in zip(jax.tree.leaves(resumed), jax.tree.leaves(reference)):
        np.testing.assert_array_equal(a, b)
    assert last_train_record(tmp_path)["loss"] == last_train_record(uninterrupted)["loss"]


def _training_past_its_first_save(manual_dir, workdir) -> subprocess.Popen:
    """A 400-step training into WORKDIR, once it has saved a checkpoint (stderr piped)."""
    proc = subprocess.Popen(train_command(workdir, "--config.train.num_steps=400"), cwd=REPO,
                            env=run_env(manual_dir), stdout=subprocess.DEVNULL,
                            stderr=subprocess.PIPE, text=True)
    deadline = time.time() + 600
    # Any saved step: with two kept, step 4's folder goes once step 12 is saved.
    while not any(p.name.isdigit() for p in (workdir / "checkpoints").glob("*")):
        assert proc.poll() is None and time.time() < deadline
        time.sleep(0.2)
    return proc


@pytest.mark.parametrize("sig, said", [
    (signal.SIGTERM, ""),
    (signal.SIGINT, "Ctrl-C: saving a checkpoint after this step"),
])
def test_a_stop_signal_saves_and_exits_cleanly(manual_dir, tmp_path, sig, said):
    proc = _training_past_its_first_save(manual_dir, tmp_path)
    proc.send_signal(sig)
    _, err = proc.communicate(timeout=300)
    assert proc.returncode == 75, err[-2000:]  # EX_TEMPFAIL, not 0: so launch scripts stop
    ckpts = checkpointing.Checkpoints(tmp_path, read_only=True)
    meta, step = ckpts.read_meta("latest")
    assert meta.get("preempted") is True and 4 <= step < 400
    assert f"{sig.name}: saved step {step}" in err and "rerun the same command to resume" in err
    assert said in err and "KeyboardInterrupt" not in err
    assert last_train_record(tmp_path)["step"] == step  # the stop step is logged too


def test_a_second_ctrl_c_stops_at_once_in_one_line(manual_dir, tmp_path):
    """A second Ctrl-C ended the run with a KeyboardInterrupt traceback (pressed while the first
    one's checkpoint was saved, with orbax's log of its interrupted wait and its save thread's
    too: test_a_ctrl_c_in_a_wait_for_a_save_logs_no_trace)."""
    proc = _training_past_its_first_save(manual_dir, tmp_path)
    proc.send_signal(signal.SIGINT)
    # Pressed again before the stop step ends (the progress bar's updates are lines too).
    _, err = fx.ctrl_c_once_said(
        proc, lambda line: line.startswith("Ctrl-C: saving a checkpoint after this step"), 300)
    assert err.splitlines()[-1] == ("interrupted: stopped at once; rerun the same command to go "
                                    "on from the latest checkpoint, if one was saved"), err[-2000:]
    # That checkpoint is whole: the run resumes from it.
    meta, step = checkpointing.Checkpoints(tmp_path, read_only=True).read_meta("latest")
    assert meta["step"] == step >= 4
    inference.load_from_workdir(str(tmp_path), "latest")


@pytest.mark.parametrize("override, message", [
    ("--config.train.batch_size=12", "train.batch_size=12 must be a positive multiple of the 8 devices"),
    ("--config.train.nope=1", "the config has no field 'nope'"),
    # 0 kept no checkpoint at all, not even the one a SIGTERM saves
    ("--config.train.keep_checkpoints=0", "train.keep_checkpoints=0 must be positive"),
    # a word in a tuple field stays a string: a TypeError's traceback
    ("--config.optim.step_fractions=abc", "optim.step_fractions=('abc',) must hold numbers"),
])
def test_impossible_config_fails_before_touching_data(tmp_path, override, message):
    result = subprocess.run(
        [sys.executable, "-m", "jaxseg.train", "--config", "configs/smoke.py", "--workdir",
         str(tmp_path), override],
        cwd=REPO, capture_output=True, text=True, timeout=300,
        env=dict(os.environ, JAXSEG_MANUAL_DIR="/nonexistent", TFDS_DATA_DIR=str(tmp_path / "tfds")))
    assert result.returncode != 0
    assert message in result.stderr and "Traceback" not in result.stderr, result.stderr[-2000:]
    assert not (tmp_path / "tfds").exists()


@pytest.mark.parametrize("args, message", [
    # With --config left at its default, ml_collections applies overrides while defining the flag.
    (["--config.train.nope=1"], "the config has no field 'nope'"),
    # absl takes one dash too; and an override below a field that is no section: both were
    # ml_collections' AttributeError / KeyError tracebacks.
    (["-config.train.num_step=5"], "the config has no field 'num_step'; did you mean 'num_steps'?"),
    (["--config", "configs/smoke.py", "--config.train.num_steps.x=5"],
     "the config has no field 'train.num_steps.x'"),
    (["--config", "configs/missing.py"], "error: --config: [Errno 2] No such file or directory"),
    (["--workdir="], "error: --workdir: give the run's folder"),  # not the current folder
])
def test_config_errors_are_one_line(tmp_path, args, message):
    result = subprocess.run(
        [sys.executable, "-m", "jaxseg.train", "--workdir", str(tmp_path / "w"), *args],
        cwd=REPO, capture_output=True, text=True, timeout=300,
        env=dict(os.environ, JAXSEG_MANUAL_DIR="/nonexistent", TFDS_DATA_DIR=str(tmp_path / "tfds")))
    assert result.returncode != 0
    assert message in result.stderr and "Traceback" not in result.stderr, result.stderr[-2000:]
    assert not (tmp_path / "w").exists()


@pytest.mark.parametrize("text, message", [
    ("seed = 1\n", "{} defines no get_config(): a config file must define get_config()"),
    ("def get_config(:\n", "{}, line 1: invalid syntax"),
])
def test_a_config_file_that_cannot_be_loaded_is_one_line(tmp_path, text, message):
    """Both ended in ml_collections' traceback (AttributeError: module 'config_config' has no
    attribute 'get_config'; SyntaxError), as sweep's check of its trials' config did."""
    config = tmp_path / "mine.py"
    config.write_text(text)
    result = subprocess.run(
        [sys.executable, "-m", "jaxseg.train", "--config", str(config), "--workdir",
         str(tmp_path / "w")], cwd=REPO, capture_output=True, text=True, timeout=300,
        env=dict(os.environ, JAXSEG_MANUAL_DIR="/nonexistent", TFDS_DATA_DIR=str(tmp_path / "tfds")))
    assert result.returncode == 1 and "Traceback" not in result.stderr, result.stderr[-2000:]
    line, = result.stderr.strip().splitlines()
    assert line.startswith("error: --config: " + message.format(config))
    assert not (tmp_path / "w").exists()


@pytest.mark.parametrize("returned, message", [
    ("None", "returned None, not a config (does it end in `return config`?)"),
    ("{'seed': 0}", "returned a dict, not an ml_collections ConfigDict (return "
                    "ml_collections.ConfigDict(...))")])
@pytest.mark.parametrize("override", [[], ["--config.seed=3"]])
def test_a_config_file_returning_no_config_is_one_line(tmp_path, returned, message, override):
    """It ended in a traceback: for None, AttributeError: 'NoneType' object has no attribute
    'to_dict', or with an override KeyError: "Attribute <class 'NoneType'>.seed does not exist…"
    (above the line, ml_collections' own warning of it); for a dict, AttributeError: 'dict'
    object has no attribute 'to_dict' (the override, a key of the dict, is taken)."""
    config = tmp_path / "mine.py"
    config.write_text(f"def get_config():\n    return {returned}\n")
    result = subprocess.run(
        [sys.executable, "-m", "jaxseg.train", "--config", str(config), "--workdir",
         str(tmp_path / "w"), *override], cwd=REPO, capture_output=True, text=True, timeout=300,
        env=dict(os.environ, JAXSEG_MANUAL_DIR="/nonexistent", TFDS_DATA_DIR=str(tmp_path / "tfds")))
    assert result.returncode == 1 and "Traceback" not in result.stderr, result.stderr[-2000:]
    assert result.stderr.strip().splitlines()[-1] == (
        f"error: --config: {config}: get_config() {message}")
    assert not (tmp_path / "w").exists()


def test_an_unrecognised_config_error_is_a_traceback(tmp_path):
    """An AttributeError that is not a config file failing to load (here of the to_dict() of what
    get_config() returned) printed 'error: --config: None'."""
    config = tmp_path / "mine.py"
    config.write_text("class Config:\n    def to_dict(self):\n        return self.fields\n\n\n"
                      "def get_config():\n    return Config()\n")
    result = subprocess.run(
        [sys.executable, "-m", "jaxseg.train", "--config", str(config), "--workdir",
         str(tmp_path / "w")], cwd=REPO, capture_output=True, text=True, timeout=300,
        env=dict(os.environ, JAXSEG_MANUAL_DIR="/nonexistent", TFDS_DATA_DIR=str(tmp_path / "tfds")))
    assert result.returncode == 1 and "None" not in result.stderr.strip().splitlines()[-1]
    assert "Traceback" in result.stderr and "has no attribute 'fields'" in result.stderr
    assert not (tmp_path / "w").exists()


def test_a_missing_init_checkpoint_is_refused_before_the_workdir_is_touched(tmp_path):
    """It was found once the workdir, its checkpoints/ and best/ folders and its lock had been
    made, and the data prepared: they stayed behind, empty."""
    workdir = tmp_path / "run"
    command = [sys.executable, "-m", "jaxseg.train", "--config", "configs/smoke.py", "--workdir",
               str(workdir), f"--config.train.init_checkpoint={tmp_path / 'nowhere'}"]
    env = dict(os.environ, JAXSEG_MANUAL_DIR="/nonexistent", TFDS_DATA_DIR=str(tmp_path / "tfds"))
    for exists in (False, True):
        if exists:
            workdir.mkdir()
        result = subprocess.run(command, cwd=REPO, capture_output=True, text=True, timeout=300,
                                env=env)
        assert result.returncode == 1 and "Traceback" not in result.stderr, result.stderr[-2000:]
        assert (f"error: train.init_checkpoint={tmp_path / 'nowhere'}: no checkpoint in "
                f"{tmp_path / 'nowhere' / 'checkpoints'} (name a training workdir)") in result.stderr
        assert (list(workdir.iterdir()) == []) if exists else not workdir.exists()
        assert not (tmp_path / "tfds").exists()


@pytest.mark.parametrize("module, flag", [("train", "--help"), ("train", "--helpfull"),
                                          ("train", "-h"), ("predict", "--help"), ("predict", "-?"),
                                          ("evaluate", "--helpshort"), ("report", "--helpxml")])
def test_asking_for_help_exits_0(module, flag):
    """Help on stdout and exit status 0 (absl's help flags exit 1: a failure to a script), -h as
    in the argparse CLIs; an unknown flag stays a usage error."""
    result = subprocess.run([sys.executable, "-m", f"jaxseg.{module}", flag], cwd=REPO,
                            capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr[-2000:]
    assert "--workdir" in result.stdout and "Traceback" not in result.stderr
    if flag == "--help":
        result = subprocess.run([sys.executable, "-m", f"jaxseg.{module}", "--nosuch"], cwd=REPO,
                                capture_output=True, text=True, timeout=120)
        assert result.returncode == 1 and "Unknown command line flag 'nosuch'" in result.stderr


@pytest.mark.parametrize("module, args, message", [
    ("evaluate", ["--threshold", "1"], "--threshold=1.0 must be between 0 and 1"),
    ("report", ["stray"], "unexpected argument(s) stray: every setting is a --flag"),
])
def test_a_usage_error_is_its_line_alone(module, args, message):
    """absl printed the module's docstring and every flag, about 55 lines, above the message."""
    result = subprocess.run([sys.executable, "-m", f"jaxseg.{module}", *args], cwd=REPO,
                            capture_output=True, text=True, timeout=120)
    assert result.returncode == 1 and not result.stdout
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith(f"error: {message}"), result.stderr[-2000:]


def _train_failing(manual_dir, workdir, method: str, step: int, failure: str):
    """The smoke training (train_command) in a subprocess where METHOD ('module.Class.name' of
    jaxseg, called with the step first) runs the Python line FAILURE (os and errno imported) when
    called for STEP."""
    module, cls, name = method.split(".")
    prelude = (
        f"import errno, os, sys, runpy; from jaxseg import {module} as m; "
        f"original = m.{cls}.{name}\n"
        "def failing(self, step, *a, **k):\n"
        f"    if step == {step}:\n"
        f"        {failure}\n"
        "    return original(self, step, *a, **k)\n"
        f"m.{cls}.{name} = failing; sys.argv = ['jaxseg.train'] + sys.argv[1:]\n"
        "runpy.run_module('jaxseg.train', run_name='__main__', alter_sys=True)")
    return subprocess.run([sys.executable, "-c", prelude, *train_command(workdir)[3:]], cwd=REPO,
                          env=run_env(manual_dir), capture_output=True, text=True, timeout=240)


def test_a_full_disk_outside_a_save_is_one_line(manual_dir, tmp_path):
    """A full disk met by the workdir's small files (metrics.jsonl here, at step 6; its lock and
    config.json alike, as a rerun meets first) ended the run in a traceback."""
    workdir = tmp_path / "run"
    result = _train_failing(manual_dir, workdir, "metric_writer.MetricWriter.scalars", 6,
                            "raise OSError(errno.ENOSPC, 'No space left on device')")
    assert result.returncode == 1, result.stderr[-3000:]
    assert "Traceback" not in result.stderr, result.stderr[-3000:]
    last = result.stderr.strip().splitlines()[-1]
    assert last.startswith(f"error: No space left on device (writing in --workdir {workdir})")
    assert "rerun the same command to resume" in last
    assert final_state(workdir)[1] == 4  # saved before it, and whole


def test_data_that_cannot_be_prepared_is_one_line(tmp_path):
    """A data folder that is a file stands for every data preparation failure (offline without a
    manual dir alike): one line with the cause, no traceback; a stray word is refused first."""
    (tmp_path / "file").write_text("")
    command = [sys.executable, "-m", "jaxseg.train", "--config", "configs/smoke.py", "--workdir",
               str(tmp_path / "run")]
    env = dict(os.environ, JAXSEG_MANUAL_DIR="/nonexistent", TFDS_DATA_DIR=str(tmp_path / "file"))
    result = subprocess.run(command, cwd=REPO, capture_output=True, text=True, timeout=300, env=env)
    assert result.returncode != 0 and "Traceback" not in result.stderr, result.stderr[-2000:]
    assert "error: [Errno 20] Not a directory" in result.stderr, result.stderr[-2000:]
    # absl leaves a word without a flag unread: it would have trained on the default data.
    result = subprocess.run(command + ["validation"], cwd=REPO, capture_output=True, text=True,
                            timeout=300, env=env)
    assert result.returncode != 0 and "unexpected argument(s) validation" in result.stderr
    assert not [p for p in (tmp_path / "run").rglob("*") if not p.is_dir()]  # no config, logs


def test_a_workdir_that_cannot_be_created_is_one_line(tmp_path):
    (tmp_path / "file").write_text("")
    result = subprocess.run(
        [sys.executable, "-m", "jaxseg.train", "--config", "configs/smoke.py", "--workdir",
         str(tmp_path / "file" / "sub")], cwd=REPO, capture_output=True, text=True, timeout=300,
        env=dict(os.environ, JAXSEG_MANUAL_DIR="/nonexistent", TFDS_DATA_DIR=str(tmp_path / "tfds")))
    assert result.returncode != 0
    assert "file/sub: cannot create it (Not a directory)" in result.stderr, result.stderr[-2000:]
    assert "Traceback" not in result.stderr
    (tmp_path / "run").mkdir()
    (tmp_path / "run" / "checkpoints").write_text("")  # where the periodic saves go
    result = subprocess.run(
        [sys.executable, "-m", "jaxseg.train", "--config", "configs/smoke.py", "--workdir",
         str(tmp_path / "run")], cwd=REPO, capture_output=True, text=True, timeout=300,
        env=dict(os.environ, JAXSEG_MANUAL_DIR="/nonexistent", TFDS_DATA_DIR=str(tmp_path / "tfds")))
    assert result.returncode != 0 and "Traceback" not in result.stderr, result.stderr[-2000:]
    assert "run/checkpoints: cannot create it (File exists)" in result.stderr
    assert not (tmp_path / "tfds").exists()  # refused before touching data


# Before the save of step 8, what makes it fail: the checkpoint folder replaced by a file, or
# (as a full disk does) the kernel refusing the writes, here past a file size limit with SIGXFSZ
# ignored, which tensorstore reports as a ValueError, not an OSError.
FOLDER_REPLACED = ("self.wait(); d = str(self.latest.directory); "
                   "os.rename(d, d + '.aside'); open(d, 'w').close()")
WRITES_REFUSED = ("self.wait(); import resource, signal; "
                  "signal.signal(signal.SIGXFSZ, signal.SIG_IGN); "
                  "resource.setrlimit(resource.RLIMIT_FSIZE, (20000, resource.RLIM_INFINITY))")


# The refused writes fail the save of step 8 and the best one of step 12, which is made first.
@pytest.mark.parametrize("failure, folders", [(FOLDER_REPLACED, ["checkpoints"]),
                                              (WRITES_REFUSED, ["checkpoints", "best"])])
def test_a_failed_save_stops_the_run_with_one_line(manual_dir, tmp_path, failure, folders):
    """A save that fails in orbax's background thread ends the run with status 1 and a line
    naming the folder. The run used to print tracebacks and then hang for ever at exit, waiting
    for orbax's threads; a full disk still printed tensorstore's traceback before the line."""
    workdir = tmp_path / "run"
    result = _train_failing(manual_dir, workdir, "checkpointing.Checkpoints.save", 8, failure)
    assert result.returncode == 1, result.stderr[-3000:]
    last = result.stderr.strip().splitlines()[-1]
    assert any(last.startswith(f"error: saving a checkpoint in {workdir / folder} failed: ")
               for folder in folders), last
    assert "rerun the same command to resume" in last
    assert "Traceback" not in result.stderr, result.stderr[-3000:]
    # What was saved before the failure is whole: step 4, restorable.
    if failure == FOLDER_REPLACED:
        os.rename(workdir / "checkpoints", workdir / "failed")
        os.rename(workdir / "checkpoints.aside", workdir / "checkpoints")
    assert final_state(workdir)[1] == 4
