"""Pretrained models on disk: an ensemble round-trips as the mean of its members' logits."""
import json
import os
import pathlib
import shutil

import jax
import numpy as np
import pytest
from flax import nnx

import fixtures_data as fx
from fake_data import tiny_config
from jaxseg import inference
from jaxseg.models import LogitAverage, create_model


def images(n=2, seed=0):
    return np.random.default_rng(seed).integers(0, 256, (n, 32, 32, 3), dtype=np.uint8)


def logits(model, x):
    return np.asarray(model(x, train=False))


def test_ensemble_saved_and_loaded_averages_its_members_logits(tmp_path, monkeypatch):
    config = tiny_config()
    members = [create_model(config.model, seed=s) for s in (1, 2, 3)]
    inference.save_pretrained(members, config, {"steps": [1, 2, 3]}, tmp_path)
    x = images()
    expected = np.mean([logits(m, x) for m in members], axis=0)

    model, _, card = inference.load_pretrained(tmp_path)
    assert isinstance(model, LogitAverage) and card["member_weights"] == ["weights", "weights_1", "weights_2"]
    np.testing.assert_allclose(logits(model, x), expected, rtol=1e-5, atol=1e-5)

    first_two, _, _ = inference.load_pretrained(tmp_path, members=2)
    np.testing.assert_allclose(logits(first_two, x), (logits(members[0], x) + logits(members[1], x)) / 2,
                               rtol=1e-5, atol=1e-5)
    first, _, _ = inference.load_pretrained(tmp_path, members=1)
    assert not isinstance(first, LogitAverage)
    np.testing.assert_array_equal(logits(first, x), logits(members[0], x))
    # Saved again as a single model with the ensemble's card, it names no absent members.
    inference.save_pretrained(first, config, card, tmp_path / "first")
    np.testing.assert_array_equal(logits(inference.load_pretrained(tmp_path / "first")[0], x),
                                  logits(members[0], x))
    with pytest.raises(inference.MembersError, match="has 3"):
        inference.load_pretrained(tmp_path, members=4)
    # As the pretrained model, what --members gives predict, evaluate and export: the model and
    # the steps it records, of the first members only.
    monkeypatch.setattr(inference, "PRETRAINED_DIR", tmp_path)
    for count, steps in ((1, 1), (3, [1, 2, 3]), (0, [1, 2, 3])):  # 3: as many as there are
        model, _, described = inference.load(members=count)
        assert described == {"source": "pretrained", "checkpoint_step": steps}, count
    np.testing.assert_array_equal(logits(inference.load(members=1)[0], x), logits(members[0], x))


def test_a_single_model_is_saved_without_a_member_list(tmp_path):
    config = tiny_config()
    model = create_model(config.model, seed=1)
    # Over an earlier ensemble: its extra members go, a user's own file stays.
    earlier = [create_model(config.model, seed=s) for s in (2, 3)]
    inference.save_pretrained(earlier, config, {"steps": [1, 2]}, tmp_path)
    (tmp_path / "weights_notes.txt").write_text("mine")
    inference.save_pretrained(model, config, {"steps": 0}, tmp_path)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["model_card.json", "weights", "weights_notes.txt"]
    loaded, _, card = inference.load_pretrained(tmp_path)
    assert "member_weights" not in card and not isinstance(loaded, LogitAverage)
    np.testing.assert_array_equal(logits(loaded, images()), logits(model, images()))
    assert inference.weights_digest(loaded) == inference.weights_digest(model)
    with pytest.raises(inference.MembersError, match="has 1"):
        inference.load_pretrained(tmp_path, members=2)


def test_members_apply_to_the_pretrained_model_only():
    with pytest.raises(inference.MembersError, match="workdir holds one model"):
        inference.load("/nonexistent/workdir", members=1)


def test_ensemble_is_inference_only():
    config = tiny_config()
    model = LogitAverage([create_model(config.model, seed=1)])
    with pytest.raises(ValueError, match="inference"):
        model(images(), train=True)
    with pytest.raises(ValueError, match="at least one"):
        LogitAverage([])
    # Flip averaging, thresholding and export see a logit map of the single model's shape.
    assert jax.eval_shape(lambda x: model(x), images()).shape == (2, 32, 32, 1)
    assert nnx.state(model, nnx.Param)  # its members' parameters are its own


def test_flip_averaging_mirrors_the_flipped_prediction_back():
    """Against numpy on a model that sees left and right differently (its logit is the column
    index minus the mean grey level): the mirrored pass must be mirrored back before averaging."""
    class Lopsided(nnx.Module):
        def __call__(self, images, *, train=False):
            del train
            columns = jax.numpy.arange(images.shape[2], dtype=jax.numpy.float32)[None, None, :, None]
            return columns / 8 - images.astype(jax.numpy.float32).mean(-1, keepdims=True) / 64

    x = images()
    def probs(batch):
        return 1 / (1 + np.exp(-logits(Lopsided(), batch)[..., 0]))

    expected = (probs(x) + probs(x[:, :, ::-1])[:, :, ::-1]) / 2
    got = np.asarray(inference.person_probabilities(Lopsided(), x, flip_tta=True))
    np.testing.assert_allclose(got, expected, rtol=1e-5, atol=1e-6)
    assert not np.allclose(got, probs(x), atol=1e-3)


def test_a_workdir_that_is_no_folder_is_named_before_any_checkpoint_is_looked_for(tmp_path):
    """evaluate, predict, export and report say so in one line (evaluate said 'no checkpoint in
    WORKDIR/checkpoints' of a mistyped workdir)."""
    (tmp_path / "file").write_text("")
    for path in (tmp_path / "nowhere", tmp_path / "file"):
        assert inference.checkpoint_problem(str(path), "best") == f"--workdir {path}: no such folder"
    assert inference.checkpoint_problem(str(tmp_path), "latest") is None
    assert "needs --workdir" in inference.checkpoint_problem(None, "latest")


