"""The ResNets' convolution, with a faster kernel gradient on XLA's CPU backend.

XLA's CPU backend runs a convolution and its input gradient as fast library convolutions, but
its kernel gradient (a convolution whose window is the whole feature map, batch and features
swapped) several times slower than the forward pass (``experiments/benchmarks/conv.py``). The
"tap_matmul" form keeps XLA's convolution for the forward pass and the input gradient, and
computes the kernel gradient as one batched matrix product per kernel tap:

    dK[i, j] = sum over output positions p of  x_pad[p * stride + (i, j)]^T  g[p]    [C, O]

with the positions split into chunks of about ``ROWS_PER_CHUNK`` rows (whole images), so that
each product is a plain [O, rows] @ [rows, C] matrix product, then summed over the chunks.
Same values as the plain form to float32 rounding, same parameter (``kernel`` [kh, kw, C, O]).

``form="auto"`` picks "tap_matmul" when the program is compiled for the CPU and "xla" on
accelerators (``lax.platform_dependent``: decided per compiled platform, not per host), and
on the CPU only for feature maps of at least ``MIN_TAP_MATMUL_POSITIONS`` output positions per
image, where it measured faster.
"""

from __future__ import annotations

import functools
from collections.abc import Sequence
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
from jax import lax

FORMS = ("auto", "xla", "tap_matmul")
ROWS_PER_CHUNK = 1024  # rows of one chunk's product: large enough to fill the cores, small
# enough that per-chunk products stay in cache
MIN_TAP_MATMUL_POSITIONS = 64  # 8 x 8: on smaller maps XLA's own kernel gradient was faster

Padding = tuple[tuple[int, int], tuple[int, int]]


def check_form(form: str) -> str:
    if form not in FORMS:
        raise ValueError(f"conv must be one of {FORMS}; got {form!r}.")
    return form


def xla_conv(x: jax.Array, kernel: jax.Array, stride: int, padding: Padding) -> jax.Array:
    """x: [B, H, W, C], kernel: [kh, kw, C, O] -> [B, Ho, Wo, O] (NHWC, HWIO)."""
    return lax.conv_general_dilated(
        x, kernel, (stride, stride), padding, dimension_numbers=("NHWC", "HWIO", "NHWC")
    )


@functools.partial(jax.custom_vjp, nondiff_argnums=(2, 3))
def tap_matmul_conv(x: jax.Array, kernel: jax.Array, stride: int, padding: Padding) -> jax.Array:
    """``xla_conv`` whose kernel gradient is computed by :func:`kernel_grad_by_taps`."""
    return xla_conv(x, kernel, stride, padding)


def _tap_matmul_fwd(x, kernel, stride, padding):
    return xla_conv(x, kernel, stride, padding), (x, kernel)


def _tap_matmul_bwd(stride, padding, residuals, g):
    x, kernel = residuals
    _, input_vjp = jax.vjp(lambda x_: xla_conv(x_, kernel, stride, padding), x)
    (dx,) = input_vjp(g)
    return dx, kernel_grad_by_taps(x, g, kernel.shape, stride, padding).astype(kernel.dtype)


tap_matmul_conv.defvjp(_tap_matmul_fwd, _tap_matmul_bwd)


def kernel_grad_by_taps(
    x: jax.Array, g: jax.Array, kernel_shape: Sequence[int], stride: int, padding: Padding
) -> jax.Array:
    """The kernel gradient of ``xla_conv``, one batched matrix product per tap.

    x: [B, H, W, C] the conv's input, g: [B, Ho, Wo, O] the gradient of its output
    -> [kh, kw, C, O], accumulated in float32 (at least).
    """
    batch, _, _, channels = x.shape
    _, out_h, out_w, features = g.shape
    kh, kw = kernel_shape[:2]
    images = _images_per_chunk(batch, out_h * out_w)
    chunks, rows = batch // images, images * out_h * out_w
    x_pad = jnp.pad(x, ((0, 0), padding[0], padding[1], (0, 0)))
    # [chunks, O, rows], materialised: with the transpose folded into the product (XLA's
    # default), the CPU backend falls back from its fast matmul kernel to a slow one.
    g_t = lax.optimization_barrier(g.reshape(chunks, rows, features).transpose(0, 2, 1))
    span = ((out_h - 1) * stride + 1, (out_w - 1) * stride + 1)
    accumulator = jnp.promote_types(jnp.promote_types(x.dtype, g.dtype), jnp.float32)

    def tap(_, offset):
        # A loop over the taps, not kh * kw unrolled slices: XLA would cut every window (each
        # the size of x) before the first product.
        # Every start index of offset's dtype: a Python 0 is int64 when x64 is enabled.
        zero = jnp.zeros((), offset.dtype)
        window = lax.dynamic_slice(
            x_pad, (zero, offset[0], offset[1], zero), (batch, span[0], span[1], channels)
        )
        window = window[:, ::stride, ::stride, :].reshape(chunks, rows, channels)
        product = lax.dot_general(
            g_t, window, (((2,), (1,)), ((0,), (0,))), preferred_element_type=accumulator
        )  # [chunks, O, C]
        return None, jnp.sum(product, axis=0)

    offsets = jnp.array([(i, j) for i in range(kh) for j in range(kw)], jnp.int32)
    _, taps = lax.scan(tap, None, offsets)  # [kh * kw, O, C]
    return taps.reshape(kh, kw, features, channels).transpose(0, 1, 3, 2)


