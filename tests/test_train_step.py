"""The data-parallel train step: 8 devices give the single-device result; bad values stop early."""
import collections

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from fake_data import fake_source, tiny_config
from jaxseg import config_check, input_pipeline, losses, preprocess, sharding, train_step


def run_steps(config, num_devices, num_steps=3):
    mesh = sharding.make_mesh(num_devices)
    graphdef, state = train_step.create_train_state(config)
    state = sharding.replicate(state, mesh)
    step = train_step.make_train_step(graphdef, config, mesh)
    tb = input_pipeline.TrainBatches([fake_source(12, 0), fake_source(9, 1)], [1, 1],
                                     global_batch=config.train.batch_size,
                                     image_size=config.data.image_size, aug=config.data.aug,
                                     seed=config.seed)
    losses = []
    for _ in range(num_steps):
        state, metrics = step(state, sharding.to_global(next(tb), mesh))
        losses.append(float(metrics["loss"]))
    tb.close()
    return jax.device_get(state), losses


@pytest.mark.parametrize("copy_paste, lovasz_weight", [(0.0, 0.0), (0.5, 0.0), (0.0, 1.0)])
def test_eight_devices_equal_one_device(copy_paste, lovasz_weight):
    config = tiny_config()
    config.data.aug.copy_paste = copy_paste  # the paste mixes examples across device shards
    config.loss.lovasz_weight = lovasz_weight  # sorts each example's pixels on its own device
    one, loss_one = run_steps(config, 1)
    eight, loss_eight = run_steps(config, 8)
    # Same math, different float32 summation order (cross-device all-reduce of gradients and of
    # BatchNorm statistics): after 3 Adam steps of lr <= 3e-3 the differences stay at rounding
    # level, far below the size of a single update (~1e-3).
    np.testing.assert_allclose(loss_eight, loss_one, rtol=1e-5)
    if copy_paste or lovasz_weight:  # and it took effect: without it the losses differ
        config.data.aug.copy_paste, config.loss.lovasz_weight = 0.0, 0.0
        assert not np.allclose(run_steps(config, 1)[1], loss_one, rtol=1e-3)
    for a, b in zip(jax.tree.leaves(one), jax.tree.leaves(eight)):
        np.testing.assert_allclose(np.asarray(a, np.float64), np.asarray(b, np.float64),
                                   rtol=1e-4, atol=2e-5)
    # Not equal by doing nothing: the steps moved the weights (BatchNorm statistics, kept in the
    # same state, are compared above, so per-device statistics would have failed there).
    initial = jax.tree.leaves(train_step.create_train_state(config)[1])
    assert not all(np.allclose(x, y) for x, y in zip(jax.tree.leaves(one), initial))


def one_device_step(config):
    """(mesh, graphdef, state, the train step, batches of 8 of 12 fake examples) on one device."""
    mesh = sharding.make_mesh(1)
    graphdef, state = train_step.create_train_state(config)
    tb = input_pipeline.TrainBatches([fake_source(12, 0)], [1], global_batch=8,
                                     image_size=config.data.image_size, aug=config.data.aug,
                                     seed=config.seed)
    return mesh, graphdef, state, train_step.make_train_step(graphdef, config, mesh), tb


def test_each_steps_dropout_and_the_boundary_weight_take_effect():
    """One batch twice with the learning rate at 0, so the weights stay: the losses differ only
    by the dropout mask, drawn anew each step, or by the copy-paste, drawn anew each step too
    (without either they are equal); loss.boundary_weight changes the loss."""
    def two_losses(boundary_weight, dropout=0.1, copy_paste=0.0):
        config = tiny_config()
        config.optim.learning_rate, config.optim.warmup_steps = 0.0, 0
        config.loss.boundary_weight = boundary_weight
        config.model.dropout, config.data.aug.copy_paste = dropout, copy_paste
        mesh, _, state, step, tb = one_device_step(config)
        batch = sharding.to_global(next(tb), mesh)
        tb.close()
        found = []
        for _ in range(2):
            state, metrics = step(state, batch)
            found.append(float(metrics["loss"]))
        return found

    plain = two_losses(0.0)
    assert plain[0] != plain[1]
    still = two_losses(0.0, dropout=0.0)
    assert still[0] == pytest.approx(still[1], rel=1e-6)
    pasted = two_losses(0.0, dropout=0.0, copy_paste=0.5)
    assert pasted[0] != pytest.approx(pasted[1], rel=1e-4)
    assert two_losses(3.0)[0] != pytest.approx(plain[0], rel=1e-3)


