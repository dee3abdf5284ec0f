"""Exports the inference function for serving without jaxseg: `python -m jaxseg.export --output DIR`.

The exported function maps uint8 RGB images (B, S, S, 3), already resized to the model resolution
S by `jaxseg.resolution.resize_image` (aspect not kept), to float32 P(person) (B, S, S); input
normalisation is inside the model, so callers feed raw pixels. Written to DIR:

  model.stablehlo  `jax.export` serialization (StableHLO + calling convention), symbolic batch;
                   load with `jax.export.deserialize(bytes).call(images)` (JAX only, no jaxseg).
  saved_model/     TensorFlow SavedModel from `jax2tf.convert`: signature `serving_default` takes
                   one image (batch 1) and `batch_N` takes N; input `images`, output
                   `probabilities`.
  model.tflite     The same signatures converted by `tf.lite.TFLiteConverter`, if it converts.
  export.json      Shapes, dtypes, signatures, versions, and why a form is missing or fixed-batch;
                   written last, so that a folder without it holds no whole export.

All forms are lowered for the CPU: they are meant for CPU serving, and lowering for the local
default backend would make an export built on a GPU machine unusable on a CPU-only one.
"""
from __future__ import annotations

import argparse
import contextlib
import json
import os
import pathlib
import sys

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from jaxseg import inference
from jaxseg.arg_types import add_model_arguments, at_least, interrupted_in_one_line
from jaxseg.workdir import (escape_unencodable_stdout, local_folder_problem, local_output_folder,
                            remove_stale_partials, write_text_whole)

PLATFORMS = ("cpu",)
STABLEHLO_FILE = "model.stablehlo"
SAVED_MODEL_DIR = "saved_model"
TFLITE_FILE = "model.tflite"
MANIFEST_FILE = "export.json"
INPUT_NAME = "images"
OUTPUT_NAME = "probabilities"
# Why the TensorFlow forms cannot take a symbolic batch with this jax/TensorFlow pair.
FIXED_BATCH_REASON = (
    "a symbolic batch makes jax.export emit a shape_assertion custom call, serialized as "
    "vhlo.custom_call_v2, which TensorFlow's older StableHLO cannot deserialize; each TF "
    "signature therefore has a fixed batch")


def inference_function(model):
    """(fn, leaves): fn(leaves, images) -> (B, S, S) float32 P(person); leaves = model state arrays.

    The state is passed as a flat list of arrays so that jax2tf can bind each to a tf.Variable.
    """
    graphdef, state = nnx.split(model)
    leaves, treedef = jax.tree.flatten(state)

    def fn(leaves, images):
        model = nnx.merge(graphdef, jax.tree.unflatten(treedef, leaves))
        return inference.person_probabilities(model, images)

    return fn, leaves


def export_stablehlo(model, image_size: int) -> jax.export.Exported:
    """The inference function with weights embedded, exported for any batch size (symbolic)."""
    fn, leaves = inference_function(model)
    batch, = jax.export.symbolic_shape("batch")
    images = jax.ShapeDtypeStruct((batch, image_size, image_size, 3), jnp.uint8)
    return jax.export.export(jax.jit(lambda x: fn(leaves, x)), platforms=PLATFORMS)(images)


def signature_name(batch_size: int) -> str:
    """The SavedModel/TFLite signature taking `batch_size` images; batch 1 is the default one."""
    return "serving_default" if batch_size == 1 else f"batch_{batch_size}"


def save_saved_model(model, image_size: int, batch_sizes, directory: pathlib.Path) -> dict:
    """Writes a SavedModel (jax2tf) with one fixed-batch signature per batch size; {name: batch}."""
    import tensorflow as tf
    from jax.experimental import jax2tf

    fn, leaves = inference_function(model)
    # No gradient: inference only, and it would serialize the backward pass too.
    fn_tf = jax2tf.convert(fn, with_gradient=False, native_serialization_platforms=PLATFORMS)
    module = tf.Module()
    # Weights as variables (not graph constants) are stored once and shared by every signature.
    module.params = [tf.Variable(np.asarray(x), trainable=False) for x in leaves]
    signatures = {}
    for b in batch_sizes:
        spec = tf.TensorSpec((b, image_size, image_size, 3), tf.uint8, name=INPUT_NAME)
        call = tf.function(lambda images: {OUTPUT_NAME: fn_tf(module.params, images)},
                           input_signature=[spec], autograph=False)
        signatures[signature_name(b)] = call.get_concrete_function()
    tf.saved_model.save(module, str(directory), signatures=signatures)
    return {name: b for name, b in zip(signatures, batch_sizes)}


def convert_tflite(saved_model_dir: pathlib.Path, signature_names) -> bytes:
    """A TFLite flatbuffer holding the SavedModel's signatures (weights frozen into it)."""
    import tensorflow as tf

    converter = tf.lite.TFLiteConverter.from_saved_model(
        str(saved_model_dir), signature_keys=list(signature_names))
    return converter.convert()


