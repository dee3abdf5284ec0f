"""Checkpoints with and without a weight EMA: what gets loaded, and resuming with another setting."""
import json
import logging
import os
import pathlib
import shutil
import subprocess
import sys

import jax
import numpy as np
import pytest
from flax import nnx

from fake_data import tiny_config
from jaxseg import checkpointing, config_check, inference, train, train_step

REPO = pathlib.Path(__file__).resolve().parents[1]


def ema_config(decay):
    return tiny_config({"train.ema_decay": decay})


def save(workdir, config, nodes, meta_config=None):
    ckpts = checkpointing.Checkpoints(workdir, async_save=False)
    meta = {"config": meta_config or json.loads(config.to_json()), "step": 1}
    ckpts.save(1, nnx.state(nodes), meta, force=True)
    ckpts.close()


def params(model):
    return [np.asarray(x) for x in jax.tree.leaves(nnx.state(model, nnx.Param))]


def test_a_workdir_loads_its_ema_model(tmp_path):
    config = ema_config(0.99)
    graphdef, state = train_step.create_train_state(config)
    nodes = nnx.merge(graphdef, state)
    nnx.update(nodes["ema"], jax.tree.map(lambda x: x + 1.0, nnx.state(nodes["ema"], nnx.Param)))
    save(tmp_path, config, nodes)
    model, _, step = inference.load_from_workdir(str(tmp_path), "latest")
    assert step == 1
    for got, ema, trained in zip(params(model), params(nodes["ema"]), params(nodes["model"])):
        np.testing.assert_array_equal(got, ema)
        assert not np.array_equal(got, trained)


@pytest.mark.parametrize("decay", [0.99, 0.0])
def test_a_workdir_model_is_read_without_the_rest_of_the_train_state(tmp_path, decay):
    """Loading a workdir's model (to evaluate, predict, export) restored the whole train state,
    the optimizer's moments and the model not evaluated included: 3 to 4 times the memory and
    reading time of the weights it scores. Those nodes are not read now: garbled ones (arrays of
    other shapes) load as well, and the model scores as the one saved."""
    from fake_data import fake_source
    from jaxseg import evaluate, sharding

    config = ema_config(decay)
    graphdef, state = train_step.create_train_state(config)
    nodes = shifted(nnx.merge(graphdef, state), 1.0)  # the trained model unlike the EMA one
    evaluated = "ema" if decay else "model"
    garbled = {name: node if name == evaluated else
               jax.tree.map(lambda _: np.zeros(1, np.int8), node)
               for name, node in nnx.state(nodes).items()}
    ckpts = checkpointing.Checkpoints(tmp_path, async_save=False)
    ckpts.save(1, garbled, {"config": json.loads(config.to_json()), "step": 1}, force=True)
    ckpts.close()
    model, _, step = inference.load_from_workdir(str(tmp_path), "latest")
    assert step == 1
    saved = jax.tree.leaves(nnx.state(nodes[evaluated]))
    loaded = jax.tree.leaves(nnx.state(model))
    assert len(loaded) == len(saved)
    for got, want in zip(loaded, saved):
        np.testing.assert_array_equal(got, want)
    evaluator = evaluate.Evaluator(fake_source(3), mesh=sharding.make_mesh(1), image_size=32,
                                   batch_size=4)
    assert evaluator.evaluate_model(model) == evaluator.evaluate_model(nodes[evaluated])
    # The model read is still checked against the checkpoint: one without a layer of it is
    # refused, not loaded with that layer's weights left as shapes.
    del garbled[evaluated]["bottleneck"]
    ckpts = checkpointing.Checkpoints(tmp_path / "other", async_save=False)
    ckpts.save(1, garbled, {"config": json.loads(config.to_json()), "step": 1}, force=True)
    ckpts.close()
    with pytest.raises(ValueError, match="structures do not match"):
        inference.load_from_workdir(str(tmp_path / "other"), "latest")


def shifted(nodes, by: float):
    """NODES with the trained model's parameters moved by BY: a saved state that a freshly
    initialised model of the same seed does not equal."""
    nnx.update(nodes["model"], jax.tree.map(lambda x: x + by, nnx.state(nodes["model"], nnx.Param)))
    return nodes


def save_best(workdir, config, nodes, step: int = 2):
    """NODES saved as WORKDIR's best checkpoint at STEP."""
    ckpts = checkpointing.Checkpoints(workdir, async_save=False)
    ckpts.save_best(step, nnx.state(nodes), {"config": json.loads(config.to_json()), "step": step},
                    0.5)
    ckpts.close()


def test_a_checkpoint_from_before_ema_existed_loads(tmp_path):
    config = ema_config(0.0)
    graphdef, state = train_step.create_train_state(config)
    nodes = shifted(nnx.merge(graphdef, state), 1.0)
    old = json.loads(config.to_json())
    del old["train"]["ema_decay"]  # as written before the field existed
    save(tmp_path, config, nodes, meta_config=old)
    model, loaded_config, _ = inference.load_from_workdir(str(tmp_path), "latest")
    assert "ema_decay" not in loaded_config.train
    for got, trained in zip(params(model), params(nodes["model"])):
        np.testing.assert_array_equal(got, trained)


