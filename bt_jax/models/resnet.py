"""torchvision ResNets (v1.5) in Flax Linen, laid out so a torchvision state dict maps one to one.

Architecture, as in `torchvision/models/resnet.py`:
- stem "imagenet": 7x7/2 conv (padding 3) -> BN -> ReLU -> 3x3/2 max-pool (padding 1);
  stem "cifar": 3x3/1 conv (padding 1) -> BN -> ReLU, no pool (for 32x32 inputs; conv1 is then
  3x3 and no longer loads a torchvision ImageNet checkpoint).
- four stages of `width * (1, 2, 4, 8)` planes; the first block of stages 2-4 has stride 2. In a
  bottleneck the stride sits in the 3x3 conv (ResNet v1.5). A block gets a projection shortcut
  (1x1 conv with the block's stride -> BN) when its stride is not 1 or its channels change.
- global average pool -> optional linear classifier `fc`.

Variable names follow torchvision with the numeric `Sequential` indices joined by "_":
`conv1`, `bn1`, `layer1_0/{conv1,bn1,conv2,bn2[,conv3,bn3]}`, `layer2_0/downsample_0` (conv),
`layer2_0/downsample_1` (BN), `fc`. See `bt_jax.convert` for the full mapping.

BatchNorm matches PyTorch: eps 1e-5, running averages updated with PyTorch momentum 0.1
(Flax momentum 0.9), normalisation by the biased batch variance. One difference: PyTorch stores the
unbiased variance (times n / (n - 1)) in `running_var`, Flax the biased one; with n = B * H * W
values per channel the difference is negligible. Calling a model with `views=2` on two views
stacked along the batch axis normalises each view with its own statistics, as two calls would
(`bt_jax.models.batch_norm`).

Convolutions run in the form `conv` picks (`bt_jax.models.conv`): "xla" (default) everywhere;
"auto" computes kernel gradients by per-tap matrix products on the CPU, where XLA's own are
slow at standard widths, and uses XLA's convolution on accelerators; every form has the same
parameters and values.
"""

from __future__ import annotations

import functools
import math
from collections.abc import Callable, Sequence
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from bt_jax.models import conv as conv_lib
from bt_jax.models.batch_norm import BatchNorm

STEMS = ("imagenet", "cifar")


def canonical_dtype(dtype: Any) -> jnp.dtype:
    """A jnp dtype from a dtype or its name ("float32", "bfloat16", ...); an actionable error."""
    try:
        return jnp.dtype(dtype)
    except TypeError as e:
        raise ValueError(f"Unknown dtype {dtype!r}; use e.g. 'float32' or 'bfloat16'.") from e


class TorchLinear(nn.Module):
    """`torch.nn.Linear` with its default init: weight, bias ~ U(-1/sqrt(fan_in), 1/sqrt(fan_in)).

    (PyTorch's kaiming_uniform_(a=sqrt(5)) reduces to that bound.) Parameters `kernel` [in, out]
    (the transpose of torch's `weight`) and `bias` [out]. x: [..., in] -> [..., out] in `dtype`.
    """

    features: int
    use_bias: bool = True
    dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, x: jnp.ndarray) -> jnp.ndarray:
        fan_in = x.shape[-1]
        bound = 1.0 / math.sqrt(fan_in)

        def uniform(key: jax.Array, shape: Sequence[int], dtype: Any = jnp.float32) -> jax.Array:
            return jax.random.uniform(key, shape, dtype, -bound, bound)

        kernel = self.param("kernel", uniform, (fan_in, self.features))
        y = jnp.dot(x.astype(self.dtype), kernel.astype(self.dtype))
        if self.use_bias:
            y = y + self.param("bias", uniform, (self.features,)).astype(self.dtype)
        return y


# torchvision: kaiming_normal_(mode="fan_out", nonlinearity="relu"); untruncated normal.
conv_kernel_init = nn.initializers.variance_scaling(2.0, "fan_out", "normal")


def batch_norm(
    train: bool,
    axis_name: str | None,
    dtype: Any,
    name: str,
    zero_scale: bool = False,
) -> BatchNorm:
    """A PyTorch-equivalent BatchNorm; with `axis_name`, statistics over the named axis (SyncBN)."""
    return BatchNorm(
        use_running_average=not train,
        momentum=0.9,  # = PyTorch momentum 0.1: running = 0.9 * running + 0.1 * batch
        epsilon=1e-5,
        dtype=dtype,
        axis_name=axis_name if train else None,  # eval uses running stats: no collective needed
        scale_init=nn.initializers.zeros if zero_scale else nn.initializers.ones,
        name=name,
    )