def _images_per_chunk(batch: int, positions: int) -> int:
    """The largest divisor of ``batch`` whose images hold at most ROWS_PER_CHUNK positions (at
    least 1)."""
    limit = max(1, ROWS_PER_CHUNK // positions)
    return max(d for d in range(1, min(batch, limit) + 1) if batch % d == 0)


def conv2d(
    x: jax.Array, kernel: jax.Array, stride: int, padding: Padding, form: str = "auto"
) -> jax.Array:
    """The convolution in the given form (all give the same values and gradients).

    x: [B, H, W, C], kernel: [kh, kw, C, O] -> [B, Ho, Wo, O].
    """
    if check_form(form) == "xla":
        return xla_conv(x, kernel, stride, padding)
    x, kernel = _same_varying_axes(x, kernel)
    if form == "tap_matmul":
        return tap_matmul_conv(x, kernel, stride, padding)
    out_positions = ((x.shape[1] + sum(padding[0]) - kernel.shape[0]) // stride + 1) * (
        (x.shape[2] + sum(padding[1]) - kernel.shape[1]) // stride + 1
    )
    if out_positions < MIN_TAP_MATMUL_POSITIONS:
        return xla_conv(x, kernel, stride, padding)
    return lax.platform_dependent(
        x,
        kernel,
        cpu=lambda x_, k_: tap_matmul_conv(x_, k_, stride, padding),
        default=lambda x_, k_: xla_conv(x_, k_, stride, padding),
    )


def _same_varying_axes(x: jax.Array, kernel: jax.Array) -> tuple[jax.Array, jax.Array]:
    """Inside shard_map, a replicated kernel meets per-device images: the custom gradient must
    return a cotangent of the kernel's own type, so the kernel is cast to vary as the images do
    first (what autodiff of lax.conv does implicitly; its transpose sums over the devices)."""
    x_axes, kernel_axes = _varying_axes(x), _varying_axes(kernel)
    if kernel_axes - x_axes:
        x = lax.pcast(x, tuple(sorted(kernel_axes - x_axes)), to="varying")
    if x_axes - kernel_axes:
        kernel = lax.pcast(kernel, tuple(sorted(x_axes - kernel_axes)), to="varying")
    return x, kernel


def _varying_axes(x: jax.Array) -> frozenset:
    """The mapped axes over which ``x`` varies inside shard_map (empty outside)."""
    aval = jax.typeof(x)
    manual_axis_type = getattr(aval, "mat", None)  # jax >= 0.10; `vma` before
    if manual_axis_type is not None:
        return frozenset(manual_axis_type.varying)
    return frozenset(getattr(aval, "vma", ()))


class Conv(nn.Module):
    """A bias-free 2-D convolution, ``nn.Conv``'s parameter layout (``kernel`` [kh, kw, C, O]).

    x: [B, H, W, C] -> [B, Ho, Wo, features] in ``dtype``.
    """

    features: int
    kernel_size: int
    stride: int = 1
    padding: int = 0  # symmetric, on both spatial axes
    dtype: Any = jnp.float32
    kernel_init: Any = nn.initializers.lecun_normal()
    form: str = "auto"

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        kernel = self.param(
            "kernel",
            self.kernel_init,
            (self.kernel_size, self.kernel_size, x.shape[-1], self.features),
        )
        x, kernel = x.astype(self.dtype), kernel.astype(self.dtype)
        pad = (self.padding, self.padding)
        return conv2d(x, kernel, self.stride, (pad, pad), self.form)
