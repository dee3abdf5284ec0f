"""Exports (StableHLO, SavedModel, TFLite) compute what the JAX model computes, and the TF forms
run in a Python that has neither jaxseg nor flax."""
import json
import os
import subprocess
import sys

import numpy as np
import pytest
from flax import nnx

import fixtures_data as fx
from fake_data import tiny_config
from jaxseg import export, inference, resolution
from jaxseg.models import create_model

SIZE = tiny_config().data.image_size
BATCH = 3
# Tolerances on probabilities. The XLA forms (StableHLO through JAX, SavedModel through TF's XLA)
# run the same StableHLO, but another compilation (weights as constants or arguments, another XLA
# version) may fuse and reassociate float32 sums differently: a few ulp per layer. TFLite runs
# other kernels (XNNPACK convolutions, its own sigmoid). Measured on this model: <= 1e-6 (XLA) and
# <= 2e-6 (TFLite); 1e-5 and 1e-4 leave >= 10x headroom for other CPUs' vector widths, while a real
# discrepancy (normalisation, channel order, a layer) moves probabilities spread over (0, 1) by
# far more.
XLA_ATOL = 1e-5
TFLITE_ATOL = 1e-4


def random_model(config):
    """A freshly initialised model made less trivial than at initialisation: random batch statistics
    (inference-mode normalisation is then not the identity) and a larger head (random logits are
    then spread over the sigmoid's range instead of giving P(person) ~ 0.5 everywhere)."""
    model = create_model(config.model, seed=1)
    rng = np.random.default_rng(1)
    for _, module in nnx.iter_modules(model):
        if isinstance(module, nnx.BatchNorm):
            shape = module.mean[...].shape
            module.mean[...] = rng.normal(0, 0.1, shape).astype(np.float32)
            module.var[...] = rng.uniform(0.5, 2, shape).astype(np.float32)
    model.head.kernel[...] = np.asarray(model.head.kernel[...]) * 50
    return model


@pytest.fixture(scope="module")
def exported(tmp_path_factory):
    """(export folder, manifest, reference fn) for a tiny random model round-tripped via save_pretrained."""
    root = tmp_path_factory.mktemp("export")
    config = tiny_config()
    inference.save_pretrained(random_model(config), config, {"steps": 0}, root / "pretrained")
    model, config, _ = inference.load_pretrained(root / "pretrained")
    manifest = export.export_all(model, config, root / "out", batch_size=BATCH)
    # The reference is jaxseg's own inference on the model, not the function that was exported.
    return root / "out", manifest, lambda images: np.asarray(
        inference.person_probabilities(model, images))


@pytest.fixture(scope="module")
def photos(manual_dir):
    """BATCH real test photos resized to the model resolution by the shared rule."""
    from jaxseg import datasets

    source = datasets.data_source("portrait_segmentation", "test")
    return np.stack([resolution.resize_image(source[i]["image"], SIZE) for i in range(BATCH)])


def test_manifest_describes_every_form(exported):
    out, manifest, _ = exported
    assert manifest == json.loads((out / export.MANIFEST_FILE).read_text())
    assert (manifest["input"]["shape"], manifest["input"]["dtype"]) == (["batch", SIZE, SIZE, 3], "uint8")
    assert (manifest["output"]["shape"], manifest["output"]["dtype"]) == (["batch", SIZE, SIZE], "float32")
    assert manifest["stablehlo"]["batch"] == "symbolic"
    assert manifest["saved_model"]["signatures"] == {"serving_default": 1, f"batch_{BATCH}": BATCH}
    # TFLite converts with this TensorFlow; if a later one cannot, the reason must be recorded.
    assert "file" in manifest["tflite"], manifest["tflite"]