def conv(
    features: int, kernel: int, stride: int, dtype: Any, name: str, form: str = "xla"
) -> conv_lib.Conv:
    """A bias-free conv with torchvision's padding (kernel // 2, explicit, symmetric) and init.

    Explicit symmetric padding: "SAME" pads asymmetrically for stride 2 and would differ from
    PyTorch.
    """
    return conv_lib.Conv(
        features,
        kernel,
        stride=stride,
        padding=kernel // 2,
        dtype=dtype,
        kernel_init=conv_kernel_init,
        form=form,
        name=name,
    )


class BasicBlock(nn.Module):
    """torchvision BasicBlock: 3x3 (stride) -> BN -> ReLU -> 3x3 -> BN, + shortcut, ReLU.

    x: [B, H, W, C] -> [B, H / strides, W / strides, planes].
    """

    planes: int
    strides: int = 1
    zero_init_residual: bool = False
    dtype: Any = jnp.float32
    axis_name: str | None = None
    conv: str = "xla"

    expansion = 1

    @nn.compact
    def __call__(self, x: jnp.ndarray, train: bool = True, views: int = 1) -> jnp.ndarray:
        bn = functools.partial(batch_norm, train, self.axis_name, self.dtype)
        out = conv(self.planes, 3, self.strides, self.dtype, "conv1", self.conv)(x)
        out = nn.relu(bn("bn1")(out, views))
        out = conv(self.planes, 3, 1, self.dtype, "conv2", self.conv)(out)
        out = bn("bn2", zero_scale=self.zero_init_residual)(out, views)
        return nn.relu(out + shortcut(self, x, train, views))


class Bottleneck(nn.Module):
    """torchvision Bottleneck (v1.5): 1x1 -> BN -> ReLU -> 3x3 (stride) -> BN -> ReLU -> 1x1 -> BN,
    + shortcut, ReLU.

    x: [B, H, W, C] -> [B, H / strides, W / strides, 4 * planes].
    """

    planes: int
    strides: int = 1
    zero_init_residual: bool = False
    dtype: Any = jnp.float32
    axis_name: str | None = None
    conv: str = "xla"

    expansion = 4

    @nn.compact
    def __call__(self, x: jnp.ndarray, train: bool = True, views: int = 1) -> jnp.ndarray:
        bn = functools.partial(batch_norm, train, self.axis_name, self.dtype)
        out = conv(self.planes, 1, 1, self.dtype, "conv1", self.conv)(x)
        out = nn.relu(bn("bn1")(out, views))
        out = conv(self.planes, 3, self.strides, self.dtype, "conv2", self.conv)(out)
        out = nn.relu(bn("bn2")(out, views))
        out = conv(self.planes * 4, 1, 1, self.dtype, "conv3", self.conv)(out)
        out = bn("bn3", zero_scale=self.zero_init_residual)(out, views)
        return nn.relu(out + shortcut(self, x, train, views))


def shortcut(
    block: BasicBlock | Bottleneck, x: jnp.ndarray, train: bool, views: int = 1
) -> jnp.ndarray:
    """Identity, or torchvision's `downsample` (1x1 conv with stride -> BN) when the shape changes.

    Called inside the block's compact `__call__`, so the submodules belong to the block.
    """
    out_features = block.planes * block.expansion
    if block.strides == 1 and x.shape[-1] == out_features:
        return x
    y = conv(out_features, 1, block.strides, block.dtype, "downsample_0", block.conv)(x)
    return batch_norm(train, block.axis_name, block.dtype, "downsample_1")(y, views)


