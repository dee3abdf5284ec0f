"""U-Net: output shape/dtype, exact parameter count by arithmetic, exact fast formulations."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from scipy import ndimage

from configs import default
from jaxseg import inference
from jaxseg.models import create_model
from jaxseg.models.unet import UNet, depth_to_space_2x2, max_pool_2x2, shift_map


def count_params(model):
    return sum(x.size for x in jax.tree.leaves(nnx.state(model, nnx.Param)))


def expected_params(depth, base, residual, upsample, num_classes, gates=False):
    """Independent arithmetic for the parameter count of the U-Net described in unet.py."""
    w = [base * 2**i for i in range(depth + 1)]

    def block(cin, cout):
        # two bias-free 3x3 convs, two norms with a scale and a bias per channel
        n = 9 * cin * cout + 9 * cout * cout + 2 * 2 * cout
        return n + (cin * cout if residual else 0)

    total = block(3, w[0]) + sum(block(w[i - 1], w[i]) for i in range(1, depth))
    total += block(w[depth - 1], w[depth])
    for i in range(depth):
        if upsample == "transpose":
            total += w[i + 1] * 4 * w[i] + 4 * w[i]
        else:
            total += 9 * w[i + 1] * w[i] + w[i]
        total += block(2 * w[i], w[i])
        if gates:  # 1x1 convs skip -> w/2 (no bias), decoder -> w/2 (bias), w/2 -> 1 (bias)
            inner = w[i] // 2
            total += w[i] * inner + (w[i] * inner + inner) + (inner + 1)
    return total + w[0] * num_classes + num_classes


@pytest.mark.parametrize("depth,base,norm,residual,upsample,classes,gates", [
    (4, 16, "batch", False, "transpose", 1, False),
    (3, 8, "group", True, "resize", 2, False),
    (4, 24, "batch", False, "transpose", 1, True),
])
def test_parameter_count_is_exact(depth, base, norm, residual, upsample, classes, gates):
    # Shapes only: a parameter count needs no values, and eager initialisation of a depth-4
    # U-Net compiles each initialiser (about 20 s on two cores).
    model = nnx.eval_shape(lambda: UNet(
        depth=depth, base_features=base, norm=norm, residual=residual, upsample=upsample,
        num_classes=classes, attention_gates=gates, rngs=nnx.Rngs(0)))
    # BatchNorm's running statistics are not Params and are not counted.
    assert count_params(model) == expected_params(depth, base, residual, upsample, classes, gates)


def test_attention_gates_scale_each_skip_by_a_learned_per_pixel_weight():
    gated = UNet(depth=2, base_features=4, attention_gates=True, rngs=nnx.Rngs(0))
    gate = gated.gates[0]
    skip = jax.random.normal(jax.random.key(1), (2, 8, 8, 8))
    decoder = jax.random.normal(jax.random.key(2), (2, 8, 8, 8))
    weight = jax.nn.sigmoid(gate.psi(jax.nn.relu(gate.theta(skip) + gate.phi(decoder))))
    assert weight.shape == (2, 8, 8, 1)
    np.testing.assert_allclose(gate(skip, decoder), skip * weight, rtol=1e-6)
    # The gates are in the forward pass: with every other weight the plain U-Net's, the output
    # is the plain one's only once the gates are taken out.
    plain = UNet(depth=2, base_features=4, rngs=nnx.Rngs(1))
    nnx.update(gated, nnx.state(plain))
    images = jax.random.randint(jax.random.key(3), (1, 16, 16, 3), 0, 256).astype(jnp.uint8)
    out = gated(images)
    assert out.shape == (1, 16, 16, 1)
    assert not np.allclose(out, plain(images), atol=1e-4)
    gated.gates = nnx.List([])
    np.testing.assert_allclose(gated(images), plain(images), rtol=1e-5, atol=1e-5)


def test_a_residual_block_adds_its_projected_input():
    from jaxseg.models.unet import ConvBlock

    block = ConvBlock(3, 4, norm="batch", residual=True, dtype=jnp.float32, rngs=nnx.Rngs(0))
    x = jnp.asarray(np.random.default_rng(0).normal(size=(2, 8, 8, 3)), jnp.float32)
    inner = jax.nn.relu(block.norm1(block.conv1(x), use_running_average=True))
    body = block.norm2(block.conv2(inner), use_running_average=True)
    np.testing.assert_allclose(block(x, train=False), jax.nn.relu(body + block.shortcut(x)),
                               rtol=1e-5, atol=1e-6)
    assert not np.allclose(block(x, train=False), jax.nn.relu(body), atol=1e-3)


def test_batch_norm_keeps_running_statistics_with_momentum_0_9():
    """A training call moves each running mean a tenth of the way to the batch's mean (and the
    variance likewise): evaluation normalises by these, so a slower average (flax's default,
    0.99) leaves a short run's model evaluated with statistics near their initial 0 and 1."""
    from jaxseg.models.unet import ConvBlock

    block = ConvBlock(3, 4, norm="batch", residual=False, dtype=jnp.float32, rngs=nnx.Rngs(0))
    x = jnp.asarray(np.random.default_rng(0).normal(size=(2, 8, 8, 3)) * 5 + 2, jnp.float32)
    features = np.asarray(block.conv1(x), np.float64)
    block(x, train=True)
    np.testing.assert_allclose(block.norm1.mean[...], 0.1 * features.mean(axis=(0, 1, 2)),
                               rtol=1e-4, atol=1e-6)
    np.testing.assert_allclose(block.norm1.var[...], 0.9 + 0.1 * features.var(axis=(0, 1, 2)),
                               rtol=1e-4)


