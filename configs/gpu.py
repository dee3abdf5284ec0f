"""One data-centre GPU (A100/H100/L4 class; launch/gpu.sh): bf16, 256 px, batch 64, 20k steps.

Against configs/default.py: bfloat16 compute (parameters and optimiser state stay float32), a weight
EMA (train.ema_decay 0.999), twice the resolution, a U-Net twice as wide, 4x the batch and 8.3x the
steps (33x the images seen), 8 decoding threads to keep the GPU fed, and log/eval/checkpoint
intervals scaled to the longer run.
Also the base for launch/slurm.sbatch, where train.batch_size (global) is usually raised with the
GPU count.
"""
from configs import default


def get_config():
    """GPU configuration."""
    c = default.get_config()
    c.model.compute_dtype = "bfloat16"
    # Evaluated and shipped weights are an EMA: in the H200 runs behind the pretrained model
    # (launch/gpu_array_train.py, same data) it beat the trained weights at every validation.
    c.train.ema_decay = 0.999
    c.model.base_features = 32
    c.data.image_size = 256
    c.data.num_workers = 8
    c.train.batch_size = 64
    c.train.num_steps = 20_000
    c.optim.warmup_steps = 500
    c.train.log_every = 100
    c.train.eval_every = 2_000
    c.train.checkpoint_every = 1_000
    c.eval.batch_size = 64
    return c