def export_all(model, config, output, *, batch_size: int = 8, description: dict | None = None) -> dict:
    """Writes every form to `output` and returns the manifest (also written as export.json)."""
    import tensorflow as tf

    output = pathlib.Path(output)
    output.mkdir(parents=True, exist_ok=True)
    # Removed first and written last: an export that fails halfway into an earlier export's
    # folder must not leave that export's manifest describing files now partly this model's.
    (output / MANIFEST_FILE).unlink(missing_ok=True)
    size = config.data.image_size
    manifest = {
        "model": description or {},
        "model_config": json.loads(config.model.to_json()),
        "image_size": size,
        "input": {"name": INPUT_NAME, "shape": ["batch", size, size, 3], "dtype": "uint8",
                  "meaning": "RGB 0..255 resized (aspect not kept) to image_size x image_size"},
        "output": {"name": OUTPUT_NAME, "shape": ["batch", size, size], "dtype": "float32",
                   "meaning": "P(person) per pixel"},
        "platforms": list(PLATFORMS),
        "versions": {"jax": jax.__version__, "tensorflow": tf.__version__},
    }

    exported = export_stablehlo(model, size)
    (output / STABLEHLO_FILE).write_bytes(exported.serialize())
    manifest["stablehlo"] = {
        "file": STABLEHLO_FILE, "batch": "symbolic",
        "calling_convention_version": exported.calling_convention_version,
        "load": "jax.export.deserialize(data).call(images)"}

    batch_sizes = sorted({1, batch_size})
    signatures = save_saved_model(model, size, batch_sizes, output / SAVED_MODEL_DIR)
    manifest["saved_model"] = {"dir": SAVED_MODEL_DIR, "signatures": signatures,
                               "batch": "fixed per signature", "why_fixed": FIXED_BATCH_REASON}

    try:
        flatbuffer = convert_tflite(output / SAVED_MODEL_DIR, signatures)
    except Exception as e:  # the converter raises many types; a failure must not stop the export
        manifest["tflite"] = {"error": f"{type(e).__name__}: {e}"[:2000]}
        (output / TFLITE_FILE).unlink(missing_ok=True)  # an earlier export's, of another model
    else:
        (output / TFLITE_FILE).write_bytes(flatbuffer)
        manifest["tflite"] = {"file": TFLITE_FILE, "signatures": signatures}

    write_text_whole(output / MANIFEST_FILE, json.dumps(manifest, indent=2) + "\n")
    return manifest


def runners(output, *, tflite_threads: int | None = None) -> dict:
    """{form: {batch: run}} over an export folder; run(uint8 images) -> float32 numpy P(person).

    Forms: 'stablehlo' (any batch: keyed None), 'saved_model' and, when converted, 'tflite'.
    """
    import tensorflow as tf

    output = pathlib.Path(output)
    manifest = json.loads((output / MANIFEST_FILE).read_text())
    exported = jax.export.deserialize((output / STABLEHLO_FILE).read_bytes())
    forms = {"stablehlo": {None: lambda x: np.asarray(exported.call(x))}}

    loaded = tf.saved_model.load(str(output / SAVED_MODEL_DIR))
    forms["saved_model"] = {
        b: (lambda x, f=loaded.signatures[name]: f(**{INPUT_NAME: tf.constant(x)})[OUTPUT_NAME].numpy())
        for name, b in manifest["saved_model"]["signatures"].items()}

    if "file" in manifest["tflite"]:
        interpreter = tf.lite.Interpreter(str(output / TFLITE_FILE), num_threads=tflite_threads)
        forms["tflite"] = {
            b: (lambda x, f=interpreter.get_signature_runner(name): f(**{INPUT_NAME: x})[OUTPUT_NAME])
            for name, b in manifest["tflite"]["signatures"].items()}
    return forms


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m jaxseg.export", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    add_model_arguments(p)
    p.add_argument("--output", required=True, help="folder to write the exports to")
    p.add_argument("--batch_size", type=at_least(1), default=8,
                   help="batch of the TF/TFLite batched signature (besides batch 1)")
    return p


def main(argv: list[str] | None = None) -> None:
    """Command line: load the model, write every form, print the manifest's summary."""
    args = _parser().parse_args(sys.argv[1:] if argv is None else argv)
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")  # before TensorFlow is imported
    escape_unencodable_stdout()  # a non-UTF-8 --output in the last line
    output = local_output_folder(args.output)
    created = [p for p in (output, *output.parents) if not p.exists()]  # deepest first
    problem = local_folder_problem(output)  # before the minutes of loading and converting
    if problem:
        raise SystemExit(f"error: --output {output}: {problem}")
    # The exports are CPU artifacts: traced on a GPU they would hold CUDA StableHLO and the
    # config's bf16 compute (create_model keeps bf16 off CPU only).
    jax.config.update("jax_platforms", "cpu")
    try:
        model, config, description = inference.load_or_exit(args.workdir, args.checkpoint,
                                                            args.members)
    except (SystemExit, KeyboardInterrupt):
        for folder in created:  # no empty folders left behind by a run that wrote nothing
            with contextlib.suppress(OSError):
                folder.rmdir()
        raise
    remove_stale_partials(output)  # the hidden unfinished manifest of a run killed outright
    try:
        manifest = export_all(model, config, output, batch_size=args.batch_size,
                              description=dict(description, members=args.members or None))
    except KeyboardInterrupt:
        # Before the earlier export's manifest is removed, or once this one's is written, the
        # folder holds an export whole: the one its manifest describes.
        raise KeyboardInterrupt(
            f"the export in {output} is whole (see its {MANIFEST_FILE})"
            if (output / MANIFEST_FILE).exists() else
            f"{output} holds no whole export (its {MANIFEST_FILE}, written last, is missing); "
            "rerun the same command to export") from None
    print(f"wrote {output}: {STABLEHLO_FILE} (symbolic batch), {SAVED_MODEL_DIR}/ "
          f"(signatures {manifest['saved_model']['signatures']}), "
          + (TFLITE_FILE if "file" in manifest["tflite"]
             else f"no TFLite ({manifest['tflite']['error'].splitlines()[0]})"))


if __name__ == "__main__":
    interrupted_in_one_line(main)()