def test_a_config_without_the_attention_field_builds_the_plain_model():
    from jaxseg.inference import config_from_json

    stored = default.get_config().to_dict()
    del stored["model"]["attention_gates"]  # as in model cards written before the option
    assert len(create_model(config_from_json(stored).model).gates) == 0


def test_output_shape_and_dtype_at_any_resolution():
    model = UNet(depth=3, base_features=8, rngs=nnx.Rngs(0))
    for size in (64, 96):
        out = model(jnp.zeros((2, size, size, 3), jnp.uint8))
        assert out.shape == (2, size, size, 1) and out.dtype == jnp.float32
    two = UNet(depth=3, base_features=8, num_classes=2, rngs=nnx.Rngs(0))
    assert two(jnp.zeros((1, 64, 64, 3), jnp.uint8)).shape == (1, 64, 64, 2)


def test_bfloat16_compute_keeps_float32_params_and_logits():
    model = UNet(depth=2, base_features=8, dtype=jnp.bfloat16, rngs=nnx.Rngs(0))
    assert all(x.dtype == jnp.float32 for x in jax.tree.leaves(nnx.state(model, nnx.Param)))
    image = jnp.zeros((1, 32, 32, 3), jnp.uint8)
    assert model(image).dtype == jnp.float32
    # The convolutions themselves compute in bfloat16.
    convs = [e for e in jax.make_jaxpr(lambda x: model(x))(image).eqns
             if e.primitive.name == "conv_general_dilated"]
    assert convs and all(e.outvars[0].aval.dtype == jnp.bfloat16 for e in convs)


@pytest.mark.skipif(jax.default_backend() != "cpu", reason="the CPU rule")
def test_bfloat16_config_computes_float32_on_cpu():
    config = default.get_config().model
    config.compute_dtype = "bfloat16"
    assert create_model(config).dtype == jnp.float32


def test_size_not_divisible_is_a_clear_error():
    model = UNet(depth=3, base_features=8, rngs=nnx.Rngs(0))
    for shape in ((1, 60, 64, 3), (1, 64, 60, 3)):  # the height, or the width alone
        with pytest.raises(ValueError, match="divisible by 2\\*\\*depth = 8"):
            model(jnp.zeros(shape, jnp.uint8))


def test_max_pool_equals_reduce_window_max_pool():
    x = jax.random.normal(jax.random.key(0), (2, 8, 6, 3))
    ref = nnx.max_pool(x, (2, 2), strides=(2, 2))
    np.testing.assert_array_equal(max_pool_2x2(x), ref)