def test_the_step_reports_the_configured_loss_of_the_models_logits_and_the_rate_it_used():
    """The loss is losses.segmentation_loss with every loss field of the config (the boundary
    radius too), of the model's training logits on the batch as given: data.aug.enabled=False
    turns copy-paste off with the rest of the augmentation. The learning rate logged is the
    schedule at the step's own count (0 at the first step of a warmup)."""
    from jaxseg import optim

    config = tiny_config()
    config.model.dropout = 0.0
    config.data.aug.enabled, config.data.aug.copy_paste = False, 1.0
    config.loss.update(ce_weight=0.5, dice_weight=2.0, boundary_weight=3.0, boundary_radius=1,
                       lovasz_weight=0.25)
    config.optim.warmup_steps = 4
    mesh, graphdef, state, step, tb = one_device_step(config)
    schedule = optim.make_schedule(config.optim, config.train.num_steps)
    for t in range(2):
        batch = next(tb)
        model = nnx.merge(graphdef, jax.tree.map(jnp.array, jax.device_get(state)))["model"]
        logits = model(jnp.asarray(batch["image"]), train=True)
        expected, _ = losses.segmentation_loss(
            logits, batch["mask"], batch["valid"], ce_weight=0.5, dice_weight=2.0,
            boundary_weight=3.0, boundary_radius=1, lovasz_weight=0.25)
        state, metrics = step(state, sharding.to_global(batch, mesh))
        np.testing.assert_allclose(float(metrics["loss"]), float(expected), rtol=1e-5)
        np.testing.assert_allclose(float(metrics["learning_rate"]), float(schedule(t)), rtol=1e-6)
    tb.close()


@pytest.mark.parametrize("where", ["loss", "gradient only"])
def test_non_finite_step_leaves_state_unchanged(monkeypatch, where):
    config = tiny_config()
    mesh = sharding.make_mesh(2)
    graphdef, state = train_step.create_train_state(config)
    state = sharding.replicate(state, mesh)
    before = jax.device_get(state)
    valid = np.full(8, np.nan if where == "loss" else 1.0, np.float32)
    if where == "gradient only":
        loss = losses.segmentation_loss

        def nan_gradient(logits, *args, **kwargs):  # adds 0 * sqrt(0): a value of 0, a NaN slope
            total, parts = loss(logits, *args, **kwargs)
            return total + 0.0 * jnp.sqrt(logits.sum() - logits.sum()), parts

        monkeypatch.setattr(losses, "segmentation_loss", nan_gradient)
    step = train_step.make_train_step(graphdef, config, mesh)
    batch = {"image": np.zeros((8, 32, 32, 3), np.uint8), "mask": np.zeros((8, 32, 32, 1), np.uint8),
             "valid": valid}
    state, metrics = step(state, sharding.to_global(batch, mesh))
    assert not bool(metrics["finite"])
    assert np.isfinite(float(metrics["loss"])) == (where == "gradient only")
    for a, b in zip(jax.tree.leaves(before), jax.tree.leaves(jax.device_get(state))):
        np.testing.assert_array_equal(a, b)


