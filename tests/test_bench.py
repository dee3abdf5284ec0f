"""jaxseg.bench: the Keras twin matches the JAX U-Net, and the FLOP count helper works."""
import jax
import numpy as np
import pytest
from flax import nnx

from configs import smoke
from jaxseg import bench, losses, sharding
from jaxseg.models import create_model
from jaxseg.train_step import create_train_state, make_train_step


def test_keras_twin_has_the_same_parameter_count():
    c = smoke.get_config()  # 64 px, depth 3, 8 base features
    # Abstract shapes: counting needs no initialisation (eager init compiles every initialiser).
    jax_trainable, jax_stats = bench.jax_param_counts(nnx.eval_shape(lambda: create_model(c.model)))
    keras_counts = bench.keras_param_counts(bench.keras_unet(c.model, c.data.image_size))
    # The JAX upsampling keeps one bias per output phase (4*cout) where Conv2DTranspose has cout
    # (see jaxseg.models.unet.Upsample): 3*cout more per decoder level, nothing else differs.
    phase_biases = sum(3 * c.model.base_features * 2**i for i in range(c.model.depth))
    assert keras_counts == (jax_trainable - phase_biases, jax_stats)


def test_keras_loss_matches_jax_loss():
    rng = np.random.default_rng(0)
    logits = rng.normal(size=(2, 8, 8, 1)).astype(np.float32) * 3
    masks = rng.integers(0, 2, (2, 8, 8, 1)).astype(np.uint8)
    expected, _ = losses.segmentation_loss(logits, masks, np.ones(2, np.float32),
                                           ce_weight=1.0, dice_weight=0.5)
    per_image = bench.keras_loss(1.0, 0.5)(masks, logits)
    np.testing.assert_allclose(np.mean(per_image), expected, rtol=1e-5)


def test_train_step_flops_are_positive():
    # The smallest U-Net: XLA's CPU compile time grows with the number of layers.
    c = smoke.get_config()
    c.data.image_size, c.train.batch_size = 16, 2
    c.model.depth, c.model.base_features = 1, 4
    graphdef, state = nnx.eval_shape(lambda: create_train_state(c))
    step = make_train_step(graphdef, c, sharding.make_mesh(1))
    batch = jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype),
                         bench.synthetic_batch(c.train.batch_size, c.data.image_size))
    assert bench.step_flops(step, state, batch) > 0


def test_step_flops_of_a_matmul_are_2mkn():
    m, k, n = 32, 48, 16
    matmul = jax.jit(lambda a, b: a @ b)
    a, b = jax.ShapeDtypeStruct((m, k), np.float32), jax.ShapeDtypeStruct((k, n), np.float32)
    assert bench.step_flops(matmul, a, b) == 2 * m * k * n


def test_input_pipeline_rates_from_in_memory_sources(capsys):
    from fake_data import fake_source

    sources = ([fake_source(6, seed=0), fake_source(4, seed=1)], [1.0, 1.0])
    bench.input_bench(["--image_sizes", "32,48", "--workers", "1,2", "--batch_size", "4",
                       "--batches", "2", "--warmup", "1", "--repeats", "2", "--steps", "0"],
                      sources=sources)
    lines = capsys.readouterr().out.splitlines()
    assert lines[0].startswith("mixture: weights [1.0, 1.0] (source/? 6 + source/? 4 examples)")
    rates = [line for line in lines if line.startswith("pipeline ")]
    assert [r.split(":")[0] for r in rates] == [
        "pipeline 32x32 workers=1", "pipeline 32x32 workers=2",
        "pipeline 48x48 workers=1", "pipeline 48x48 workers=2"]
    assert all(float(r.split(": ")[1].split()[0]) > 0 for r in rates)


def test_input_refuses_a_batch_smaller_than_the_mixture(capsys):
    """Each dataset of the mixture needs a row of every batch: a traceback from TrainBatches."""
    from fake_data import fake_source

    sources = ([fake_source(6, seed=0), fake_source(4, seed=1)], [1.0, 1.0])
    with pytest.raises(SystemExit, match="^error: --batch_size 1: batch size 1 is smaller than the 2 mixed datasets$"):
        bench.input_bench(["--image_sizes", "32", "--workers", "1", "--batch_size", "1",
                           "--batches", "1", "--warmup", "0", "--repeats", "1", "--steps", "0"],
                          sources=sources)


def test_subcommands_are_registered():
    assert set(bench.SUBCOMMANDS) == {"train", "infer", "input"}
    with pytest.raises(SystemExit, match="infer,input"):
        bench.main(["nope"])


