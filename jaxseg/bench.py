"""Speed benchmarks: `python -m jaxseg.bench SUBCOMMAND [flags]`.

Subcommands (one function each, registered in `SUBCOMMANDS`):
  train  Train-step images/second of the JAX U-Net, on synthetic batches through the training
         loop's own step (jaxseg.train_step.make_train_step), against the same U-Net in tf.keras
         (layer for layer; its Conv2DTranspose has a bias per channel where jaxseg's upsampling
         has one per output sub-pixel: 720 fewer parameters of 1.94M by default) timed in the
         same process (repetitions alternate, medians reported). The last line is
         `jax/keras ratio: X.XX`. With --gpu_config it times JAX alone on an accelerator
         (TensorFlow is not imported) and reports the fraction of --peak_tflops achieved.
  infer  Inference latency and throughput of a trained model (default: the pretrained one) as
         jitted JAX and through each export (jaxseg.bench_infer).
  input  Training input pipeline examples/second (jaxseg.input_pipeline.TrainBatches on the
         config's mixture of real train splits, augmentation on) for each image size and worker
         count, against the train step's images/second at the same size, and the train step fed
         by the pipeline (both sharing the machine's cores, as in training).

Keras is a benchmark-only dependency (keras 3, which ships with tensorflow-cpu).
"""
from __future__ import annotations

import argparse
import os
import statistics
import sys
import time

import jax
import numpy as np
from flax import nnx

from jaxseg import host_memory, sharding
from jaxseg.arg_types import at_least, positive_number
from jaxseg.models import unet
from jaxseg.train_step import create_train_state, make_train_step


# --------------------------------------------------------------------------------------------
# Shared helpers


def step_flops(jitted, *args) -> float:
    """FLOPs of one call of a jitted function on `args`, from XLA's cost analysis.

    CPU: the compiled module. Elsewhere the module before optimisation: GPU compilation turns
    convolutions into cuDNN custom calls that cost analysis counts as 0 FLOPs (an H200 run
    reported 0.61 instead of 71 GFLOP/image). On CPU the two counts agree within 0.5%.
    """
    lowered = jitted.lower(*args)
    on_cpu = jax.default_backend() == "cpu"
    cost = lowered.compile().cost_analysis() if on_cpu else lowered.cost_analysis()
    return float(cost["flops"])


def synthetic_batch(batch_size: int, image_size: int, seed: int = 0) -> dict[str, np.ndarray]:
    """A training batch shaped like the input pipeline's: uint8 images and 0/1 masks, all valid."""
    rng = np.random.default_rng(seed)
    return {
        "image": rng.integers(0, 256, (batch_size, image_size, image_size, 3), dtype=np.uint8),
        "mask": rng.integers(0, 2, (batch_size, image_size, image_size, 1), dtype=np.uint8),
        "valid": np.ones(batch_size, np.float32),
    }


def jax_param_counts(model) -> tuple[int, int]:
    """(trainable, non-trainable) element counts of an NNX model: Params and BatchStats."""
    def count(kind):
        return sum(int(x.size) for x in jax.tree.leaves(nnx.state(model, kind)))

    return count(nnx.Param), count(nnx.BatchStat)


def _time_steps(run_steps, steps: int) -> float:
    """Seconds taken by `run_steps(steps)` (which must wait for its last step)."""
    start = time.perf_counter()
    run_steps(steps)
    return time.perf_counter() - start


def _median_rate(seconds: list[float], steps: int, batch_size: int) -> float:
    return steps * batch_size / statistics.median(seconds)


class JaxTrainer:
    """The training loop's step, on one device, repeatedly applied to one synthetic batch."""

    def __init__(self, config, batch: dict[str, np.ndarray]):
        mesh = sharding.make_mesh(1)
        self.graphdef, state = create_train_state(config)
        self.state = sharding.replicate(state, mesh)
        self.batch = jax.device_put(batch, sharding.data_sharded(mesh))
        self.step = make_train_step(self.graphdef, config, mesh)

    def flops_per_call(self) -> float:
        """FLOPs of one train step (forward, backward and optimiser update) for the whole batch."""
        return step_flops(self.step, self.state, self.batch)

    def run(self, steps: int) -> None:
        """Runs `steps` train steps and waits for the last one."""
        for _ in range(steps):
            self.state, _ = self.step(self.state, self.batch)
        # The state alone: the last step's output, and bound even for `train --warmup 0`.
        jax.block_until_ready(self.state)


