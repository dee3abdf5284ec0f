"""Checkpoints with and without a weight EMA: what gets loaded, and resuming with another setting."""
import json

import jax
import numpy as np
import pytest
from flax import nnx

from configs import smoke
from jaxseg import checkpointing, config_check, train, train_step


def tiny_config(ema_decay):
    c = smoke.get_config()
    c.data.image_size = 32
    c.model.depth = 2
    c.model.base_features = 4
    c.train.ema_decay = ema_decay
    return c


def save(workdir, config, nodes, meta_config=None):
    ckpts = checkpointing.Checkpoints(workdir, async_save=False)
    meta = {"config": meta_config or json.loads(config.to_json()), "step": 1}
    ckpts.save(1, nnx.state(nodes), meta, force=True)
    ckpts.close()


def params(model):
    return [np.asarray(x) for x in jax.tree.leaves(nnx.state(model, nnx.Param))]


def test_a_workdir_loads_its_ema_model(tmp_path):
    config = tiny_config(0.99)
    graphdef, state = train_step.create_train_state(config)
    nodes = nnx.merge(graphdef, state)
    nnx.update(nodes["ema"], jax.tree.map(lambda x: x + 1.0, nnx.state(nodes["ema"], nnx.Param)))
    save(tmp_path, config, nodes)
    model, _, step = train.load_model(str(tmp_path), "latest")
    assert step == 1
    for got, ema, trained in zip(params(model), params(nodes["ema"]), params(nodes["model"])):
        np.testing.assert_array_equal(got, ema)
        assert not np.array_equal(got, trained)


def test_a_checkpoint_from_before_ema_existed_loads(tmp_path):
    config = tiny_config(0.0)
    graphdef, state = train_step.create_train_state(config)
    nodes = nnx.merge(graphdef, state)
    old = json.loads(config.to_json())
    del old["train"]["ema_decay"]  # as written before the field existed
    save(tmp_path, config, nodes, meta_config=old)
    model, loaded_config, _ = train.load_model(str(tmp_path), "latest")
    assert "ema_decay" not in loaded_config.train
    for got, trained in zip(params(model), params(nodes["model"])):
        np.testing.assert_array_equal(got, trained)


def test_resuming_with_another_ema_setting_or_model_shape_says_what_to_do(tmp_path):
    config = tiny_config(0.0)
    graphdef, state = train_step.create_train_state(config)
    save(tmp_path, config, nnx.merge(graphdef, state))
    ckpts = checkpointing.Checkpoints(tmp_path, read_only=True)
    same_shape = tiny_config(0.0)
    same_shape.model.dropout = 0.3  # not a shape: resumes
    train._check_resumable(same_shape, ckpts)
    with pytest.raises(config_check.ConfigError, match="written with train.ema_decay=0.0"):
        train._check_resumable(tiny_config(0.999), ckpts)
    wider = tiny_config(0.0)
    wider.model.base_features *= 2
    with pytest.raises(config_check.ConfigError,
                       match=f"model.base_features={config.model.base_features} "
                             f"\\(this config: {wider.model.base_features}\\)"):
        train._check_resumable(wider, ckpts)
    ckpts.close()


def test_a_checkpoint_name_that_is_not_a_step_says_what_to_name(tmp_path):
    ckpts = checkpointing.Checkpoints(tmp_path, read_only=True)
    with pytest.raises(FileNotFoundError, match="name 'best', 'latest' or a step number"):
        ckpts.resolve("garbage")
    ckpts.close()
