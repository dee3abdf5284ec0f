"""Inference speed on this CPU: `python -m jaxseg.bench infer [--workdir DIR] [flags]`.

Times the model at its own resolution as jitted JAX and through each export of jaxseg.export
(written to a temporary folder first, so they always match the model): the StableHLO artifact
via `jax.export.deserialize(...).call`, the TensorFlow SavedModel and, when it converts, TFLite.
Reports single-image latency (median over --repeats calls, ms) and batched throughput (images/s
from the median over --repeats calls of --batch_size images), with the parameter count and the
FLOPs per image (XLA cost analysis). Calls alternate between the forms, so noise from other work
on the machine is spread evenly over them. Last, the whole per-photo path of jaxseg.predict (resize,
model, back to the photo's own size) is timed on one --photo_size photo, plain and with --refine.
"""
from __future__ import annotations

import argparse
import os
import statistics
import tempfile
import time

import jax
import numpy as np

from jaxseg import export, inference
from jaxseg.arg_types import add_model_arguments, at_least

# A reference figure, NOT measured by this script: MediaPipe selfie segmentation (general model),
# timed separately on this machine's CPU (launch/mediapipe_peer.sh: medians of 6.2-6.3 ms on
# 2026-11-27, 2.0-3.6 ms in earlier runs).
MEDIAPIPE_REFERENCE = {"params": 0.1e6, "image_size": 256, "ms_per_image": (2.0, 6.4)}


def _height_width(text: str) -> tuple[int, int]:
    """argparse type: 'HEIGHTxWIDTH', both at least 1 (checked before minutes of timing)."""
    parts = text.lower().split("x")
    if len(parts) != 2 or not all(p.strip().isdigit() and int(p) >= 1 for p in parts):
        raise argparse.ArgumentTypeError(f"must be HEIGHTxWIDTH, e.g. 800x600; got {text!r}")
    return int(parts[0]), int(parts[1])


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m jaxseg.bench infer", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    add_model_arguments(p)
    p.add_argument("--batch_size", type=at_least(1), default=8,
                   help="batch of the throughput figure")
    p.add_argument("--repeats", type=at_least(1), default=30,
                   help="timed calls per form and batch size")
    p.add_argument("--warmup", type=at_least(0), default=3, help="untimed calls (compilation included)")
    p.add_argument("--threads", type=at_least(1), default=len(os.sched_getaffinity(0)),
                   help="TFLite interpreter threads (JAX and TF use every core by default)")
    p.add_argument("--photo_size", type=_height_width, default="800x600",
                   help="HEIGHTxWIDTH of the photo for the prediction-path timing")
    return p


def _seconds(run, images) -> float:
    """Seconds of one call of `run(images)`; every run returns host numpy, so it is waited for."""
    start = time.perf_counter()
    run(images)
    return time.perf_counter() - start


def _photo_path(model, size: int, args) -> None:
    """Prints the per-photo latency of jaxseg.predict's path, plain and refined, alternating."""
    from jaxseg.predict import Predictor

    height, width = args.photo_size
    photo = np.random.default_rng(1).integers(0, 256, (height, width, 3), dtype=np.uint8)
    predictors = {name: Predictor(model, size, batch_size=1, refined=refined)
                  for name, refined in (("plain", False), ("refine", True))}
    seconds = {name: [] for name in predictors}
    for _ in range(args.warmup):
        for predictor in predictors.values():
            predictor.probabilities([photo])
    for _ in range(args.repeats):
        for name, predictor in predictors.items():
            seconds[name].append(_seconds(predictor.probabilities, [photo]))
    plain, refined = (statistics.median(seconds[n]) * 1e3 for n in ("plain", "refine"))
    print(f"predict path, one {height}x{width} photo: {plain:.2f} ms plain, {refined:.2f} ms "
          f"with --refine (+{refined - plain:.2f} ms)")


def main(argv: list[str]) -> None:
    """Prints latency and throughput of JAX and of each export, and the MediaPipe reference."""
    # Imported here: jaxseg.bench imports this module to register the subcommand.
    from jaxseg.bench import jax_param_counts, step_flops

    args = _parser().parse_args(argv)
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")  # before TensorFlow is imported
    # Every form is timed on this CPU, JAX too: on a GPU machine JAX would otherwise run on the
    # GPU and be compared with CPU exports and MediaPipe's CPU figure.
    jax.config.update("jax_platforms", "cpu")
    model, config, description = inference.load_or_exit(args.workdir, args.checkpoint, args.members)
    size = config.data.image_size
    fn, leaves = export.inference_function(model)
    jitted = jax.jit(fn)
    rng = np.random.default_rng(0)
    batches = {b: rng.integers(0, 256, (b, size, size, 3), dtype=np.uint8)
               for b in (1, args.batch_size)}

    trainable, stats = jax_param_counts(model)
    print(f"model: {description} image_size={size} parameters={trainable:,} "
          f"(+{stats:,} batch statistics) {step_flops(jitted, leaves, batches[1]) / 1e9:.3f} "
          f"GFLOP/image (XLA cost analysis) device={jax.devices()[0].device_kind} "
          f"cores={len(os.sched_getaffinity(0))} tflite_threads={args.threads}")

    with tempfile.TemporaryDirectory() as tmp:
        manifest = export.export_all(model, config, tmp, batch_size=args.batch_size,
                                     description=description)
        forms = {"jax": {None: lambda x: np.asarray(jitted(leaves, x))}}
        forms.update(export.runners(tmp, tflite_threads=args.threads))
        if "error" in manifest["tflite"]:
            print(f"tflite: not converted ({manifest['tflite']['error'].splitlines()[0]})")

        seconds = {}
        for b, images in batches.items():
            # A form keyed None takes any batch; otherwise each batch has its own signature.
            runs = {name: by_batch.get(b, by_batch.get(None)) for name, by_batch in forms.items()}
            for run in runs.values():
                for _ in range(args.warmup):
                    run(images)
            for _ in range(args.repeats):
                for name, run in runs.items():
                    seconds.setdefault((name, b), []).append(_seconds(run, images))

    latency = {name: statistics.median(seconds[name, 1]) * 1e3 for name in forms}
    print(f"{'form':<12} {'latency ms (batch 1)':>22} {f'images/s (batch {args.batch_size})':>22}")
    for name in forms:
        rate = args.batch_size / statistics.median(seconds[name, args.batch_size])
        print(f"{name:<12} {latency[name]:>22.2f} {rate:>22.1f}")
    _photo_path(model, size, args)
    fastest = min(latency, key=latency.get)
    ref = MEDIAPIPE_REFERENCE
    print(f"vs MediaPipe selfie segmentation: this model {trainable / 1e6:.2f}M parameters at "
          f"{size}x{size}, {latency[fastest]:.2f} ms/image ({fastest}); MediaPipe ~{ref['params'] / 1e6:.1f}M "
          f"parameters at {ref['image_size']}x{ref['image_size']}, ~{ref['ms_per_image'][0]:g}-"
          f"{ref['ms_per_image'][1]:g} ms/image on this CPU (reference figure measured separately, "
          f"not by this script)")