@pytest.mark.parametrize("field,value,message", [
    ("train.batch_size", 12, "multiple of the 8 devices"),
    ("train.batch_size", 0, "train.batch_size=0 must be a positive multiple"),  # 0 % 8 is 0
    ("data.image_size", 102, "divisible by 2\\*\\*model.depth"),
    ("data.image_size", 0, "data.image_size=0 must be positive"),  # 0 is divisible by anything
    ("model.norm", "layer", "model.norm"),
    ("data.train", "nosuchset:1", "unknown dataset"),
    ("data.train", "person_folder", "person_folder needs --config.data.folder=PATH"),
    ("loss.boundary_weight", -1.0, "loss.boundary_weight=-1.0 must be >= 0"),
    ("loss.boundary_radius", 0, "loss.boundary_radius=0 must be >= 1"),
    ("loss.lovasz_weight", -1.0, "loss.lovasz_weight=-1.0 must be >= 0"),
    ("data.aug.copy_paste", 1.5, "data.aug.copy_paste=1.5 must be in \\[0, 1\\]"),
    ("data.aug.scale_min", 2.0, "scale_min=2.0, scale_max=1.25: the zoom range needs 0 < "),
    ("data.aug.scale_min", 0.0, "scale_min=0.0, scale_max=1.25: the zoom range needs 0 < "),
    ("data.aug.rotate_degrees", -5.0, "data.aug.rotate_degrees=-5.0 must be >= 0"),
    ("data.aug.max_shift", -0.1, "data.aug.max_shift=-0.1 must be >= 0"),
    ("data.aug.scale_max", float("inf"), "scale_max=inf: the zoom range needs 0 < "),
    ("data.aug.rotate_degrees", float("nan"), "data.aug.rotate_degrees=nan must be >= 0 and fin"),
    ("data.aug.max_shift", float("inf"), "data.aug.max_shift=inf must be >= 0 and finite"),
    ("data.aug.brightness", 3.0, "data.aug.brightness=3.0 must be in \\[0, 1\\)"),
    ("data.aug.contrast", -0.1, "data.aug.contrast=-0.1 must be in \\[0, 1\\)"),
    ("data.aug.saturation", 1.0, "data.aug.saturation=1.0 must be in \\[0, 1\\)"),
    ("seed", -1, "seed=-1 must be >= 0"),
    ("data.prefetch", -1, "data.prefetch=-1 must be >= 0"),
    ("train.num_logged_images", -1, "train.num_logged_images=-1 must be >= 0"),
    ("model.depth", 0, "model.depth=0 must be >= 1"),
    ("optim.grad_clip_norm", -1.0, "optim.grad_clip_norm=-1.0 must be >= 0 and finite \\(0 = off"),
    # nan passed every `< 0` and `<= 0` check: a nan learning rate wrote NaN weights at step 1.
    ("optim.learning_rate", float("nan"), "optim.learning_rate=nan must be positive and finite"),
    ("optim.learning_rate", float("inf"), "optim.learning_rate=inf must be positive and finite"),
    ("optim.weight_decay", float("nan"), "optim.weight_decay=nan must be >= 0 and finite"),
    ("loss.dice_weight", float("inf"), "loss.dice_weight=inf must be >= 0 and finite"),
    ("loss.lovasz_weight", float("nan"), "loss.lovasz_weight=nan must be >= 0 and finite"),
    ("optim.grad_clip_norm", float("nan"), "optim.grad_clip_norm=nan must be >= 0 and finite"),
    ("optim.warmup_steps", -5, "optim.warmup_steps=-5 must be >= 0"),
    ("optim.weight_decay", -1e-4, "optim.weight_decay=-0.0001 must be >= 0"),
    ("loss.dice_weight", -1.0, "loss.dice_weight=-1.0 must be >= 0"),
    ("optim.b2", 1.0, "optim.b2=1.0 must be in \\[0, 1\\)"),
    ("model.output_shift", (0.5,), "model.output_shift=\\(0.5,\\) must be \\(dy, dx\\)"),
    ("model.output_shift", (40.0, 0.0), "model.output_shift=\\(40.0, 0.0\\) must be"),
    ("data.eval_split", "test", "data.eval_split='test': the test split is kept for the final"),
    ("data.train_split", "test[:50%]", "data.train_split='test\\[:50%\\]': the test split is kept"),
    ("data.eval_split", "val", "data.eval_split='val' is not a split"),
    ("data.eval_split", "validation+test", "data.eval_split='validation\\+test': the test split"),
    ("optim.step_decay", -0.1, "optim.step_decay=-0.1 must be >= 0"),
    ("optim.step_decay", float("nan"), "optim.step_decay=nan must be >= 0 and finite"),
    ("optim.step_decay", float("inf"), "optim.step_decay=inf must be >= 0 and finite"),
    ("optim.step_fractions", (0.5, 1.5), "optim.step_fractions=\\(0.5, 1.5\\): each must be in"),
    ("eval.batch_size", 12, "eval.batch_size=12 must be a positive multiple of the 8 devices"),
    ("eval.threshold", 1.0, "eval.threshold=1.0 must be in \\(0, 1\\)"),
    ("eval.threshold", 0.0, "eval.threshold=0.0 must be in \\(0, 1\\)"),
    ("model.dropout", 1.0, "model.dropout=1.0 must be in \\[0, 1\\)"),
    ("train.ema_decay", 1.0, "train.ema_decay=1.0 must be in \\[0, 1\\)"),
    ("optim.final_lr_fraction", -0.1, "optim.final_lr_fraction=-0.1 must be >= 0"),
    ("optim.b1", -0.1, "optim.b1=-0.1 must be in \\[0, 1\\)"),
])
def test_impossible_config_fails_before_any_work(field, value, message):
    config = tiny_config()
    *sections, name = field.split(".")
    node = config
    for section in sections:
        node = node[section]
    node[name] = value
    with pytest.raises(config_check.ConfigError, match=message):
        config_check.validate(config, num_devices=8)


