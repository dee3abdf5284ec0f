"""A Flax NNX U-Net for binary person segmentation.

Two formulations are chosen for speed on CPU backends: 2x2/stride-2 max-pooling is a reshape and
a max (exactly nnx.max_pool; XLA's generic reduce_window backward is slow), and the 2x2/stride-2
transposed convolution is a 1x1 convolution to 4x the channels followed by a depth-to-space
rearrangement (fast gradients). The latter has the same kernel parameters as ConvTranspose and one
bias per output phase (4*cout instead of cout): with equal phase biases it is exactly
nnx.ConvTranspose (tests/test_model.py), and it can represent a little more.
"""
from __future__ import annotations

import math

import jax
import jax.numpy as jnp
from flax import nnx

# Images arrive as uint8 RGB; the model owns its input normalisation so that every caller
# (training, evaluation, prediction, exports) feeds raw pixels the same way.
_RGB_MEAN = (0.485 * 255, 0.456 * 255, 0.406 * 255)
_RGB_STD = (0.229 * 255, 0.224 * 255, 0.225 * 255)


def max_pool_2x2(x: jax.Array) -> jax.Array:
    """2x2 max-pooling with stride 2 (NHWC, even H and W)."""
    b, h, w, c = x.shape
    return x.reshape(b, h // 2, 2, w // 2, 2, c).max(axis=(2, 4))


def depth_to_space_2x2(x: jax.Array) -> jax.Array:
    """Rearranges (B, H, W, 4C) into (B, 2H, 2W, C); channel index = (dy * 2 + dx) * C + c."""
    b, h, w, c4 = x.shape
    c = c4 // 4
    x = x.reshape(b, h, w, 2, 2, c).transpose(0, 1, 3, 2, 4, 5)
    return x.reshape(b, 2 * h, 2 * w, c)


def shift_map(x: jax.Array, shift: tuple[float, float]) -> jax.Array:
    """(B, H, W, C) maps read `shift` = (dy, dx) pixels further down and right: out[y, x] =
    x[y + dy, x + dx], bilinear between pixels, the edge rows and columns repeated beyond them."""
    for axis, distance in ((1, shift[0]), (2, shift[1])):
        if not distance:
            continue
        whole = math.floor(distance)
        fraction = distance - whole
        n = x.shape[axis]
        pad = abs(whole) + 1
        padded = jnp.pad(x, [(pad, pad) if a == axis else (0, 0) for a in range(x.ndim)], mode="edge")
        start = pad + whole
        x = ((1 - fraction) * jax.lax.slice_in_dim(padded, start, start + n, axis=axis)
             + fraction * jax.lax.slice_in_dim(padded, start + 1, start + 1 + n, axis=axis))
    return x


def _norm(kind: str, features: int, dtype, rngs: nnx.Rngs) -> nnx.Module:
    if kind == "batch":
        return nnx.BatchNorm(features, momentum=0.9, dtype=dtype, rngs=rngs)
    if kind == "group":
        return nnx.GroupNorm(features, num_groups=min(8, features), dtype=dtype, rngs=rngs)
    raise ValueError(f"unknown normalisation {kind!r}: use 'batch' or 'group'")


class ConvBlock(nnx.Module):
    """Two 3x3 conv -> norm -> ReLU layers, optionally with a residual (1x1-projected) shortcut."""

    def __init__(self, cin: int, cout: int, *, norm: str, residual: bool, dtype, rngs: nnx.Rngs):
        self.conv1 = nnx.Conv(cin, cout, (3, 3), use_bias=False, dtype=dtype, rngs=rngs)
        self.norm1 = _norm(norm, cout, dtype, rngs)
        self.conv2 = nnx.Conv(cout, cout, (3, 3), use_bias=False, dtype=dtype, rngs=rngs)
        self.norm2 = _norm(norm, cout, dtype, rngs)
        self.shortcut = (
            nnx.Conv(cin, cout, (1, 1), use_bias=False, dtype=dtype, rngs=rngs) if residual else None
        )

    def __call__(self, x: jax.Array, train: bool) -> jax.Array:
        y = jax.nn.relu(self._apply_norm(self.norm1, self.conv1(x), train))
        y = self._apply_norm(self.norm2, self.conv2(y), train)
        if self.shortcut is not None:
            y = y + self.shortcut(x)
        return jax.nn.relu(y)

    @staticmethod
    def _apply_norm(norm: nnx.Module, x: jax.Array, train: bool) -> jax.Array:
        if isinstance(norm, nnx.BatchNorm):
            return norm(x, use_running_average=not train)
        return norm(x)


class Upsample(nnx.Module):
    """2x upsampling: 'transpose' or 'resize' (nearest + 3x3 conv).

    'transpose' is a 2x2/stride-2 transposed conv computed as a 1x1 conv to 4x the channels and
    depth-to-space (XLA:CPU's backward pass of ConvTranspose is slow). Its bias is per output
    sub-pixel: 3 * cout parameters more than a ConvTranspose, whose bias is per channel.
    """

    def __init__(self, cin: int, cout: int, *, mode: str, dtype, rngs: nnx.Rngs):
        if mode not in ("transpose", "resize"):
            raise ValueError(f"unknown upsampling {mode!r}: use 'transpose' or 'resize'")
        self.mode = mode
        if mode == "transpose":
            self.conv = nnx.Conv(cin, 4 * cout, (1, 1), dtype=dtype, rngs=rngs)
        else:
            self.conv = nnx.Conv(cin, cout, (3, 3), dtype=dtype, rngs=rngs)

    def __call__(self, x: jax.Array) -> jax.Array:
        if self.mode == "transpose":
            return depth_to_space_2x2(self.conv(x))
        return self.conv(jnp.repeat(jnp.repeat(x, 2, axis=1), 2, axis=2))


class AttentionGate(nnx.Module):
    """Additive attention gate on a skip connection (Oktay et al. 2018, "Attention U-Net").

    The decoder feature that meets the skip (its upsampled output, same size) decides, per pixel,
    how much of the skip passes: skip * sigmoid(psi(relu(theta(skip) + phi(gate)))), with 1x1
    convolutions to half the skip's channels. A gate starts nearly open (sigmoid(0) = 0.5 times
    the skip), so an untrained gated U-Net is a U-Net with skips scaled by about a half.
    """

    def __init__(self, skip_features: int, gate_features: int, *, dtype, rngs: nnx.Rngs):
        inner = max(1, skip_features // 2)
        self.theta = nnx.Conv(skip_features, inner, (1, 1), use_bias=False, dtype=dtype, rngs=rngs)
        self.phi = nnx.Conv(gate_features, inner, (1, 1), dtype=dtype, rngs=rngs)
        self.psi = nnx.Conv(inner, 1, (1, 1), dtype=dtype, rngs=rngs)

    def __call__(self, skip: jax.Array, gate: jax.Array) -> jax.Array:
        weight = jax.nn.sigmoid(self.psi(jax.nn.relu(self.theta(skip) + self.phi(gate))))
        return skip * weight


class UNet(nnx.Module):
    """U-Net: `depth` 2x downsamplings, widths base * 2**level, skip connections by concatenation.

    Input: uint8 or float RGB images (B, H, W, 3) in 0..255, H and W divisible by 2**depth.
    Output: float32 logits (B, H, W, num_classes); num_classes 1 = sigmoid person logit,
    2 = softmax over (background, person). `attention_gates`: each skip passes through an
    AttentionGate driven by the decoder feature it joins. `output_shift` (dy, dx): model pixels
    by which the trained model's output lies below and right of its input (models trained on
    masks resized by their blocks' top-left pixels learned about half a pixel down); out of
    training the logits are read that far down and right (shift_map), which puts them back.
    """

    def __init__(
        self,
        *,
        depth: int = 4,
        base_features: int = 16,
        norm: str = "batch",
        residual: bool = False,
        dropout: float = 0.0,
        upsample: str = "transpose",
        num_classes: int = 1,
        attention_gates: bool = False,
        output_shift: tuple[float, float] = (0.0, 0.0),
        dtype=jnp.float32,
        rngs: nnx.Rngs,
    ):
        if num_classes not in (1, 2):
            raise ValueError(f"num_classes must be 1 (sigmoid) or 2 (softmax), got {num_classes}")
        self.depth = depth
        self.dtype = dtype
        self.output_shift = (float(output_shift[0]), float(output_shift[1]))
        widths = [base_features * 2**i for i in range(depth + 1)]
        block = dict(norm=norm, residual=residual, dtype=dtype, rngs=rngs)
        self.down = nnx.List(
            [ConvBlock(3 if i == 0 else widths[i - 1], widths[i], **block) for i in range(depth)]
        )
        self.bottleneck = ConvBlock(widths[depth - 1], widths[depth], **block)
        self.dropout = nnx.Dropout(dropout)
        self.up = nnx.List(
            [Upsample(widths[i + 1], widths[i], mode=upsample, dtype=dtype, rngs=rngs)
             for i in reversed(range(depth))]
        )
        self.up_blocks = nnx.List(
            [ConvBlock(2 * widths[i], widths[i], **block) for i in reversed(range(depth))]
        )
        self.gates = nnx.List(
            [AttentionGate(widths[i], widths[i], dtype=dtype, rngs=rngs)
             for i in reversed(range(depth))] if attention_gates else []
        )
        self.head = nnx.Conv(widths[0], num_classes, (1, 1), dtype=dtype, rngs=rngs)

    def __call__(self, images: jax.Array, *, train: bool = False,
                 dropout_key: jax.Array | None = None):
        """Logits for a batch of RGB images; `dropout_key` is needed when training with dropout."""
        size = 2**self.depth
        if images.shape[1] % size or images.shape[2] % size:
            raise ValueError(
                f"image size {images.shape[1:3]} must be divisible by 2**depth = {size}"
            )
        x = (images.astype(jnp.float32) - jnp.array(_RGB_MEAN)) / jnp.array(_RGB_STD)
        x = x.astype(self.dtype)
        skips = []
        for block in self.down:
            x = block(x, train)
            skips.append(x)
            x = max_pool_2x2(x)
        x = self.bottleneck(x, train)
        x = self.dropout(x, deterministic=not train, rngs=dropout_key)
        for level, (up, block, skip) in enumerate(zip(self.up, self.up_blocks, reversed(skips))):
            x = up(x)
            if self.gates:
                skip = self.gates[level](skip, x)
            x = block(jnp.concatenate([x, skip], axis=-1), train)
        logits = self.head(x).astype(jnp.float32)
        # Training fits the logits as they are; the shift only corrects a trained model's output.
        return logits if train else shift_map(logits, self.output_shift)


def compute_dtype(name: str) -> jnp.dtype:
    """The dtype a config's `compute_dtype` means on this backend.

    bfloat16 applies on accelerators only. On CPU it computes in float32: XLA:CPU (jaxlib 0.12)
    returned wrong values and NaNs from jitted bf16 conv+BatchNorm chains of a trained U-Net,
    and bf16 is no faster there. Parameters are float32 either way, so checkpoints move freely.
    """
    if name == "bfloat16" and jax.default_backend() == "cpu":
        return jnp.dtype(jnp.float32)
    return jnp.dtype(name)


def create_model(model_config, *, seed: int = 0) -> UNet:
    """Builds the U-Net described by a config's `model` section."""
    return UNet(
        depth=model_config.depth,
        base_features=model_config.base_features,
        norm=model_config.norm,
        residual=model_config.residual,
        dropout=model_config.dropout,
        upsample=model_config.upsample,
        num_classes=model_config.num_classes,
        attention_gates=model_config.attention_gates,
        output_shift=tuple(model_config.output_shift),
        dtype=compute_dtype(model_config.compute_dtype),
        rngs=nnx.Rngs(params=seed),
    )