def test_resuming_with_another_ema_setting_or_model_shape_says_what_to_do(tmp_path):
    config = ema_config(0.0)
    graphdef, state = train_step.create_train_state(config)
    save(tmp_path, config, nnx.merge(graphdef, state))
    ckpts = checkpointing.Checkpoints(tmp_path, read_only=True)
    same_shape = ema_config(0.0)
    same_shape.model.dropout = 0.3  # not a shape: resumes
    train._check_resumable(same_shape, ckpts)
    with pytest.raises(config_check.ConfigError, match="written with train.ema_decay=0.0"):
        train._check_resumable(ema_config(0.999), ckpts)
    wider = ema_config(0.0)
    wider.model.base_features *= 2
    with pytest.raises(config_check.ConfigError,
                       match=f"model.base_features={config.model.base_features} "
                             f"\\(this config: {wider.model.base_features}\\)"):
        train._check_resumable(wider, ckpts)
    ckpts.close()
    # Another decay with EMA still on keeps the same train state: it resumes.
    averaged = ema_config(0.99)
    graphdef, state = train_step.create_train_state(averaged)
    save(tmp_path / "ema", averaged, nnx.merge(graphdef, state))
    ckpts = checkpointing.Checkpoints(tmp_path / "ema", read_only=True)
    train._check_resumable(ema_config(0.999), ckpts)
    with pytest.raises(config_check.ConfigError, match="written with train.ema_decay=0.99"):
        train._check_resumable(ema_config(0.0), ckpts)
    ckpts.close()


def test_a_checkpoint_name_that_is_not_a_step_says_what_to_name(tmp_path):
    ckpts = checkpointing.Checkpoints(tmp_path, read_only=True)
    with pytest.raises(FileNotFoundError, match="name 'best', 'latest' or a step number"):
        ckpts.resolve("garbage")
    ckpts.close()


def small_state(value: float):
    """A train-state stand-in: any pytree of arrays saves and restores the same way."""
    return {"w": jax.numpy.full((3,), value), "b": jax.numpy.full((2, 2), -value)}


def restored_value(ckpts, which):
    from jaxseg import sharding

    abstract = checkpointing.abstract_like(small_state(0.0), sharding.replicated(sharding.make_mesh(1)))
    state, meta, step = ckpts.restore(which, abstract)
    assert meta["step"] == step
    return float(state["w"][0]), step


def test_best_of_a_run_that_never_validated_is_its_latest(tmp_path):
    """evaluate and predict default to --checkpoint best: a run stopped before its first
    validation is still evaluated, on its latest checkpoint."""
    ckpts = checkpointing.Checkpoints(tmp_path, async_save=False)
    for step in (2, 4):
        ckpts.save(step, small_state(step), {"step": step}, force=True)
    assert ckpts.best_step() is None
    assert restored_value(ckpts, "best") == (4.0, 4)
    assert ckpts.read_meta("best") == ({"step": 4}, 4)
    ckpts.close()


def test_a_step_number_finds_a_checkpoint_of_either_series(tmp_path):
    """The best series keeps its step after the periodic series has dropped it."""
    ckpts = checkpointing.Checkpoints(tmp_path, keep=2, async_save=False)
    ckpts.save_best(2, small_state(20.0), {"step": 2}, val_iou=0.5)
    for step in (2, 4, 6):
        ckpts.save(step, small_state(step), {"step": step}, force=True)
    assert ckpts.latest.all_steps() == [4, 6]  # keep=2
    assert restored_value(ckpts, 2) == (20.0, 2)
    assert restored_value(ckpts, "4") == (4.0, 4)
    assert restored_value(ckpts, "latest") == (6.0, 6)
    assert restored_value(ckpts, "best") == (20.0, 2)
    with pytest.raises(FileNotFoundError, match=r"no checkpoint at step 3; available: periodic "
                                                r"\[4, 6\], best \[2\]"):
        ckpts.resolve("3")
    ckpts.close()


def test_init_checkpoint_must_exist_and_fit_the_model(tmp_path):
    """It starts from the run's best checkpoint (not its latest, nor a fresh model)."""
    config = ema_config(0.0)
    graphdef, state = train_step.create_train_state(config)
    latest = shifted(nnx.merge(graphdef, state), 1.0)
    save(tmp_path / "old", config, latest)
    best = shifted(nnx.merge(graphdef, state), 2.0)
    save_best(tmp_path / "old", config, best)
    same = ema_config(0.0)
    same.train.init_checkpoint = str(tmp_path / "old")
    model, step = train._init_model(same)
    assert step == 2
    for got, saved in zip(params(model), params(best["model"])):
        np.testing.assert_array_equal(got, saved)
    wider = ema_config(0.0)
    wider.model.base_features *= 2  # loaded into this model, the old arrays failed in the step
    wider.train.init_checkpoint = str(tmp_path / "old")
    with pytest.raises(config_check.ConfigError, match="can only start a model of the same shape"):
        train._init_model(wider)
    missing = ema_config(0.0)
    missing.train.init_checkpoint = str(tmp_path / "nowhere")
    with pytest.raises(config_check.ConfigError, match="train.init_checkpoint=.*nowhere: no checkpoint"):
        train._init_model(missing)