def test_help_and_counts_that_would_time_nothing(capsys, monkeypatch):
    # bench.main sets glibc's malloc options for train/input: not for the rest of this process.
    monkeypatch.setattr(bench.host_memory, "reuse_freed_memory", lambda: None)
    bench.main(["--help"])  # lists the subcommands, exit status 0
    assert "train  Train-step images/s" in capsys.readouterr().out
    # --steps 0 ended in an UnboundLocalError; --batch_size 0 silently meant the config's batch.
    for args in (["train", "--steps", "0"], ["train", "--batch_size", "0"],
                 ["input", "--image_sizes", ","], ["input", "--workers", "0"]):
        with pytest.raises(SystemExit) as exit_info:
            bench.main(args)
        assert exit_info.value.code == 2
        assert "must be at least 1" in capsys.readouterr().err or args[-1] == ","
    # --peak_tflops 0 divided by zero after the whole timing, nan and -1 printed nonsense.
    with monkeypatch.context() as patched:
        patched.setattr(bench, "_load_config", lambda gpu: pytest.fail("the benchmark started"))
        for peak in ("0", "-1", "nan", "inf"):
            with pytest.raises(SystemExit) as exit_info:
                bench.main(["train", "--gpu_config", "--peak_tflops", peak])
            assert exit_info.value.code == 2
            assert (f"--peak_tflops: must be a finite number above 0, got {peak}"
                    in capsys.readouterr().err)
    # A size the model cannot take is refused before minutes of compiling or timing.
    for args in (["train", "--image_size", "100"], ["input", "--image_sizes", "128,100"]):
        with pytest.raises(SystemExit,
                           match="^error: invalid config:\n  - data.image_size=100 must be divisible"):
            bench.main(args)
    # A mistyped photo size is refused before the model loads, not after minutes of timing.
    for size in ("800,600", "800x600x3", "0x600"):
        with pytest.raises(SystemExit) as exit_info:
            bench.main(["infer", "--photo_size", size])
        assert exit_info.value.code == 2
        assert "must be HEIGHTxWIDTH" in capsys.readouterr().err


@pytest.mark.parametrize("warmup", ["1", "0"])  # 0 (compilation timed) raised UnboundLocalError
def test_train_bench_times_jax_alone(capsys, warmup):
    bench.train(["--keras_jit", "none", "--image_size", "32", "--batch_size", "1",
                 "--repeats", "1", "--steps", "1", "--warmup", warmup])
    lines = capsys.readouterr().out.splitlines()
    rate = [line for line in lines if line.startswith("median images/s")]
    assert len(rate) == 1 and rate[0].startswith("median images/s jax: ")
    assert float(rate[0].split(": ")[1]) > 0
    assert not any("keras" in line for line in lines)


def test_infer_photo_path_times_a_height_by_width_photo_plain_and_refined(capsys, monkeypatch):
    """--photo_size is HEIGHTxWIDTH, and each figure is that of its own predictor (the clock is
    replaced: a refined call 'takes' 3 ms, a plain one 1 ms)."""
    import jaxseg.predict
    from jaxseg import bench_infer

    made = []

    class FakePredictor:
        def __init__(self, model, size, *, batch_size, refined):
            made.append((model, size, batch_size, refined))
            self.refined = refined

        def probabilities(self, photos):
            assert [p.shape for p in photos] == [(30, 20, 3)]
            return [np.zeros(p.shape[:2], np.float32) for p in photos]

    monkeypatch.setattr(jaxseg.predict, "Predictor", FakePredictor)
    monkeypatch.setattr(bench_infer, "_seconds",
                        lambda run, photos: 0.003 if run.__self__.refined else 0.001)
    args = bench_infer._parser().parse_args(["--photo_size", "30x20", "--repeats", "3",
                                             "--warmup", "1"])
    assert args.photo_size == (30, 20)
    assert bench_infer._parser().parse_args([]).photo_size == (800, 600)
    bench_infer._photo_path("model", 64, args)
    assert sorted(refined for *_, refined in made) == [False, True]
    assert all(m[:3] == ("model", 64, 1) for m in made)
    assert ("predict path, one 30x20 photo: 1.00 ms plain, 3.00 ms with --refine (+2.00 ms)"
            in capsys.readouterr().out)


def test_infer_reports_latency_from_batch_1_and_throughput_from_the_batch(capsys, monkeypatch):
    """The table's figures come from the right timings (the clock is replaced: a call 'takes'
    1 ms per image), for JAX and each export runner."""
    from jaxseg import bench_infer, export, inference

    c = smoke.get_config()
    c.data.image_size, c.model.depth, c.model.base_features = 16, 2, 4
    model = create_model(c.model)
    monkeypatch.setattr(inference, "load_or_exit", lambda *a: (model, c, "tiny"))
    monkeypatch.setattr(export, "export_all", lambda *a, **k: {"tflite": {}})
    monkeypatch.setattr(export, "runners", lambda *a, **k: {"other": {None: lambda x: x}})
    monkeypatch.setattr(bench_infer, "_seconds", lambda run, images: 1e-3 * len(images))
    monkeypatch.setattr(bench_infer, "_photo_path", lambda *a: None)
    bench_infer.main(["--batch_size", "4", "--repeats", "2", "--warmup", "1"])
    rows = {line.split()[0]: line.split()[1:] for line in capsys.readouterr().out.splitlines()
            if line.split() and line.split()[0] in ("jax", "other")}
    assert rows == {"jax": ["1.00", "1000.0"], "other": ["1.00", "1000.0"]}