def test_a_failed_conversion_leaves_no_earlier_tflite(exported, tmp_path, monkeypatch):
    """Exporting again into a folder: a TFLite file left from before would pass for this model's."""
    import shutil

    out, _, _ = exported
    again = tmp_path / "again"
    shutil.copytree(out, again)
    model, config, _ = inference.load_pretrained(out.parent / "pretrained")

    def broken(*args):
        raise RuntimeError("converter broke")

    monkeypatch.setattr(export, "convert_tflite", broken)
    manifest = export.export_all(model, config, again, batch_size=BATCH)
    assert manifest["tflite"] == {"error": "RuntimeError: converter broke"}
    assert not (again / export.TFLITE_FILE).exists()


def test_a_failed_export_leaves_no_earlier_manifest(exported, tmp_path, monkeypatch):
    """Exporting again into a folder and failing after the StableHLO file: the earlier manifest
    would still describe the folder as a whole export, of which that file is now another model's."""
    import shutil

    out, _, _ = exported
    again = tmp_path / "again"
    shutil.copytree(out, again)
    config = tiny_config()

    def broken(*args):
        raise RuntimeError("SavedModel broke")

    monkeypatch.setattr(export, "save_saved_model", broken)
    with pytest.raises(RuntimeError, match="SavedModel broke"):
        export.export_all(create_model(config.model, seed=2), config, again, batch_size=BATCH)
    assert (again / export.STABLEHLO_FILE).read_bytes() != (out / export.STABLEHLO_FILE).read_bytes()
    assert not (again / export.MANIFEST_FILE).exists()


def test_exports_match_jax_on_real_photos(exported, photos):
    out, _, reference = exported
    forms = export.runners(out)
    tolerance = {"stablehlo": XLA_ATOL, "saved_model": XLA_ATOL, "tflite": TFLITE_ATOL}
    assert set(forms) == set(tolerance)
    for images in (photos[:1], photos):
        want = reference(images)
        # Probabilities spread over (0, 1), so that a wrong form could not pass by chance.
        assert want.shape == (len(images), SIZE, SIZE) and want.std() > 0.1
        for name, by_batch in forms.items():
            got = by_batch.get(len(images), by_batch.get(None))(images)
            assert got.dtype == np.float32 and got.shape == want.shape, name
            np.testing.assert_allclose(got, want, rtol=0, atol=tolerance[name], err_msg=name)
    # The symbolic batch of the StableHLO form takes batch sizes no signature was made for.
    np.testing.assert_allclose(forms["stablehlo"][None](photos[:2]), reference(photos[:2]),
                               rtol=0, atol=XLA_ATOL)


# Runs in a fresh interpreter with only TensorFlow and NumPy: loads both TF forms, runs them on
# images.npy, saves what each returns and prints which of flax and jaxseg got imported. JAX is made
# unimportable first, as on a serving machine without it (TFLite's own optional `from jax import
# jit` then falls back as designed).
TF_ONLY_SCRIPT = """
import json, sys
sys.modules["jax"] = None
import numpy as np
import tensorflow as tf

images = np.load("images.npy")
manifest = json.load(open("out/export.json"))
model = tf.saved_model.load("out/" + manifest["saved_model"]["dir"])
outputs = {"saved_model": model.signatures["serving_default"](images=tf.constant(images[:1]))}
runner = tf.lite.Interpreter("out/" + manifest["tflite"]["file"]).get_signature_runner("batch_%d")
outputs["tflite"] = runner(images=images)
np.savez("outputs.npz", **{k: np.asarray(v["probabilities"]) for k, v in outputs.items()})
print(json.dumps([m for m in ("flax", "jaxseg") if m in sys.modules]))
""" % BATCH