class ResNet(nn.Module):
    """A torchvision-layout ResNet. Use the named depths (`ResNet18`, ..., `ResNet152`) or `create`.

    Fields:
      stage_sizes: blocks per stage, e.g. (3, 4, 6, 3) for ResNet-50.
      block_cls: `BasicBlock` (18/34) or `Bottleneck` (50/101/152).
      stem: "imagenet" (7x7/2 conv + 3x3/2 max-pool) or "cifar" (3x3/1 conv, no pool).
      width: channels of the stem and first stage; 64 is torchvision's ResNet. Stages use
        width * (1, 2, 4, 8) planes; smaller widths make quick CPU runs.
      zero_init_residual: start the last BN scale of every residual branch at 0 (each block
        then starts as its shortcut). torchvision's default False; the official Barlow Twins
        run True.
      dtype: computation dtype (e.g. jnp.bfloat16 or "bfloat16"); parameters stay float32 and
        the output is float32.
      axis_name: mapped axis (pmap / shard_map) over which BatchNorm statistics are averaged in
        training, the equivalent of SyncBatchNorm; None keeps them per device.
      num_classes: size of the linear head `fc`; None drops the head (Barlow Twins backbone).
      conv: how convolutions run, "auto" | "xla" | "tap_matmul" (`bt_jax.models.conv`); the
        same parameters and values whichever.
    """

    stage_sizes: Sequence[int] = (2, 2, 2, 2)
    block_cls: Callable[..., nn.Module] = BasicBlock
    stem: str = "imagenet"
    width: int = 64
    zero_init_residual: bool = False
    dtype: Any = jnp.float32
    axis_name: str | None = None
    num_classes: int | None = None
    conv: str = "xla"

    def __post_init__(self) -> None:
        if self.stem not in STEMS:
            raise ValueError(f"Unknown stem {self.stem!r}; expected one of {STEMS}.")
        if not isinstance(self.width, int) or self.width <= 0:
            raise ValueError(
                f"width must be a positive int (64 is the standard ResNet), got {self.width!r}."
            )
        conv_lib.check_form(self.conv)
        super().__post_init__()

    @property
    def num_features(self) -> int:
        """Size F of the pooled representation: 8 * width * expansion (512 or 2048 at width 64)."""
        return 8 * self.width * self.block_cls.expansion

    @nn.compact
    def __call__(self, x: jnp.ndarray, train: bool = True, views: int = 1) -> jnp.ndarray:
        """x: [B, H, W, 3] float (NHWC) -> [B, F] float32 representation or [B, num_classes] logits.

        (float64 out only when dtype is float64.)

        train=True normalises with batch statistics and updates `batch_stats` (call `apply` with
        mutable=["batch_stats"]); train=False uses the running averages. views: the batch is
        that many views stacked along its first axis ([views * n, H, W, 3]), each normalised
        with its own statistics in training (the running averages updated view after view).
        """
        if x.ndim != 4 or x.shape[-1] != 3:
            raise ValueError(f"Expected images [B, H, W, 3] (NHWC), got shape {x.shape}.")
        dtype = canonical_dtype(self.dtype)
        x = x.astype(dtype)
        if self.stem == "imagenet":
            x = conv(self.width, 7, 2, dtype, "conv1", self.conv)(x)
        else:
            x = conv(self.width, 3, 1, dtype, "conv1", self.conv)(x)
        x = nn.relu(batch_norm(train, self.axis_name, dtype, "bn1")(x, views))
        if self.stem == "imagenet":
            # nn.max_pool pads with -inf, as PyTorch's MaxPool2d(3, 2, padding=1) does.
            x = nn.max_pool(x, (3, 3), strides=(2, 2), padding=((1, 1), (1, 1)))
        for i, num_blocks in enumerate(self.stage_sizes):
            for j in range(num_blocks):
                x = self.block_cls(
                    planes=self.width * 2**i,
                    strides=2 if (i > 0 and j == 0) else 1,
                    zero_init_residual=self.zero_init_residual,
                    dtype=dtype,
                    axis_name=self.axis_name,
                    conv=self.conv,
                    name=f"layer{i + 1}_{j}",
                )(x, train, views)
        # Pool and return in (at least) float32: a bf16 mean over H * W values loses precision.
        out_dtype = jnp.promote_types(dtype, jnp.float32)
        x = jnp.mean(x.astype(out_dtype), axis=(1, 2))
        if self.num_classes is not None:
            x = TorchLinear(self.num_classes, use_bias=True, dtype=dtype, name="fc")(x)
        return x.astype(out_dtype)


class ResNet18(ResNet):
    """torchvision resnet18: BasicBlock, (2, 2, 2, 2); 512-d representation at width 64."""

    stage_sizes: Sequence[int] = (2, 2, 2, 2)
    block_cls: Callable[..., nn.Module] = BasicBlock


class ResNet34(ResNet):
    """torchvision resnet34: BasicBlock, (3, 4, 6, 3); 512-d representation at width 64."""

    stage_sizes: Sequence[int] = (3, 4, 6, 3)
    block_cls: Callable[..., nn.Module] = BasicBlock


class ResNet50(ResNet):
    """torchvision resnet50 (v1.5): Bottleneck, (3, 4, 6, 3); 2048-d representation at width 64."""

    stage_sizes: Sequence[int] = (3, 4, 6, 3)
    block_cls: Callable[..., nn.Module] = Bottleneck


class ResNet101(ResNet):
    """torchvision resnet101 (v1.5): Bottleneck, (3, 4, 23, 3); 2048-d features at width 64."""

    stage_sizes: Sequence[int] = (3, 4, 23, 3)
    block_cls: Callable[..., nn.Module] = Bottleneck


class ResNet152(ResNet):
    """torchvision resnet152 (v1.5): Bottleneck, (3, 8, 36, 3); 2048-d features at width 64."""

    stage_sizes: Sequence[int] = (3, 8, 36, 3)
    block_cls: Callable[..., nn.Module] = Bottleneck