@pytest.mark.parametrize("weights,trains", [
    ((0.0, 0.0, 0.0), False), ((0.0, 0.0, 1.0), True), ((0.0, 0.5, 0.0), True),
    ((2.0, 0.0, 0.0), True)])
def test_a_loss_with_every_term_weighted_0_is_refused(weights, trains):
    """ce, dice and lovasz all 0 (boundary_weight only scales ce): the loss is a constant 0,
    nothing is learnt, and the run used to go on regardless."""
    config = tiny_config()
    config.loss.ce_weight, config.loss.dice_weight, config.loss.lovasz_weight = weights
    config.loss.boundary_weight = 3.0
    rng = np.random.default_rng(0)
    logits = jnp.asarray(rng.normal(size=(2, 8, 8, 1)), jnp.float32)
    masks = jnp.asarray(rng.integers(0, 2, size=(2, 8, 8, 1)), jnp.float32)
    loss, _ = losses.segmentation_loss(logits, masks, jnp.ones(2, bool), **{
        k: config.loss[k] for k in ("ce_weight", "dice_weight", "lovasz_weight",
                                    "boundary_weight", "boundary_radius")})
    assert (float(loss) != 0.0) == trains  # the premise, from the loss itself
    if trains:
        config_check.validate(config, num_devices=8)
    else:
        with pytest.raises(config_check.ConfigError, match="loss.ce_weight, loss.dice_weight and "
                           "loss.lovasz_weight are all 0"):
            config_check.validate(config, num_devices=8)


def test_tfds_slices_and_sums_of_train_and_validation_are_splits():
    config = tiny_config()
    config.data.train_split, config.data.eval_split = "train[:90%]+validation", "train[90%:]"
    config_check.validate(config, num_devices=8)
    config.data.train_split = "train[:90%] + validation"  # TFDS reads it with the spaces too
    config_check.validate(config, num_devices=8)


def test_the_edges_of_each_allowed_range_are_accepted():
    """Each bound the errors call inclusive holds: no zoom (scale_min = scale_max), copy-paste on
    every example, Adam's b1 and b2 of 0, a decay at the very end (fraction 1), one row for each
    dataset of the mixture."""
    config = tiny_config()
    config.data.aug.update(scale_min=1.0, scale_max=1.0, copy_paste=1.0)
    config.optim.update(b1=0.0, b2=0.0, step_fractions=(1.0,))
    config.data.train, config.train.batch_size = "portrait_segmentation:1,ccp_person:1", 2
    config_check.validate(config, num_devices=2)


def test_a_batch_smaller_than_the_mixture_is_refused():
    config = tiny_config()
    config.data.train, config.train.batch_size = "portrait_segmentation:1,ccp_person:1", 1
    with pytest.raises(config_check.ConfigError,
                       match="train.batch_size=1 is smaller than the 2 datasets of data.train"):
        config_check.validate(config, num_devices=1)


@pytest.mark.parametrize("base_features,ok", [(1, True), (4, True), (8, True), (16, True),
                                              (6, False), (12, False), (20, False)])
def test_group_norm_widths_must_split_into_its_groups(base_features, ok):
    """Checked against the model itself: every width that validates builds, and the others do not."""
    config = tiny_config()
    config.model.norm, config.model.base_features = "group", base_features
    if ok:
        config_check.validate(config, num_devices=8)
        train_step.create_train_state(config)
        return
    with pytest.raises(config_check.ConfigError, match="model.norm='group' splits each width"):
        config_check.validate(config, num_devices=8)
    with pytest.raises(ValueError):
        train_step.create_train_state(config)


@pytest.mark.parametrize("num_devices", [0, -1])
def test_a_mesh_of_no_devices_is_refused(num_devices):
    """A negative count once sliced devices off the end of the list (-1: all but one)."""
    with pytest.raises(ValueError, match=f"asked for {num_devices} devices: ask for at least 1"):
        sharding.make_mesh(num_devices)