# --------------------------------------------------------------------------------------------
# The Keras twin of jaxseg.models.unet.UNet (TensorFlow backend)


def _import_keras():
    # Keras 3 picks its backend at import; the comparison is only meaningful against TensorFlow.
    os.environ["KERAS_BACKEND"] = "tensorflow"
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
    import keras

    if keras.backend.backend() != "tensorflow":
        raise RuntimeError(f"keras was already imported with the {keras.backend.backend()} backend")
    return keras


def keras_unet(model_config, image_size: int):
    """A tf.keras U-Net with the same layers as jaxseg's (transposed-conv upsampling, no residual).

    uint8 images in, float32 logits out; input normalisation inside the model, as in JAX.
    """
    keras = _import_keras()
    from keras import layers, ops

    c = model_config
    if (c.residual or c.upsample != "transpose" or c.norm != "batch"
            or c.attention_gates):
        raise ValueError("the Keras twin covers norm='batch', upsample='transpose', residual=False, "
                         "attention_gates=False")

    def block(x, features):
        for _ in range(2):
            x = layers.Conv2D(features, 3, padding="same", use_bias=False)(x)
            # Flax's BatchNorm: momentum 0.9, epsilon 1e-5 (Keras defaults differ).
            x = layers.BatchNormalization(momentum=0.9, epsilon=1e-5)(x)
            x = layers.ReLU()(x)
        return x

    widths = [c.base_features * 2**i for i in range(c.depth + 1)]
    images = keras.Input((image_size, image_size, 3), dtype="uint8")
    x = (ops.cast(images, "float32") - np.array(unet._RGB_MEAN, np.float32)) / np.array(
        unet._RGB_STD, np.float32)
    skips = []
    for w in widths[:-1]:
        x = block(x, w)
        skips.append(x)
        x = layers.MaxPooling2D(2)(x)
    x = block(x, widths[-1])
    x = layers.Dropout(c.dropout)(x)
    for w, skip in zip(reversed(widths[:-1]), reversed(skips)):
        x = layers.Conv2DTranspose(w, 2, strides=2)(x)
        x = block(layers.Concatenate()([x, skip]), w)
    logits = layers.Conv2D(c.num_classes, 1)(x)
    return keras.Model(images, logits)


def keras_param_counts(model) -> tuple[int, int]:
    """(trainable, non-trainable) element counts of a Keras model: weights and BN moving stats."""
    def count(weights):
        return sum(int(np.prod(w.shape)) for w in weights)

    return count(model.trainable_weights), count(model.non_trainable_weights)


def keras_loss(ce_weight: float, dice_weight: float):
    """Per-image sigmoid cross-entropy + soft Dice (eps 1), as jaxseg.losses for a 1-logit head."""
    _import_keras()
    from keras import ops

    def loss(masks, logits):
        t = ops.cast(masks[..., 0], "float32")
        z = logits[..., 0]
        ce = ops.mean(ops.maximum(z, 0) - z * t + ops.log1p(ops.exp(-ops.abs(z))), axis=(1, 2))
        p = ops.sigmoid(z)
        dice = (2 * ops.sum(p * t, axis=(1, 2)) + 1) / (
            ops.sum(p, axis=(1, 2)) + ops.sum(t, axis=(1, 2)) + 1)
        return ce_weight * ce + dice_weight * (1 - dice)

    return loss


def keras_optimizer(optim_config, num_steps: int):
    """AdamW matching jaxseg.optim: warmup + cosine, global-norm clipping, decay on kernels only."""
    keras = _import_keras()
    c = optim_config
    schedule = keras.optimizers.schedules.CosineDecay(
        0.0, max(num_steps - c.warmup_steps, 1), alpha=c.final_lr_fraction,
        warmup_target=c.learning_rate, warmup_steps=c.warmup_steps)
    # epsilon 1e-8 as optax (Keras: 1e-7); global_clipnorm = optax.clip_by_global_norm.
    opt = keras.optimizers.AdamW(schedule, weight_decay=c.weight_decay, beta_1=c.b1, beta_2=c.b2,
                                 epsilon=1e-8, global_clipnorm=c.grad_clip_norm or None)
    opt.exclude_from_weight_decay(var_names=["gamma", "beta", "bias"])
    return opt