def test_tf_forms_run_without_jax_flax_or_jaxseg(exported, tmp_path):
    out, _, reference = exported
    images = np.random.default_rng(0).integers(0, 256, (BATCH, SIZE, SIZE, 3), dtype=np.uint8)
    np.save(tmp_path / "images.npy", images)
    (tmp_path / "out").symlink_to(out)
    # Neither the repository nor the test's XLA flags reach the child.
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "XLA_FLAGS")}
    result = subprocess.run([sys.executable, "-c", TF_ONLY_SCRIPT], cwd=tmp_path, env=env,
                            capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    assert json.loads(result.stdout.strip().splitlines()[-1]) == []
    got = np.load(tmp_path / "outputs.npz")
    np.testing.assert_allclose(got["saved_model"], reference(images[:1]), rtol=0, atol=XLA_ATOL)
    np.testing.assert_allclose(got["tflite"], reference(images), rtol=0, atol=TFLITE_ATOL)



def test_an_output_that_cannot_be_created_is_refused_before_loading(tmp_path, monkeypatch):
    from jaxseg import export, inference

    def load(*_):
        raise AssertionError("the model was loaded before --output was checked")

    monkeypatch.setattr(inference, "load_or_exit", load)
    (tmp_path / "file").write_text("")
    with pytest.raises(SystemExit, match=r"--output .*file/sub: cannot create it \(Not a dir"):
        export.main(["--output", str(tmp_path / "file" / "sub")])
    with pytest.raises(SystemExit, match="exists and is not a folder"):
        export.main(["--output", str(tmp_path / "file")])
    with pytest.raises(SystemExit, match="--output: give the folder"):  # "" is not the cwd
        export.main(["--output="])
    monkeypatch.chdir(tmp_path)  # pathlib made gs://b/x the local folder gs:/b/x
    with pytest.raises(SystemExit, match="--output gs://b/x: give a local folder"):
        export.main(["--output", "gs://b/x"])
    assert not (tmp_path / "gs:").exists()


def test_a_model_that_cannot_be_loaded_leaves_no_empty_output(tmp_path):
    from jaxseg import export

    with pytest.raises(SystemExit, match="nowhere"):
        export.main(["--workdir", str(tmp_path / "nowhere"), "--output", str(tmp_path / "out")])
    assert not (tmp_path / "out").exists()
    # Nor the missing folders above it that it created too.
    with pytest.raises(SystemExit, match="nowhere"):
        export.main(["--workdir", str(tmp_path / "nowhere"), "--output", str(tmp_path / "a" / "b")])
    assert not (tmp_path / "a").exists()
    (tmp_path / "mine").mkdir()  # a folder the user made stays
    with pytest.raises(SystemExit, match="nowhere"):
        export.main(["--workdir", str(tmp_path / "nowhere"), "--output", str(tmp_path / "mine")])
    assert (tmp_path / "mine").is_dir()


def test_a_ctrl_c_while_loading_leaves_no_empty_output(tmp_path, monkeypatch):
    from jaxseg import export

    def interrupted(*args):
        assert (tmp_path / "a" / "b").is_dir()  # made to check that it can be written
        raise KeyboardInterrupt

    monkeypatch.setattr(inference, "load_or_exit", interrupted)
    with pytest.raises(KeyboardInterrupt):
        export.main(["--output", str(tmp_path / "a" / "b")])
    assert not (tmp_path / "a").exists()


def test_a_home_relative_output_is_written_in_home(tmp_path, monkeypatch, capsys):
    from jaxseg import export

    written = []
    monkeypatch.setattr(export, "export_all", lambda model, config, output, **_: written.append(output)
                        or {"saved_model": {"signatures": []}, "tflite": {"file": "x"}})
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    monkeypatch.chdir(tmp_path)
    export.main(["--output=~/exported", "--members=1"])
    assert [str(p) for p in written] == [str(tmp_path / "home" / "exported")]
    assert str(tmp_path / "home" / "exported") in capsys.readouterr().out
    assert not (tmp_path / "~").exists()


def test_the_unfinished_manifest_of_a_killed_export_is_removed(tmp_path, monkeypatch):
    """An export killed outright (SIGKILL) while writing export.json left its hidden partial file
    in --output for good; the next export there removes it, and keeps a user's hidden files."""
    import subprocess
    import sys

    from jaxseg import export

    gone = subprocess.Popen([sys.executable, "-c", ""])
    gone.wait()
    out = tmp_path / "out"
    out.mkdir()
    left = out / f".jaxseg-{gone.pid}-0123456789ab.partial.json"
    left.write_text("{")
    mine = out / ".notes.json"
    mine.write_text("{}")
    monkeypatch.setattr(export, "export_all", lambda *_, **__: {"saved_model": {"signatures": []},
                                                               "tflite": {"file": "x"}})
    export.main(["--members=1", "--output", str(out)])
    assert not left.exists() and mine.read_text() == "{}"


# `python -m jaxseg.export ARGS...` with the "pretrained" model taken from the folder given as the
# first argument, where the StableHLO form, once written, says so on stderr and then waits for a
# Ctrl-C.
WAITING_EXPORT = """
import pathlib, runpy, signal, sys, time
# As under a terminal: a test run in the background starts it with SIGINT ignored.
signal.signal(signal.SIGINT, signal.default_int_handler)
from jaxseg import inference
inference.PRETRAINED_DIR = pathlib.Path(sys.argv.pop(1))
write_bytes = pathlib.Path.write_bytes
def waiting(path, data):
    written = write_bytes(path, data)
    if path.name == "model.stablehlo":
        print("waiting for Ctrl-C", file=sys.stderr, flush=True)
        time.sleep(60)
    return written
pathlib.Path.write_bytes = waiting
sys.argv[0] = "jaxseg.export"
runpy.run_module("jaxseg.export", run_name="__main__", alter_sys=True)
"""


def test_ctrl_c_is_one_line_saying_the_export_is_not_whole(tmp_path):
    """A Ctrl-C ended an export with a KeyboardInterrupt traceback."""
    config = tiny_config()
    inference.save_pretrained(create_model(config.model, seed=1), config, {"steps": 0},
                              tmp_path / "pretrained")
    out = tmp_path / "out"
    proc = subprocess.Popen([sys.executable, "-c", WAITING_EXPORT, str(tmp_path / "pretrained"),
                             "--output", str(out)], stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)
    _, err = fx.ctrl_c_once_said(proc)
    assert err.splitlines()[-1] == (
        f"interrupted: {out} holds no whole export (its {export.MANIFEST_FILE}, written last, is "
        "missing); rerun the same command to export"), err[-2000:]
    assert not (out / export.MANIFEST_FILE).exists() and not list(out.glob(".jaxseg-*"))


def test_a_negative_member_count_is_a_usage_error(tmp_path, capsys):
    from jaxseg import export

    with pytest.raises(SystemExit):
        export.main(["--members=-1", "--output", str(tmp_path / "out")])
    assert "--members: must be at least 0, got -1" in capsys.readouterr().err
    assert not (tmp_path / "out").exists()  # refused before anything was made


def test_the_command_line_forwards_its_model_and_batch_options(tmp_path, monkeypatch):
    from jaxseg import export, inference

    loaded, exported = [], []
    monkeypatch.setattr(inference, "load_or_exit", lambda *args: loaded.append(args)
                        or ("model", "config", {"source": "s", "checkpoint_step": 7}))
    monkeypatch.setattr(export, "export_all", lambda model, config, output, **options:
                        exported.append((model, config, output, options))
                        or {"saved_model": {"signatures": {}}, "tflite": {"file": "x"}})
    export.main(["--workdir", str(tmp_path / "w"), "--checkpoint", "7", "--batch_size", "5",
                 "--output", str(tmp_path / "a")])
    export.main(["--members", "2", "--output", str(tmp_path / "b")])
    assert loaded == [(str(tmp_path / "w"), "7", 0), (None, "best", 2)]
    assert exported == [
        ("model", "config", tmp_path / "a",
         {"batch_size": 5, "description": {"source": "s", "checkpoint_step": 7, "members": None}}),
        ("model", "config", tmp_path / "b",
         {"batch_size": 8, "description": {"source": "s", "checkpoint_step": 7, "members": 2}})]