def test_init_checkpoint_starts_the_model_and_its_ema_at_step_0(tmp_path):
    """A new EMA run started from another run's checkpoint: both its trained model and its
    average begin as that checkpoint's evaluated model (not the average at random weights),
    and the step count begins at 0."""
    from jaxseg import sharding

    config = ema_config(0.0)
    graphdef, state = train_step.create_train_state(config)
    best = shifted(nnx.merge(graphdef, state), 2.0)
    save_best(tmp_path / "old", config, best)
    new = ema_config(0.9)
    new.train.init_checkpoint = str(tmp_path / "old")
    graphdef, state = train_step.create_train_state(new)
    ckpts = checkpointing.Checkpoints(tmp_path / "new", async_save=False)
    restored, step, _ = train._initial_state(new, ckpts, graphdef, state, sharding.make_mesh(1),
                                          train._init_model(new))
    ckpts.close()
    assert step == 0
    nodes = nnx.merge(graphdef, restored)
    for name in ("model", "ema"):
        for got, saved in zip(params(nodes[name]), params(best["model"])):
            np.testing.assert_array_equal(got, saved, err_msg=name)


def test_a_run_resumes_from_its_latest_checkpoint_not_its_best(tmp_path):
    from jaxseg import sharding

    config = ema_config(0.0)
    graphdef, state = train_step.create_train_state(config)
    best = shifted(nnx.merge(graphdef, state), 2.0)
    latest = shifted(nnx.merge(graphdef, state), 1.0)
    meta = {"config": json.loads(config.to_json())}
    ckpts = checkpointing.Checkpoints(tmp_path, async_save=False)
    ckpts.save_best(4, nnx.state(best), dict(meta, step=4), 0.9)
    ckpts.save(8, nnx.state(latest), dict(meta, step=8), force=True)
    restored, step, _ = train._initial_state(config, ckpts, graphdef, state, sharding.make_mesh(1))
    ckpts.close()
    assert step == 8
    for got, saved in zip(params(nnx.merge(graphdef, restored)["model"]), params(latest["model"])):
        np.testing.assert_array_equal(got, saved)


@pytest.mark.parametrize("damage", ["an empty step folder", "array files deleted",
                                    "merged array files deleted", "merged array files garbled",
                                    "metadata garbled", "tree metadata deleted"])
def test_an_unreadable_latest_checkpoint_is_one_line_naming_it(tmp_path, damage):
    """A latest checkpoint that cannot be read (a folder made by hand, files lost) stops the resume
    and the loading commands with one line naming its folder and the step to fall back to; it
    was a KeyError, a bare Exception, tensorstore's ValueError (NOT_FOUND) or a JSONDecodeError,
    with tracebacks of hundreds of lines (and without the tree's _METADATA, jax's structure error,
    which a resume called a changed optimiser)."""
    from jaxseg import sharding

    config = ema_config(0.0)
    graphdef, state = train_step.create_train_state(config)
    save(tmp_path, config, nnx.merge(graphdef, state))  # step 1, whole
    folder = tmp_path / "checkpoints" / "5"
    if damage == "an empty step folder":
        folder.mkdir()
    else:
        shutil.copytree(tmp_path / "checkpoints" / "1", folder)
        if damage == "metadata garbled":
            (folder / "meta" / "metadata").write_text("{")
        # A finished save merges each process's data files into state/d/ (the form that
        # evaluation and prediction meet); a save cut short has only the per-process ones.
        pattern = {"array files deleted": "ocdbt.process_*/d/*",
                   "merged array files deleted": "d/*", "merged array files garbled": "d/*",
                   "tree metadata deleted": "_METADATA"}.get(damage)
        for data in (folder / "state").glob(pattern) if pattern else ():
            if damage.endswith("garbled"):
                data.write_bytes(bytes(len(data.read_bytes())))  # its size, zeros: DATA_LOSS
            else:
                data.unlink()
    message = f"checkpoint {folder} cannot be read .*move it out of .* to use step 1 instead"
    ckpts = checkpointing.Checkpoints(tmp_path, async_save=False)
    with pytest.raises(config_check.ConfigError, match="cannot resume: " + message):
        train._initial_state(config, ckpts, graphdef, state, sharding.make_mesh(1))
    ckpts.close()
    with pytest.raises(FileNotFoundError, match=message):
        inference.load_from_workdir(str(tmp_path), "latest")
    # Asked for by number, it is not in the way of another: the line names the step to ask for.
    with pytest.raises(FileNotFoundError, match=f"checkpoint {folder} cannot be read .*; name "
                       "step 1 instead$"):
        inference.load_from_workdir(str(tmp_path), "5")
    shutil.rmtree(folder)
    assert inference.load_from_workdir(str(tmp_path), "latest")[2] == 1