class KerasTrainer:
    """The Keras twin compiled for training, repeatedly applied to one synthetic batch."""

    def __init__(self, config, batch: dict[str, np.ndarray], jit_compile: bool):
        import tensorflow as tf

        self.model = keras_unet(config.model, config.data.image_size)
        self.model.compile(
            optimizer=keras_optimizer(config.optim, config.train.num_steps),
            loss=keras_loss(config.loss.ce_weight, config.loss.dice_weight),
            jit_compile=jit_compile)
        self.images = tf.constant(batch["image"])
        self.masks = tf.constant(batch["mask"])

    def run(self, steps: int) -> None:
        """Runs `steps` train steps (train_on_batch returns numpy logs: each call is waited for)."""
        for _ in range(steps):
            self.model.train_on_batch(self.images, self.masks)


# --------------------------------------------------------------------------------------------
# train


def _load_config(gpu: bool):
    from configs import default, gpu as gpu_config

    return (gpu_config if gpu else default).get_config()


def _train_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m jaxseg.bench train", description=train.__doc__)
    p.add_argument("--image_size", type=at_least(1), help="default: the config's data.image_size")
    p.add_argument("--batch_size", type=at_least(1), help="default: the config's train.batch_size")
    p.add_argument("--repeats", type=at_least(1), default=5, help="timed repetitions per framework")
    p.add_argument("--steps", type=at_least(1), default=10, help="train steps per repetition")
    p.add_argument("--warmup", type=at_least(0), default=2,
                   help="untimed steps (compilation included)")
    p.add_argument("--keras_jit", choices=("both", "on", "off", "none"), default="both",
                   help="Keras jit_compile settings to time; the faster one is compared "
                        "(none: JAX alone, TensorFlow not imported)")
    p.add_argument("--gpu_config", action="store_true",
                   help="configs/gpu.py (else configs/default.py); JAX only, no TF")
    p.add_argument("--peak_tflops", type=positive_number, default=989.0,
                   help="accelerator peak for --gpu_config (H100 dense bf16: 989)")
    return p


def _check(config) -> None:
    """Exits with the config check's message (an image size the model cannot take, say) before
    the minutes of compiling that would end in a traceback."""
    from jaxseg import config_check

    timed = config.copy_and_resolve_references()
    timed.data.train = "portrait_segmentation"  # synthetic batches: a row per dataset not needed
    try:
        config_check.validate(timed, 1)  # timed on one device
    except config_check.ConfigError as e:
        raise SystemExit(f"error: {e}") from None


def train(argv: list[str]) -> None:
    """Train-step images/s: JAX vs the same tf.keras U-Net, or JAX alone with --gpu_config."""
    args = _train_parser().parse_args(argv)
    config = _load_config(args.gpu_config)
    if args.image_size:
        config.data.image_size = args.image_size
    if args.batch_size:
        config.train.batch_size = args.batch_size
    _check(config)
    size, batch_size, m = config.data.image_size, config.train.batch_size, config.model
    print(f"config: image_size={size} batch_size={batch_size} depth={m.depth} "
          f"base_features={m.base_features} norm={m.norm} dropout={m.dropout} "
          f"upsample={m.upsample} compute_dtype={m.compute_dtype} "
          f"(runs as {unet.compute_dtype(m.compute_dtype).name}) "
          f"device={jax.devices()[0].device_kind} (1 of {jax.device_count()})")

    batch = synthetic_batch(batch_size, size)
    jax_trainer = JaxTrainer(config, batch)
    model = nnx.merge(jax_trainer.graphdef, jax_trainer.state)["model"]
    trainable, stats = jax_param_counts(model)
    flops = jax_trainer.flops_per_call() / batch_size
    print(f"jax parameters: {trainable:,} trainable + {stats:,} batch statistics")
    print(f"jax train step: {flops / 1e9:.3f} GFLOP/image (XLA cost analysis)")

    timed = {"jax": jax_trainer}
    if not args.gpu_config and args.keras_jit != "none":
        jits = {"both": (True, False), "on": (True,), "off": (False,)}[args.keras_jit]
        keras_trainers = [KerasTrainer(config, batch, jit_compile=jit) for jit in jits]
        k_trainable, k_stats = keras_param_counts(keras_trainers[0].model)
        print(f"keras parameters: {k_trainable:,} trainable + {k_stats:,} batch statistics")
        timed.update({f"keras jit_compile={jit}": k for jit, k in zip(jits, keras_trainers)})

    for trainer in timed.values():
        trainer.run(args.warmup)
    seconds = {name: [] for name in timed}
    # Alternating repetitions spread machine noise (shared cores) evenly over the frameworks.
    for rep in range(args.repeats):
        line = []
        for name, trainer in timed.items():
            seconds[name].append(_time_steps(trainer.run, args.steps))
            line.append(f"{name} {args.steps * batch_size / seconds[name][-1]:.1f}")
        print(f"rep {rep + 1}/{args.repeats} images/s: " + " | ".join(line), flush=True)

    rates = {name: _median_rate(s, args.steps, batch_size) for name, s in seconds.items()}
    for name, rate in rates.items():
        print(f"median images/s {name}: {rate:.1f}")
    jax_rate = rates["jax"]
    achieved = flops * jax_rate
    print(f"jax achieved: {achieved / 1e9:.1f} GFLOP/s")
    if args.gpu_config:
        print(f"fraction of peak ({args.peak_tflops:g} TFLOP/s): "
              f"{achieved / (args.peak_tflops * 1e12):.4f}")
    if len(rates) == 1:  # JAX alone
        return
    best = max((n for n in rates if n != "jax"), key=rates.get)
    print(f"faster keras: {best}")
    print(f"jax/keras ratio: {jax_rate / rates[best]:.2f}")