def test_a_mesh_of_fewer_devices_takes_an_equal_share_of_each_process():
    """Device ids run process by process: the first N of them once left later processes
    without devices, so on 2 hosts x 4 only all 8 worked."""
    Device = collections.namedtuple("Device", "id process_index")
    devices = [Device(i, i // 4) for i in (7, 6, 5, 4, 3, 2, 1, 0)]
    chosen = sharding.choose_devices(devices, 4, process_count=2)
    assert [(d.process_index, d.id) for d in chosen] == [(0, 0), (0, 1), (1, 4), (1, 5)]
    assert len(sharding.choose_devices(devices, None, process_count=2)) == 8
    with pytest.raises(ValueError, match="ask for a multiple of 2"):
        sharding.choose_devices(devices, 3, process_count=2)
    uneven = devices[:6]  # process 1 holds 4, process 0 only 2
    with pytest.raises(ValueError, match="all 6 devices, 3 from each of 2 processes, but they hold 2, 4"):
        sharding.choose_devices(uneven, None, process_count=2)
    with pytest.raises(ValueError, match="3 devices, 1 from each of 3 processes, but they hold 4, 4"):
        sharding.choose_devices(devices, 3, process_count=3)  # process 2 holds none


@pytest.mark.parametrize("num_devices", [1, 2, 8])
def test_one_process_owns_every_row_of_the_batch(num_devices):
    """With one process, its slice of the global batch is the whole batch (the input pipeline
    decodes those rows), and a flag it raises is seen as raised."""
    mesh = sharding.make_mesh(num_devices)
    rows = range(16)[sharding.local_batch_slice(16, mesh)]
    assert list(rows) == list(range(16)) and sharding.local_batch_size(16, mesh) == 16
    assert bool(sharding.any_process_flag(True, mesh))
    assert not bool(sharding.any_process_flag(False, mesh))


def test_a_person_folder_without_the_asked_split_is_refused(tmp_path):
    (tmp_path / "images").mkdir()  # the single-split layout: 'train' only
    (tmp_path / "masks").mkdir()
    config = tiny_config()
    config.data.train = config.data.eval = "person_folder"
    config.data.folder = str(tmp_path)
    with pytest.raises(config_check.ConfigError, match="data.eval_split='validation'.*only \\['train'\\]"):
        config_check.validate(config, num_devices=8)
    config.data.eval_split = "train"
    config_check.validate(config, num_devices=8)


def test_a_person_folder_trained_on_needs_its_train_split_and_one_only_scored_does_not(tmp_path):
    (tmp_path / "validation" / "images").mkdir(parents=True)
    (tmp_path / "validation" / "masks").mkdir()
    config = tiny_config()
    config.data.train = config.data.eval = "person_folder"
    config.data.folder = str(tmp_path)
    with pytest.raises(config_check.ConfigError,
                       match="data.train_split='train'.*only \\['validation'\\]"):
        config_check.validate(config, num_devices=8)
    config.data.train = "portrait_segmentation"  # the folder only validates
    config_check.validate(config, num_devices=8)


def test_unknown_field_is_rejected():
    config = tiny_config()
    with pytest.raises(AttributeError):
        config.train.nosuchfield = 1  # the config is locked: a typo is an error


def test_ema_follows_the_trained_weights_by_its_formula():
    config = tiny_config()
    config.train.ema_decay = 0.9
    mesh = sharding.make_mesh(1)
    graphdef, state = train_step.create_train_state(config)
    state = sharding.replicate(state, mesh)
    step = train_step.make_train_step(graphdef, config, mesh)
    tb = input_pipeline.TrainBatches([fake_source(12, 0)], [1], global_batch=config.train.batch_size,
                                     image_size=config.data.image_size, aug=config.data.aug, seed=0)
    pick = lambda s, name: [np.asarray(x, np.float64) for x in jax.tree.leaves(jax.device_get(s[name]))]
    reference = pick(state, "model")
    assert all(np.array_equal(a, b) for a, b in zip(reference, pick(state, "ema")))
    for i in range(4):
        state, _ = step(state, sharding.to_global(next(tb), mesh))
        d = min(0.9, (1 + i) / (10 + i))  # the step counter before the update is i
        reference = [d * r + (1 - d) * m for r, m in zip(reference, pick(state, "model"))]
    tb.close()
    ema = pick(state, "ema")
    for r, e in zip(reference, ema):
        np.testing.assert_allclose(e, r, rtol=1e-5, atol=1e-6)
    # The average lags the trained weights: after 4 steps they differ.
    assert any(not np.allclose(e, m) for e, m in zip(ema, pick(state, "model")))
    nodes = nnx.merge(graphdef, state)
    assert train_step.inference_model(nodes) is nodes["ema"]


def test_no_ema_state_without_decay():
    _, state = train_step.create_train_state(tiny_config())
    assert set(state.keys()) == {"model", "opt"}


def test_validation_predicts_as_the_eval_config_says():
    from jaxseg import evaluate, train

    config = tiny_config()
    graphdef, state = train_step.create_train_state(config)
    nodes = nnx.merge(graphdef, state)
    model = train_step.inference_model(nodes)
    # Logits spread over the sigmoid's range (at initialisation they lie in about -0.25..0, and
    # no pixel reaches 0.5), so that each option changes the IoU.
    model.head.kernel[...] = np.asarray(model.head.kernel[...]) * 50
    model.head.bias[...] = np.full_like(model.head.bias[...], 4.0)
    state = nnx.state(nodes)
    evaluator = evaluate.Evaluator(fake_source(5, seed=4), mesh=sharding.make_mesh(1),
                                   image_size=32, batch_size=2)
    got = {}
    for flip in (False, True):
        for refined in (False, True):
            config.eval.flip_tta, config.eval.refine = flip, refined
            got[flip, refined] = train.validate({"fake": evaluator}, state, graphdef,
                                                config.eval)["fake/iou"]
            assert got[flip, refined] == evaluator.evaluate_model(
                model, flip_tta=flip, refined=refined)["iou"]
    # Each option changes the predictions being scored, so that a swap of the two shows.
    assert len(set(got.values())) == 4, got


def test_validation_overlays_cut_at_the_eval_threshold():
    """The logged overlays show the masks validation scores: cut at eval.threshold."""
    from jaxseg import train

    config = tiny_config()
    graphdef, state = train_step.create_train_state(config)
    source = fake_source(2, seed=5)
    model = train_step.inference_model(nnx.merge(graphdef, state))
    images = np.stack([preprocess.model_input(ex, 32)[0] for ex in source])
    probs = np.asarray(train._probabilities(model, images))
    threshold = float(np.median(probs))  # half of the pixels on each side: the cut shows
    overlays = train.prediction_overlays(state, graphdef, source, 2, 32, threshold)
    assert overlays.shape == (2, 32, 64, 3)
    np.testing.assert_array_equal(overlays[..., :32, :], images)
    for overlay, image, p in zip(overlays, images, probs):
        tinted = np.any(overlay[:, 32:] != image, axis=-1)
        np.testing.assert_array_equal(tinted, p >= threshold)
        assert not np.array_equal(tinted, p >= 0.5)  # the cut at 0.5 would show otherwise


def test_validation_sets_score_as_the_eval_config_says(monkeypatch):
    """One evaluator per data.eval dataset, over its first eval.max_examples (all of them at 0),
    cut at eval.threshold; val_iou, which picks best/, is the mean of their original-resolution
    IoUs."""
    from jaxseg import datasets, train

    sources = {"a": fake_source(5, seed=6), "b": fake_source(7, seed=7)}
    monkeypatch.setattr(datasets, "data_source", lambda name, split, **kwargs: sources[name])
    config = tiny_config()
    config.data.eval, config.eval.threshold = "a,b", 0.3
    mesh = sharding.make_mesh(1)
    config.eval.max_examples = 0
    assert [len(e.source) for e in train.validation_evaluators(config, mesh).values()] == [5, 7]
    config.eval.max_examples = 4
    evaluators = train.validation_evaluators(config, mesh)
    assert list(evaluators) == ["a", "b"] and [len(e.source) for e in evaluators.values()] == [4, 4]
    graphdef, state = train_step.create_train_state(config)
    val = train.validate(evaluators, state, graphdef, config.eval)
    model = train_step.inference_model(nnx.merge(graphdef, state))
    for name, evaluator in evaluators.items():
        result = evaluator.evaluate_model(model)
        assert result["threshold"] == 0.3 and val[f"{name}/iou"] == result["iou"]
        assert result["iou"] != result["model_resolution"]["iou"]
    assert val["val_iou"] == pytest.approx((val["a/iou"] + val["b/iou"]) / 2)


def _in_process_fake_run(monkeypatch):
    """jaxseg.train on fake data (12 training examples, 3 per validation set) in this process,
    on one device: the tiny config to train with."""
    from jaxseg import datasets, train

    monkeypatch.setattr(train, "train_sources", lambda config: ([fake_source(12, 0)], [1.0]))
    monkeypatch.setattr(datasets, "data_source",
                        lambda name, split, **kwargs: fake_source(3, seed=len(name)))
    config = tiny_config()
    config.num_devices = 1
    return config


def test_a_run_logs_validates_and_saves_its_last_step_off_the_intervals(tmp_path, monkeypatch):
    """In process on fake data: 3 steps with every interval 2 log, validate and save at step 2
    and at the last step, 3; run again to 4 steps, it resumes at 3 and trains step 4 alone."""
    from jaxseg import checkpointing, metric_writer, train

    config = _in_process_fake_run(monkeypatch)
    config.train.update(num_steps=3, log_every=2, eval_every=2, checkpoint_every=2,
                        num_logged_images=0)
    workdir = tmp_path / "run"
    assert train.train_and_evaluate(config, str(workdir))["step"] == 3
    config.train.num_steps = 4
    assert train.train_and_evaluate(config, str(workdir))["step"] == 4
    records = metric_writer.read_metrics(workdir)
    assert [r["step"] for r in records if r["kind"] == "train"] == [2, 3, 4]
    assert [r["step"] for r in records if r["kind"] == "validation"] == [2, 3, 4]
    ckpts = checkpointing.Checkpoints(workdir, read_only=True)
    assert ckpts.latest.all_steps() == [2, 3, 4]
    ckpts.close()


def test_a_stop_at_an_evaluation_step_is_validated_when_the_run_resumes(tmp_path, monkeypatch):
    """A stop at step 1 of 2, every step validated, saves step 1 unvalidated; the resumed run
    (first killed right after validating step 1, then run again) logs and offers to best/ the
    validations of the run that was never stopped."""
    from jaxseg import checkpointing, metric_writer, train

    config = _in_process_fake_run(monkeypatch)
    config.train.update(num_steps=2, log_every=1, eval_every=1, checkpoint_every=2,
                        num_logged_images=0)
    train.train_and_evaluate(config, str(tmp_path / "straight"))

    stopped = tmp_path / "stopped"
    with monkeypatch.context() as m:
        m.setattr(train._Preemption, "should_stop", lambda self: True)
        assert train.train_and_evaluate(config, str(stopped))["preempted"]
    with monkeypatch.context() as m:  # killed at its first step: the latest is still step 1

        def killed(*args):
            raise KeyboardInterrupt

        m.setattr(train_step, "make_train_step", lambda *args: killed)
        with pytest.raises(KeyboardInterrupt):
            train.train_and_evaluate(config, str(stopped))
    train.train_and_evaluate(config, str(stopped))

    def validations(workdir):
        return [(r["step"], r["val_iou"]) for r in metric_writer.read_metrics(workdir)
                if r["kind"] == "validation"]

    assert validations(stopped) == validations(tmp_path / "straight")
    assert [s for s, _ in validations(stopped)] == [1, 2]
    best = max(validations(stopped), key=lambda v: v[1])[0]
    ckpts = checkpointing.Checkpoints(stopped, read_only=True)
    assert ckpts.best_step() == best
    ckpts.close()


def test_processes_must_agree_on_the_config_data_and_checkpoint_but_not_on_local_paths():
    """What distributed.disagreement compares between the processes of a training run."""
    from jaxseg import train

    class Ckpts:
        def __init__(self, step):
            self.step = step

        def latest_step(self):
            return self.step

    config = tiny_config()
    base = train._must_agree(config, [range(5)], {}, Ckpts(None))
    local = tiny_config()  # where each host reads its data, and how fast
    local.data.data_dir, local.data.folder = "/scratch/tfds", "/scratch/mine"
    local.data.num_workers += 3
    local.data.prefetch += 1
    assert train._must_agree(local, [range(5)], {}, Ckpts(None)) == base
    seeded = tiny_config()
    seeded.seed += 1
    for changed, what in ((train._must_agree(seeded, [range(5)], {}, Ckpts(None)), "the config"),
                          (train._must_agree(config, [range(4)], {}, Ckpts(None)),
                           "the training data"),
                          (train._must_agree(config, [range(5)], {}, Ckpts(10)),
                           "the workdir's latest checkpoint")):
        assert [k for k in base if changed[k] != base[k]] == [what]