def test_an_unreadable_only_checkpoint_says_what_moving_it_out_does(tmp_path):
    """Its line ended "move it out of WORKDIR/checkpoints to use none there"."""
    from jaxseg import sharding

    config = ema_config(0.0)
    graphdef, state = train_step.create_train_state(config)
    save(tmp_path, config, nnx.merge(graphdef, state))
    for data in (tmp_path / "checkpoints" / "1" / "state").glob("d/*"):
        data.unlink()
    only = f"it is the only checkpoint in {tmp_path / 'checkpoints'}"
    ckpts = checkpointing.Checkpoints(tmp_path, async_save=False)
    with pytest.raises(config_check.ConfigError) as error:
        train._initial_state(config, ckpts, graphdef, state, sharding.make_mesh(1))
    ckpts.close()
    assert str(error.value).endswith(f"; {only}: move it out of there to start afresh (from "
                                     "train.init_checkpoint if set, else from scratch)")
    with pytest.raises(FileNotFoundError) as error:
        inference.load_from_workdir(str(tmp_path), "latest")
    assert str(error.value).endswith(f"; {only}")


@pytest.mark.parametrize("damage", ["truncated", "deleted"])
def test_an_unreadable_sole_best_checkpoint_says_what_to_load_instead(tmp_path, damage):
    """evaluate, predict, export and bench on a workdir whose only best/ checkpoint lost or cut
    short its array files said only "it is the only checkpoint in WORKDIR/best"; the line goes on
    to name the --checkpoint to use instead (the latest periodic one), or to train again where
    the workdir holds no other."""
    config = ema_config(0.0)
    graphdef, state = train_step.create_train_state(config)
    save(tmp_path, config, nnx.merge(graphdef, state))  # periodic step 1
    save_best(tmp_path, config, nnx.merge(graphdef, state), step=2)
    folder = tmp_path / "best" / "2"
    for data in (folder / "state").glob("d/*"):
        if damage == "truncated":
            data.write_bytes(data.read_bytes()[:data.stat().st_size // 2])
        else:
            data.unlink()
    with pytest.raises(SystemExit) as error:
        inference.load_or_exit(str(tmp_path), "best")
    message = str(error.value.code)
    assert message.startswith(f"error: checkpoint {folder} cannot be read (")
    assert "\n" not in message
    assert message.endswith(
        f"; it is the only checkpoint in {tmp_path / 'best'}: use --checkpoint latest (step 1, in "
        f"{tmp_path / 'checkpoints'}) instead, or train again"), message
    assert inference.load_or_exit(str(tmp_path), "latest")[2] == {"source": str(tmp_path),
                                                                   "checkpoint_step": 1}
    shutil.rmtree(tmp_path / "checkpoints")
    with pytest.raises(SystemExit) as error:
        inference.load_or_exit(str(tmp_path), "2")
    assert str(error.value.code).endswith(
        f"; it is the only checkpoint in {tmp_path / 'best'}: train again (the workdir holds no "
        "other checkpoint)")


def test_a_garbled_best_metrics_file_is_one_line_naming_its_checkpoint(tmp_path):
    """Orbax reads best/'s metrics on opening the workdir: one cut short stopped evaluate, predict,
    export and training (from that workdir or with it as train.init_checkpoint) with json's
    traceback. One line names the checkpoint and says to move it out, which lets them go on."""
    config = ema_config(0.0)
    graphdef, state = train_step.create_train_state(config)
    save(tmp_path, config, nnx.merge(graphdef, state))  # periodic step 1
    save_best(tmp_path, config, nnx.merge(graphdef, state), step=2)
    metrics = tmp_path / "best" / "2" / "metrics" / "metrics"
    metrics.write_text(metrics.read_text()[:3])
    line = (f"checkpoint {tmp_path / 'best' / '2'} cannot be read (its metrics file is not JSON): "
            f"it is incomplete or not written by jaxseg; move it out of {tmp_path / 'best'}")
    with pytest.raises(SystemExit) as error:
        inference.load_or_exit(str(tmp_path), "latest")
    assert str(error.value.code) == f"error: {line}"
    result = subprocess.run(
        [sys.executable, "-m", "jaxseg.train", "--config", "configs/smoke.py", "--workdir",
         str(tmp_path / "new"), f"--config.train.init_checkpoint={tmp_path}"],
        cwd=REPO, capture_output=True, text=True, timeout=300,
        env=dict(os.environ, JAXSEG_MANUAL_DIR="/nonexistent", TFDS_DATA_DIR=str(tmp_path / "t")))
    assert result.returncode == 1 and "Traceback" not in result.stderr, result.stderr[-2000:]
    assert result.stderr.strip().splitlines()[-1] == f"error: {line}"
    shutil.move(tmp_path / "best" / "2", tmp_path / "moved")
    assert inference.load_or_exit(str(tmp_path), "best")[2]["checkpoint_step"] == 1


def test_an_unreadable_checkpoint_leaves_no_tracebacks_behind_its_line(tmp_path):
    """A restore that failed on a garbled file left orbax's other reads running, and each printed
    'RuntimeError: Event loop is closed' with a traceback after the one-line error (a hundred
    for the default model; training's at exit), as evaluate, predict and export load too."""
    config = ema_config(0.0)
    graphdef, state = train_step.create_train_state(config)
    save(tmp_path, config, nnx.merge(graphdef, state))
    for data in (tmp_path / "checkpoints" / "1" / "state").glob("d/*"):
        data.write_bytes(bytes(len(data.read_bytes())))  # its size, zeros: DATA_LOSS
    for _ in range(3):  # how many reads are still running at the failure varies, 0 at times
        result = subprocess.run(
            [sys.executable, "-m", "jaxseg.export", "--workdir", str(tmp_path), "--checkpoint",
             "latest", "--output", str(tmp_path / "export")],
            cwd=REPO, capture_output=True, text=True, timeout=300)
        assert result.returncode == 1
        assert f"checkpoint {tmp_path / 'checkpoints' / '1'} cannot be read" in result.stderr
        assert "Traceback" not in result.stderr and "Event loop is closed" not in result.stderr, (
            result.stderr[-2000:])


@pytest.mark.parametrize("process", [0, 1])
def test_best_in_a_workdir_that_never_validated_is_the_latest_and_says_so(tmp_path, caplog,
                                                                           monkeypatch, process):
    """evaluate's default --checkpoint best took the latest checkpoint without a word, and named
    its results best_*; one warning now says which step it is, from the first process only (each
    host of a multi-host evaluation said it)."""
    config = ema_config(0.0)
    graphdef, state = train_step.create_train_state(config)
    save(tmp_path, config, nnx.merge(graphdef, state))  # step 1, periodic only
    monkeypatch.setattr(checkpointing.jax, "process_index", lambda: process)
    with caplog.at_level(logging.WARNING):
        assert inference.load_from_workdir(str(tmp_path), "best")[2] == 1
    notes = [r.getMessage() for r in caplog.records if "no best checkpoint" in r.getMessage()]
    assert notes == [f"no best checkpoint in {tmp_path / 'best'}: using the latest, step 1"][:1 - process]


def test_best_is_read_from_the_best_series_where_the_latest_holds_its_step_too(tmp_path):
    """'best' was resolved to its step, and the step read from whichever series held it, the
    periodic one first: a workdir whose periodic checkpoints were started again (checkpoints/
    moved away to retrain) loaded the new run's step instead of the best, under the best's step."""
    config = ema_config(0.0)
    graphdef, state = train_step.create_train_state(config)
    best = shifted(nnx.merge(graphdef, state), 2.0)
    save_best(tmp_path, config, best, step=1)
    save(tmp_path, config, shifted(nnx.merge(*train_step.create_train_state(config)), 1.0))
    model, _, step = inference.load_from_workdir(str(tmp_path), "best")
    assert step == 1
    for got, saved in zip(params(model), params(best["model"])):
        np.testing.assert_array_equal(got, saved)


def test_a_storage_error_while_reading_is_not_called_a_broken_checkpoint(tmp_path, monkeypatch):
    """A permission or storage error says nothing against the checkpoint: it passes as it is,
    not as 'move it away'."""
    import orbax.checkpoint as ocp

    config = ema_config(0.0)
    graphdef, state = train_step.create_train_state(config)
    save(tmp_path, config, nnx.merge(graphdef, state))

    def denied(self, *args, **kwargs):
        raise PermissionError(13, "Permission denied")

    monkeypatch.setattr(ocp.CheckpointManager, "restore", denied)
    ckpts = checkpointing.Checkpoints(tmp_path, read_only=True)
    with pytest.raises(PermissionError):
        ckpts.read_meta("latest")
    ckpts.close()


def test_a_failed_wait_still_waits_for_the_other_series(tmp_path, monkeypatch):
    """The periodic series' failed save does not leave the best series' save unwaited (the
    process then ends at once, which would cut it short); the first error is raised."""
    ckpts = checkpointing.Checkpoints(tmp_path, async_save=False)
    waited = []

    def fails():
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(ckpts.latest, "wait_until_finished", fails)
    monkeypatch.setattr(ckpts.best, "wait_until_finished", lambda: waited.append("best"))
    with pytest.raises(checkpointing.SaveError, match="checkpoints failed: OSError: .*No space"):
        ckpts.wait()
    assert waited == ["best"]
    monkeypatch.undo()
    ckpts.close()


def test_a_ctrl_c_in_a_wait_for_a_save_logs_no_trace():
    """A second Ctrl-C while training waited for a save (the first one's) was logged by orbax,
    traceback and all, above the trainer's line 'interrupted'. Orbax's other traces stay."""
    import orbax.checkpoint as ocp

    absl_log = logging.getLogger("absl")  # orbax logs through absl

    def orbax_trace(error):  # as orbax's CheckpointManager logs a wait that failed
        try:
            raise error
        except BaseException:
            exc_info = sys.exc_info()
        return absl_log.makeRecord(
            "absl", logging.ERROR, str(pathlib.Path(ocp.__file__).parent / "checkpoint_manager.py"),
            2107, "Save Finalize thread (save_finalize) failed.", (), exc_info,
            "wait_until_finished")

    assert not absl_log.filter(orbax_trace(KeyboardInterrupt()))
    assert absl_log.filter(orbax_trace(RuntimeError("perhaps a bug")))


def test_revalidating_a_step_the_best_series_holds_keeps_it(tmp_path):
    """A run killed after validating step N but before saving it periodically validates N again
    on resume; orbax refused the second best save of N, so the workdir could never resume."""
    config = ema_config(0.0)
    graphdef, state = train_step.create_train_state(config)
    ckpts = checkpointing.Checkpoints(tmp_path, async_save=False)
    ckpts.save_best(15, state, {"step": 15}, 0.5)
    ckpts.save_best(15, state, {"step": 15}, 0.5)
    ckpts.save_best(20, state, {"step": 20}, 0.4)  # lower IoU: not kept
    assert ckpts.best.all_steps() == [15] and ckpts.best_step() == 15
    ckpts.close()


def test_resuming_drops_log_records_of_steps_after_the_checkpoint(tmp_path):
    from jaxseg import metric_writer

    lines = [{"step": s, "kind": k} for s, k in ((5, "train"), (10, "train"), (10, "validation"),
                                                 (15, "train"), (15, "validation"))]
    (tmp_path / metric_writer.METRICS_FILE).write_text(
        "".join(json.dumps(r) + "\n" for r in lines))
    with (tmp_path / metric_writer.METRICS_FILE).open("a") as log:
        log.write('{"step": 20, "ki')  # cut short by a hard kill
    writer = metric_writer.MetricWriter(tmp_path, resume_step=10)
    writer.scalars(15, {"loss": 1.0})
    writer.close()
    records = metric_writer.read_metrics(tmp_path)
    assert [(r["step"], r["kind"]) for r in records] == [
        (5, "train"), (10, "train"), (10, "validation"), (15, "train")]
    assert records[-1]["loss"] == 1.0
    # TensorBoard purges events of a step at or after a session start's step: the resumed
    # writer's start is at 11, so the repeated step 15 shows once.
    assert session_starts(tmp_path / "tensorboard") == [11]


def test_a_last_record_without_its_newline_is_kept_apart_from_the_next(tmp_path):
    from jaxseg import metric_writer

    (tmp_path / metric_writer.METRICS_FILE).write_text('{"step": 5, "kind": "train"}\n'
                                                       '{"step": 10, "kind": "train"}')
    writer = metric_writer.MetricWriter(tmp_path, resume_step=10)
    writer.scalars(15, {"loss": 1.0})
    writer.close()
    assert [r["step"] for r in metric_writer.read_metrics(tmp_path)] == [5, 10, 15]


def test_a_run_started_again_before_its_first_checkpoint_hides_the_killed_run_logs(tmp_path):
    """Killed before any checkpoint, a run starts again from step 0: its logs of steps 5 and 10
    go from the JSONL file, and TensorBoard's session start at step 1 hides them there."""
    from jaxseg import metric_writer

    first = metric_writer.MetricWriter(tmp_path)
    first.scalars(5, {"loss": 2.0})
    first.scalars(10, {"loss": 1.5})
    first.close()
    again = metric_writer.MetricWriter(tmp_path, resume_step=0)
    again.scalars(5, {"loss": 1.9})
    again.close()
    assert [(r["step"], r["loss"]) for r in metric_writer.read_metrics(tmp_path)] == [(5, 1.9)]
    assert set(session_starts(tmp_path / "tensorboard")) == {1}


def tensorboard_events(folder):
    """The events of a TensorBoard folder's event files (TFRecords), in order."""
    import struct

    from tensorboardX.proto import event_pb2

    for path in sorted(folder.iterdir()):
        data, at = path.read_bytes(), 0
        while at < len(data):
            (length,) = struct.unpack("<Q", data[at:at + 8])
            yield event_pb2.Event.FromString(data[at + 12:at + 12 + length])
            at += 12 + length + 4  # length, its crc, the record, its crc


def session_starts(folder):
    """Steps of the session-start events in a TensorBoard folder's event files."""
    return [event.step for event in tensorboard_events(folder)
            if event.HasField("session_log") and event.session_log.status == event.session_log.START]


def test_each_kind_of_record_keeps_its_kind_in_the_log_and_in_tensorboard(tmp_path):
    """The sweep ranks trials by the log's validation records, and TensorBoard shows train and
    validation values of one name as two curves."""
    from jaxseg import metric_writer

    writer = metric_writer.MetricWriter(tmp_path)
    writer.scalars(5, {"loss": 0.5})
    writer.scalars(5, {"loss": 0.7, "val_iou": 0.25}, kind="validation")
    writer.close()
    assert [(r["kind"], r["loss"]) for r in metric_writer.read_metrics(tmp_path)] == [
        ("train", 0.5), ("validation", 0.7)]
    scalars = {(value.tag, event.step, round(value.simple_value, 6))
               for event in tensorboard_events(tmp_path / "tensorboard")
               if event.HasField("summary") for value in event.summary.value}
    assert scalars == {("train/loss", 5, 0.5), ("validation/loss", 5, 0.7),
                       ("validation/val_iou", 5, 0.25)}


def test_a_disabled_writer_writes_nothing_and_leaves_the_log_alone(tmp_path):
    """Processes other than 0 get a disabled writer: one that trimmed the shared log on resume,
    or wrote to it, would race process 0's own writer."""
    from jaxseg import metric_writer

    text = "".join(json.dumps({"step": s, "kind": "train"}) + "\n" for s in (5, 10, 15))
    (tmp_path / metric_writer.METRICS_FILE).write_text(text + '{"step": 20, "ki')
    writer = metric_writer.MetricWriter(tmp_path, enabled=False, resume_step=5)
    writer.scalars(15, {"loss": 1.0})
    writer.images(15, "validation/predictions", np.zeros((1, 4, 4, 3), np.uint8))
    writer.close()
    assert (tmp_path / metric_writer.METRICS_FILE).read_text() == text + '{"step": 20, "ki'
    assert not (tmp_path / "tensorboard").exists()


def test_resuming_on_a_changed_person_folder_warns(caplog, tmp_path):
    """A folder changed since the checkpoint is rebuilt, and the resumed run trained and
    validated on other examples without a word (data.folder, its path, is the same)."""
    import fixtures_data as fx

    config = ema_config(0.0)
    config.data.train, config.data.eval, config.data.eval_split = "person_folder", "person_folder", "train"
    config.data.folder = str(fx.make_simple_folder(tmp_path / "mine", ["a", "b"]))
    meta = train._meta(config, 5, train._folder_data(config))
    with caplog.at_level("WARNING", logger="jaxseg.train"):
        train._warn_about_resume_changes(config, meta)
    assert not caplog.records
    fx.make_simple_folder(tmp_path / "mine", ["c"])
    with caplog.at_level("WARNING", logger="jaxseg.train"):
        train._warn_about_resume_changes(config, meta)
    assert f"written with {meta['person_folder']}: {config.data.folder} is another folder, or " \
           "files were added" in caplog.text and "best/ compares" in caplog.text, caplog.text


def test_resuming_with_another_seed_mixture_or_length_warns(caplog):
    config = ema_config(0.0)
    meta = {"config": json.loads(config.to_json()), "seed": config.seed,
            "data_train": config.data.train, "global_batch": config.train.batch_size}
    with caplog.at_level("WARNING", logger="jaxseg.train"):
        train._warn_about_resume_changes(config, meta)
        # What a checkpoint records of its run says nothing changed when resumed as written.
        train._warn_about_resume_changes(config, train._meta(config, 5, {"preempted": True}))
    assert not caplog.records
    changed = ema_config(0.0)
    changed.seed += 1
    changed.data.train = "ccp_person"
    changed.train.num_steps *= 2
    with caplog.at_level("WARNING", logger="jaxseg.train"):
        train._warn_about_resume_changes(changed, meta)
    text = caplog.text
    assert f"seed={changed.seed}" in text and "data.train='ccp_person'" in text
    assert f"train.num_steps={changed.train.num_steps}" in text and "schedule" in text
    # Other fields of the data, the loss and the optimiser are named in one warning, with a
    # word on best/ where the validation set changed; where data is read from is not a change.
    caplog.clear()
    other = ema_config(0.0)
    other.optim.learning_rate *= 3
    other.data.eval = "ccp_person"
    other.data.num_workers += 1
    del meta["config"]["loss"]["boundary_weight"]  # a field the stored config predates
    other.loss.boundary_weight = 2.0
    with caplog.at_level("WARNING", logger="jaxseg.train"):
        train._warn_about_resume_changes(other, meta)
    text = caplog.text
    assert f"optim.learning_rate={other.optim.learning_rate!r} (written with {config.optim.learning_rate!r})" in text
    assert "data.eval='ccp_person'" in text and "best/ compares validation IoU" in text
    assert "num_workers" not in text and "boundary_weight" not in text
    # A validation measured otherwise (threshold, flip averaging) also makes best/ compare unlike
    # scores; a validation batch size does not.
    for field, value in (("threshold", 0.4), ("flip_tta", True), ("batch_size", 64)):
        caplog.clear()
        scored = ema_config(0.0)
        scored.eval[field] = value
        with caplog.at_level("WARNING", logger="jaxseg.train"):
            train._warn_about_resume_changes(scored, meta)
        warned = f"eval.{field}={value!r}" in caplog.text and "best/ compares" in caplog.text
        assert warned == (field != "batch_size"), (field, caplog.text)
    # Model fields that keep the parameters' shapes, and another EMA decay, train otherwise too.
    caplog.clear()
    modelled = ema_config(0.0)
    modelled.model.dropout, modelled.model.compute_dtype = 0.3, "bfloat16"
    modelled.train.ema_decay = 0.99
    with caplog.at_level("WARNING", logger="jaxseg.train"):
        train._warn_about_resume_changes(modelled, meta)
    for change in ("model.dropout=0.3", "model.compute_dtype='bfloat16'", "train.ema_decay=0.99"):
        assert change in caplog.text, (change, caplog.text)


def test_resume_changes_are_said_by_the_first_process_only(caplog, monkeypatch):
    """Every process of a run reads the same checkpoint: its warnings came once per process (16
    copies in one SLURM output), where the run's other messages come from process 0 alone."""
    config = ema_config(0.0)
    meta = train._meta(config, 5)
    changed = ema_config(0.0)
    changed.seed += 1
    said = []
    for index in (0, 1):
        monkeypatch.setattr(jax, "process_index", lambda: index)
        caplog.clear()
        with caplog.at_level("WARNING", logger="jaxseg.train"):
            train._warn_about_resume_changes(changed, meta)
        said.append(f"seed={changed.seed}" in caplog.text)
    assert said == [True, False]


def test_resuming_with_another_optimiser_structure_names_the_optim_change(tmp_path):
    """A resume whose optimiser state lost a part (gradient clipping turned off) was refused with
    300 characters of orbax's diff of the two trees; one line names the changed optim field, the
    values to resume with and the workdir to start a new run from."""
    from jaxseg import sharding

    config = tiny_config({"optim.grad_clip_norm": 1.0})
    graphdef, state = train_step.create_train_state(config)
    save(tmp_path, config, nnx.merge(graphdef, state))
    unclipped = tiny_config({"optim.grad_clip_norm": 0.0, "optim.learning_rate": 0.5})
    graphdef, state = train_step.create_train_state(unclipped)
    ckpts = checkpointing.Checkpoints(tmp_path, async_save=False)
    with pytest.raises(config_check.ConfigError) as error:
        train._initial_state(unclipped, ckpts, graphdef, state, sharding.make_mesh(1))
    ckpts.close()
    message = str(error.value)
    assert "\n" not in message and "Source" not in message, message
    assert (f"by optim.grad_clip_norm=0.0 (written with 1.0), optim.learning_rate=0.5 (written "
            f"with {config.optim.learning_rate!r}): resume with the old values, or use a new "
            f"workdir with --config.train.init_checkpoint={tmp_path} to start from its weights "
            "only") in message, message


def test_a_checkpoint_from_before_attention_gates_resumes_only_without_them(tmp_path):
    config = ema_config(0.0)
    graphdef, state = train_step.create_train_state(config)
    old = json.loads(config.to_json())
    del old["model"]["attention_gates"]  # as written before the option existed
    save(tmp_path, config, nnx.merge(graphdef, state), meta_config=old)
    ckpts = checkpointing.Checkpoints(tmp_path, read_only=True)
    train._check_resumable(ema_config(0.0), ckpts)
    gated = ema_config(0.0)
    gated.model.attention_gates = True
    with pytest.raises(config_check.ConfigError,
                       match="model.attention_gates=False \\(this config: True\\)"):
        train._check_resumable(gated, ckpts)
    ckpts.close()


def test_the_two_checkpoint_series_name_their_barriers_apart(tmp_path):
    """Orbax keys a save's cross-process barriers by step: the periodic and best series saving
    the last step at once met in one barrier, and a two-process run failed at its end."""
    ckpts = checkpointing.Checkpoints(tmp_path)
    prefixes = {m._options.multiprocessing_options.barrier_sync_key_prefix
                for m in (ckpts.latest, ckpts.best)}
    ckpts.close()
    assert prefixes == {checkpointing.LATEST_DIR, checkpointing.BEST_DIR}


def test_reading_checkpoints_logs_no_notes_about_not_saving(tmp_path, caplog):
    """Orbax's per-manager warnings that a read-only manager will not save (3-6 lines before
    every evaluation's output or one-line error) are dropped; its other warnings are not."""
    import logging

    with caplog.at_level("WARNING"):
        checkpointing.Checkpoints(tmp_path, read_only=True).close()
        logging.getLogger("absl").warning("another orbax warning")
    assert [r.getMessage() for r in caplog.records] == ["another orbax warning"]