# --------------------------------------------------------------------------------------------
# infer


def infer(argv: list[str]) -> None:
    """Inference latency and throughput of JAX and each export (jaxseg.bench_infer)."""
    from jaxseg import bench_infer  # imported here: it loads the export machinery

    bench_infer.main(argv)


# --------------------------------------------------------------------------------------------
# input


def _int_list(text: str) -> list[int]:
    values = [at_least(1)(v) for v in text.split(",") if v.strip()]
    if not values:
        raise argparse.ArgumentTypeError("give at least one number")
    return values


def _input_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m jaxseg.bench input", description=input_bench.__doc__)
    p.add_argument("--image_sizes", type=_int_list, default=[128, 256], help="comma-separated")
    p.add_argument("--workers", type=_int_list, default=[1, 2],
                   help="comma-separated TrainBatches worker-thread counts")
    p.add_argument("--batch_size", type=at_least(1), help="default: the config's train.batch_size")
    p.add_argument("--batches", type=at_least(1), default=12,
                   help="timed pipeline batches per setting")
    p.add_argument("--warmup", type=at_least(0), default=3,
                   help="untimed pipeline batches per setting")
    p.add_argument("--steps", type=at_least(0), default=3,
                   help="timed train steps per size (0: skip)")
    p.add_argument("--repeats", type=at_least(1), default=3,
                   help="timed repetitions of --batches / --steps; the median is reported")
    return p


def pipeline_rate(sources, weights, *, image_size: int, batch_size: int, num_workers: int, aug,
                  batches: int, warmup: int = 1, prefetch: int = 2, seed: int = 0,
                  start_step: int = 0) -> float:
    """Examples/second that TrainBatches delivers to a consumer that never waits.

    The first `warmup` batches (thread start-up, file opening) are not timed; the timed ones come
    from the steady state in which `prefetch + 1` batches are always in flight.
    """
    from jaxseg import input_pipeline

    stream = input_pipeline.TrainBatches(
        sources, weights, global_batch=batch_size, image_size=image_size, aug=aug, seed=seed,
        start_step=start_step, num_workers=num_workers, prefetch=prefetch)
    try:
        for _ in range(warmup):
            next(stream)
        start = time.perf_counter()
        for _ in range(batches):
            next(stream)
        return batches * batch_size / (time.perf_counter() - start)
    finally:
        stream.close()


def fed_steps(trainer: JaxTrainer, batches):
    """A `run(steps)` for `trainer`'s step and state taking each batch from `batches`, as training
    does (host batch -> device, then the step); the pipeline's threads work while the step runs."""
    shardings = jax.tree.map(lambda x: x.sharding, trainer.batch)

    def run(steps: int) -> None:
        for _ in range(steps):
            batch = jax.device_put(next(batches), shardings)
            trainer.state, metrics = trainer.step(trainer.state, batch)
        jax.block_until_ready((trainer.state, metrics))

    return run


