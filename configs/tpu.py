"""A Cloud TPU VM or pod slice (launch/tpu_vm.sh): bf16, 256 px, global batch 256, 5k steps.

Starts from configs/gpu.py (bfloat16 compute, weight EMA, 256 px, base_features 32) and changes the
batch and schedule: a global batch of 256, split over every chip of every host, and 5,000 steps:
the same 1.28M images as the GPU run in a quarter of the steps. 16 decoding threads per host (TPU
VM hosts have many cores). Both batch sizes must be multiples of the device count (256 suits
slices of 8 to 256 chips; set --config.train.batch_size / --config.eval.batch_size for other
sizes).
"""
from configs import gpu


def get_config():
    """TPU configuration: configs/gpu.py's model, resolution and EMA at pod-slice batch and steps."""
    c = gpu.get_config()
    c.data.num_workers = 16
    c.train.batch_size = 256
    c.train.num_steps = 5_000
    c.optim.warmup_steps = 250
    c.train.log_every = 50
    c.train.eval_every = 500
    c.train.checkpoint_every = 250
    c.eval.batch_size = 256
    return c
