"""Under a minute on the real data: tiny model, two checkpoints, one validation (tests, quick checks)."""
from configs import default


def get_config():
    """Smoke configuration."""
    c = default.get_config()
    c.data.image_size = 64
    c.model.depth = 3
    c.model.base_features = 8
    c.optim.warmup_steps = 2
    c.train.batch_size = 8
    c.train.num_steps = 20
    c.train.log_every = 5
    c.train.eval_every = 20
    c.train.checkpoint_every = 10
    c.train.num_logged_images = 2
    c.eval.batch_size = 16
    c.eval.max_examples = 32
    return c