def test_a_workdir_this_user_may_not_read_is_said_so_not_missing(tmp_path, monkeypatch):
    """A workdir in another user's home was 'no such folder'; one that may not be listed or
    entered had 'no checkpoint in WORKDIR/checkpoints'. Monkeypatched: chmod does not stop root."""
    fx.refuse_stat_under(monkeypatch, tmp_path / "theirs")
    theirs = tmp_path / "theirs" / "run"
    assert inference.checkpoint_problem(str(theirs), "best") == (
        f"--workdir {theirs}: cannot reach it (Permission denied)")
    locked = tmp_path / "locked"
    locked.mkdir()
    access = os.access
    monkeypatch.setattr(os, "access", lambda path, mode, **kw: (
        pathlib.Path(path) != locked and access(path, mode, **kw)))
    assert inference.checkpoint_problem(str(locked), "best") == (
        f"--workdir {locked}: cannot read it (Permission denied)")
    assert inference.checkpoint_problem(str(tmp_path), "best") is None


@pytest.mark.parametrize("checkpoint", ["foo", "-1", " 2", "\u00b2", "bset"])
def test_a_checkpoint_that_is_no_checkpoints_name_is_refused_before_any_is_looked_for(
        tmp_path, checkpoint):
    """report went on without its overlays (exit status 0) where the workdir had no such
    checkpoint; a superscript digit passed str.isdigit and ended in int()'s traceback."""
    assert inference.checkpoint_problem(str(tmp_path), checkpoint) == (
        f"--checkpoint {checkpoint}: name 'best', 'latest' or a step number")
    assert inference.checkpoint_problem(str(tmp_path), "12") is None


def test_the_weights_digest_sees_every_weight():
    """Processes compare digests to know they hold one model: changing any single weight array
    (here the last) must change it."""
    model = create_model(tiny_config().model, seed=1)
    before = inference.weights_digest(model)
    state = nnx.state(model)
    leaves, treedef = jax.tree.flatten(state)
    leaves[-1] = leaves[-1] + 1
    nnx.update(model, jax.tree.unflatten(treedef, leaves))
    assert inference.weights_digest(model) != before


def test_stored_configs_keep_their_values_and_get_only_absent_fields():
    """An older card's config lacks fields added since (filled with what those runs had); a
    newer one's values stay as stored (a shifted model must not load unshifted); the caller's
    dict is left as it was."""
    stored = tiny_config().to_dict()
    stored["model"].update(attention_gates=True, output_shift=[0.5, -0.25])
    kept = inference.config_from_json(json.dumps(stored))
    assert kept.model.attention_gates is True and tuple(kept.model.output_shift) == (0.5, -0.25)
    del stored["model"]["attention_gates"], stored["model"]["output_shift"]
    filled = inference.config_from_json(stored)
    assert filled.model.attention_gates is False and tuple(filled.model.output_shift) == (0.0, 0.0)
    assert "attention_gates" not in stored["model"]


def test_saving_and_loading_close_their_checkpointers(tmp_path, monkeypatch):
    """save_pretrained and load_pretrained (every predict, evaluate, export and report of the
    pretrained model) left their orbax checkpointers open, never releasing their metadata stores;
    each is closed now, a load that fails on a missing member too."""
    import orbax.checkpoint as ocp

    made = []

    class Watched(ocp.StandardCheckpointer):
        def __init__(self, *args, **kwargs):
            super().__init__(*args, **kwargs)
            self.closed = False
            made.append(self)

        def close(self):
            self.closed = True
            super().close()

    monkeypatch.setattr(ocp, "StandardCheckpointer", Watched)
    config = tiny_config()
    models = [create_model(config.model, seed=s) for s in (1, 2)]
    inference.save_pretrained(models, config, {"steps": [1, 2]}, tmp_path)
    loaded, _, _ = inference.load_pretrained(tmp_path)
    np.testing.assert_allclose(logits(loaded, images()),
                               np.mean([logits(m, images()) for m in models], axis=0),
                               rtol=1e-5, atol=1e-5)
    shutil.rmtree(tmp_path / "weights_1")
    with pytest.raises(Exception):  # whichever orbax raises: only the closing is looked at here
        inference.load_pretrained(tmp_path)
    assert len(made) == 3 and all(c.closed for c in made)


@pytest.mark.parametrize("damage", ["array files cut short", "member folder lost"])
def test_damaged_pretrained_weights_are_one_line(tmp_path, monkeypatch, damage):
    """Pretrained weights whose files were cut short stopped predict, evaluate, export and bench
    with orbax's traceback (a lost member folder with its bare "not found"); one line names the
    folder and what to do."""
    config = tiny_config()
    inference.save_pretrained([create_model(config.model, seed=s) for s in (1, 2)], config,
                              {"steps": [1, 2]}, tmp_path)
    member = tmp_path / "weights_1"
    if damage == "member folder lost":
        shutil.rmtree(member)
    for data in member.rglob("d/*"):
        data.write_bytes(data.read_bytes()[:data.stat().st_size // 2])
    monkeypatch.setattr(inference, "PRETRAINED_DIR", tmp_path)
    with pytest.raises(SystemExit) as error:
        inference.load_or_exit()
    message = str(error.value.code)
    assert message.startswith(f"error: pretrained weights {member} cannot be read (")
    assert "\n" not in message
    assert message.endswith(f"): the copy is damaged: restore it (git checkout -- {member}), or "
                            "pass --workdir with a trained run"), message
    assert inference.load_or_exit(members=1)[2]["checkpoint_step"] == 1  # the other member