def test_depth_to_space_conv_equals_transposed_conv():
    cin, cout = 5, 3
    x = jax.random.normal(jax.random.key(1), (2, 4, 4, cin))
    transposed = nnx.ConvTranspose(cin, cout, (2, 2), strides=(2, 2), padding="VALID",
                                   rngs=nnx.Rngs(0))
    # The same linear map: a 1x1 conv to 4*cout channels, weights from the (flipped) 2x2 kernel.
    w = transposed.kernel[...][::-1, ::-1].transpose(2, 0, 1, 3).reshape(cin, 4 * cout)
    b = jnp.tile(transposed.bias[...], 4)
    ours = depth_to_space_2x2(x @ w + b)
    np.testing.assert_allclose(ours, transposed(x), rtol=1e-5, atol=1e-5)


def test_resize_upsampling_convolves_the_nearest_neighbour_enlargement():
    """upsample='resize': output pixel (y, x) comes from input pixel (y // 2, x // 2), then the
    3x3 convolution; checked on a non-square map, whose axes cannot be confused."""
    from jaxseg.models.unet import Upsample

    up = Upsample(3, 2, mode="resize", dtype=jnp.float32, rngs=nnx.Rngs(0))
    x = np.random.default_rng(0).normal(size=(2, 3, 5, 3)).astype(np.float32)
    nearest = x[:, np.arange(6) // 2][:, :, np.arange(10) // 2]
    np.testing.assert_allclose(up(jnp.asarray(x)), up.conv(jnp.asarray(nearest)), rtol=1e-6)


def test_dropout_needs_a_key_only_in_training():
    model = UNet(depth=2, base_features=4, dropout=0.5, rngs=nnx.Rngs(0))
    x = jax.random.randint(jax.random.key(0), (1, 16, 16, 3), 0, 255).astype(jnp.uint8)
    a = model(x, train=True, dropout_key=jax.random.key(1))
    b = model(x, train=True, dropout_key=jax.random.key(2))
    assert not np.allclose(a, b)
    # Out of training, dropout is off: the same weights without dropout give the same logits.
    twin = UNet(depth=2, base_features=4, dropout=0.0, rngs=nnx.Rngs(5))
    nnx.update(twin, nnx.state(model, nnx.Param), nnx.state(model, nnx.BatchStat))
    np.testing.assert_array_equal(model(x), twin(x))
    with pytest.raises(ValueError, match="no `rngs` argument was provided to Dropout"):
        model(x, train=True)


@pytest.mark.parametrize("shift", [(0.5, 0.0), (-1.25, 0.75), (2.0, -0.3)])
def test_shift_map_matches_scipy(shift):
    """shift_map reads further down/right bilinearly with repeated edges: scipy's order-1 shift
    by the opposite amount with mode='nearest' is the independent reference."""
    x = np.random.default_rng(0).normal(size=(2, 7, 9, 1)).astype(np.float32)
    expected = ndimage.shift(x, (0, -shift[0], -shift[1], 0), order=1, mode="nearest")
    np.testing.assert_allclose(shift_map(jnp.asarray(x), shift), expected, atol=1e-5)


def test_output_shift_moves_the_logits_out_of_training_only():
    shifted = UNet(depth=2, base_features=4, output_shift=(0.5, 0.0), rngs=nnx.Rngs(0))
    plain = UNet(depth=2, base_features=4, rngs=nnx.Rngs(0))
    x = jax.random.randint(jax.random.key(0), (2, 16, 16, 3), 0, 255).astype(jnp.uint8)
    expected = ndimage.shift(np.asarray(plain(x)), (0, -0.5, 0, 0), order=1, mode="nearest")
    np.testing.assert_allclose(shifted(x), expected, atol=1e-5)
    np.testing.assert_array_equal(shifted(x, train=True), plain(x, train=True))
    # The config field reaches the model, and a stored config without it builds an unshifted one.
    config = default.get_config()
    config.model.output_shift = (0.5, 0.0)
    assert create_model(config.model).output_shift == (0.5, 0.0)
    stored = config.to_dict()
    del stored["model"]["output_shift"]
    assert create_model(inference.config_from_json(stored).model).output_shift == (0.0, 0.0)


def test_the_model_normalises_rgb_pixels_by_the_imagenet_statistics():
    """The first convolution sees (pixel / 255 - mean) / std with ImageNet's RGB statistics, in
    RGB order: pretrained weights and every caller rely on it."""
    model = UNet(depth=2, base_features=4, rngs=nnx.Rngs(0))
    first = model.down[0].conv1
    seen = []

    class Recorder(nnx.Module):
        def __init__(self, conv):
            self.conv = conv

        def __call__(self, x):
            seen.append(np.asarray(x))
            return self.conv(x)

    model.down[0].conv1 = Recorder(first)
    images = np.random.default_rng(0).integers(0, 256, (1, 8, 8, 3), dtype=np.uint8)
    model(jnp.asarray(images))
    mean, std = np.array([0.485, 0.456, 0.406]), np.array([0.229, 0.224, 0.225])
    np.testing.assert_allclose(seen[0], (images / 255 - mean) / std, rtol=1e-5, atol=1e-5)


def test_an_open_attention_gate_passes_the_skip_itself():
    """Gates that let the whole skip through (sigmoid = 1) give the plain U-Net with the same
    weights: each gate is applied to the skip, driven by the decoder feature, not the reverse."""
    gated = UNet(depth=2, base_features=4, attention_gates=True, rngs=nnx.Rngs(0))
    plain = UNet(depth=2, base_features=4, rngs=nnx.Rngs(1))
    nnx.update(gated, nnx.state(plain))
    for gate in gated.gates:
        gate.psi.kernel[...] = jnp.zeros_like(gate.psi.kernel[...])
        gate.psi.bias[...] = jnp.full_like(gate.psi.bias[...], 40.0)  # sigmoid(40) == 1 in float32
    images = jax.random.randint(jax.random.key(3), (2, 16, 16, 3), 0, 256).astype(jnp.uint8)
    np.testing.assert_allclose(gated(images), plain(images), rtol=1e-5, atol=1e-5)


def test_create_model_builds_what_the_config_describes():
    config = default.get_config().model
    config.update(depth=3, base_features=4, norm="group", residual=True, dropout=0.3,
                  upsample="resize", num_classes=2, attention_gates=True)
    model = create_model(config)
    assert len(model.down) == len(model.up) == len(model.gates) == 3
    assert isinstance(model.down[0].norm1, nnx.GroupNorm) and model.down[0].shortcut is not None
    assert all(up.mode == "resize" for up in model.up) and model.dropout.rate == 0.3
    assert count_params(model) == expected_params(3, 4, True, "resize", 2, gates=True)
    assert model(jnp.zeros((1, 16, 16, 3), jnp.uint8)).shape == (1, 16, 16, 2)


@pytest.mark.parametrize("base_features", [4, 16])
def test_group_norm_normalises_min_8_groups_of_channels(base_features):
    """model.norm='group' splits each width into min(8, width) groups (as config_check tells the
    user): each group of channels is normalised over space and its channels together, checked
    against numpy on channels of very different scales."""
    config = default.get_config().model
    config.update(depth=1, base_features=base_features, norm="group")
    norm = create_model(config).down[0].norm1
    scales = np.arange(1, base_features + 1)
    x = np.random.default_rng(0).normal(size=(2, 5, 5, base_features)) * scales
    groups = x.reshape(2, 5, 5, min(8, base_features), -1)
    mean = groups.mean(axis=(1, 2, 4), keepdims=True)
    expected = (groups - mean) / np.sqrt(groups.var(axis=(1, 2, 4), keepdims=True) + 1e-6)
    np.testing.assert_allclose(norm(jnp.asarray(x, jnp.float32)), expected.reshape(x.shape),
                               rtol=1e-4, atol=1e-4)


def test_create_model_initialises_from_the_seed():
    config = default.get_config().model
    config.update(depth=2, base_features=4)
    params = [jax.tree.leaves(nnx.state(create_model(config, seed=s), nnx.Param)) for s in (0, 0, 1)]
    assert all(np.array_equal(a, b) for a, b in zip(params[0], params[1]))
    assert not any(np.array_equal(a, c) for a, c in zip(params[0], params[2]) if a.ndim > 1)