def input_bench(argv: list[str], sources=None) -> None:
    """Input pipeline examples/s per image size and worker count vs the train step's images/s.

    `sources`: (sources, weights) instead of the default config's mixture of real train splits.
    """
    from configs import default
    from jaxseg import input_pipeline, mixture, train

    args = _input_parser().parse_args(argv)
    config = default.get_config()
    batch_size = args.batch_size or config.train.batch_size
    for size in args.image_sizes if args.steps else ():  # sizes the train step is timed at
        sized = default.get_config()
        sized.data.image_size, sized.train.batch_size = size, batch_size
        _check(sized)
    # The training mixture as training reads it, prepared on first use as training prepares it.
    sources, weights = sources or train.train_sources(config)
    try:  # TrainBatches raised it, a traceback
        mixture.mixture_counts(weights, batch_size)
    except ValueError as e:
        raise SystemExit(f"error: --batch_size {batch_size}: {e}") from None
    cores = len(os.sched_getaffinity(0))
    import cv2

    names = [f"{getattr(s, 'name', 'source')}/{getattr(s, 'split', '?')} {len(s)}" for s in sources]
    print(f"mixture: weights {weights} ({' + '.join(names)} examples), batch {batch_size}, "
          f"augmentation {'on' if config.data.aug.enabled else 'off'}, "
          f"prefetch {config.data.prefetch}, cores {cores}, OpenCV threads {cv2.getNumThreads()}, "
          f"default workers {config.data.num_workers}")

    rates = {}
    for size in args.image_sizes:
        for workers in args.workers:
            reps = [pipeline_rate(sources, weights, image_size=size, batch_size=batch_size,
                                  num_workers=workers, aug=config.data.aug, batches=args.batches,
                                  warmup=args.warmup, prefetch=config.data.prefetch,
                                  seed=config.seed, start_step=1000 * rep)
                    for rep in range(args.repeats)]
            rates[size, workers] = statistics.median(reps)
            print(f"pipeline {size}x{size} workers={workers}: {rates[size, workers]:.1f} examples/s "
                  f"(reps {', '.join(f'{r:.1f}' for r in reps)})", flush=True)
    if not args.steps:
        return

    for size in args.image_sizes:
        c = default.get_config()
        c.data.image_size, c.train.batch_size = size, batch_size
        trainer = JaxTrainer(c, synthetic_batch(batch_size, size))
        trainer.run(1)  # compilation
        seconds = [_time_steps(trainer.run, args.steps) for _ in range(args.repeats)]
        step_rate = _median_rate(seconds, args.steps, batch_size)
        print(f"train step {size}x{size} (default model, JAX, synthetic batch): "
              f"{step_rate:.1f} images/s ({statistics.median(seconds) / args.steps:.2f} s/step)")
        for workers in args.workers:
            rate = rates[size, workers]
            verdict = ("feeds the step faster than it consumes" if rate > step_rate
                       else "is SLOWER than the step: training would wait for data")
            print(f"  pipeline workers={workers}: {rate:.1f} examples/s = {rate / step_rate:.1f}x "
                  f"the step: the pipeline {verdict}")
        workers = config.data.num_workers
        stream = input_pipeline.TrainBatches(
            sources, weights, global_batch=batch_size, image_size=size, aug=config.data.aug,
            seed=config.seed, num_workers=workers, prefetch=config.data.prefetch)
        try:
            fed = fed_steps(trainer, stream)
            fed(1)  # the pipeline filling its prefetch queue
            fed_seconds = [_time_steps(fed, args.steps) for _ in range(args.repeats)]
        finally:
            stream.close()
        fed_rate = _median_rate(fed_seconds, args.steps, batch_size)
        print(f"  train step fed by the pipeline (workers={workers}, sharing the {cores} cores): "
              f"{fed_rate:.1f} images/s = {fed_rate / step_rate:.2f}x the synthetic-batch step",
              flush=True)


SUBCOMMANDS = {"train": train, "infer": infer, "input": input_bench}


def main(argv: list[str] | None = None) -> None:
    """Dispatches `python -m jaxseg.bench SUBCOMMAND [flags]`."""
    argv = sys.argv[1:] if argv is None else argv
    if not argv or argv[0] not in SUBCOMMANDS:
        lines = [f"usage: python -m jaxseg.bench {{{','.join(SUBCOMMANDS)}}} [flags]", ""]
        lines += [f"  {name:7s}{(fn.__doc__ or '').strip().splitlines()[0]}"
                  for name, fn in SUBCOMMANDS.items()]
        lines += ["", "python -m jaxseg.bench SUBCOMMAND --help lists its flags."]
        if argv and argv[0] in ("-h", "--help"):
            print("\n".join(lines))
            return
        sys.exit("\n".join(lines))
    if argv[0] in ("train", "input"):  # they time the train step: as jaxseg.train runs it
        host_memory.reuse_freed_memory()
    SUBCOMMANDS[argv[0]](argv[1:])


if __name__ == "__main__":
    main()
