"""The photometric half of the two views, in JAX: runs inside the train step, on each device.

    views = finish_views(batch, seed=config.seed, views=VIEWS, photometric="device")
    # batch: this device's rows of pretrain_batches(...): uint8 views, int32 epoch and index
    # views["view_a"]: float32 [n, H, W, 3], ImageNet-normalised

TF-free (BYOL's split of the recipe): the host decodes, crops, flips and resizes to uint8 and
sends 4x fewer bytes than float32; the device finishes the view. With photometric="host" the
host has already applied the whole recipe and this only normalises.

Device mode applies, per view, colour jitter (brightness, contrast, saturation, hue in a
random order, like torchvision), grayscale, Gaussian blur and solarize with the probabilities
of its ViewSpec and the definitions of the host ops in augment.py (each op here is tested
against its TF twin). Every random decision of example i comes from a key folded from (seed,
epoch, index, view) with jax.random.fold_in, so the result depends neither on how the batch is
split over devices nor on where a run restarted. The random numbers are JAX's (threefry), not
TF's (philox): device mode gives the same distribution of views as host mode, not the same
views.

Why integers: the ops run in fixed point (pixels in steps of 2^-15, 1/128 of a uint8 level;
factors in steps of 2^-12), not float32. XLA contracts a multiply and an add into one fused
multiply-add, or not, depending on how it compiles the program, and that changes with the batch
shape: float ops gave views 1 ulp apart on 1 and 8 devices. Integer arithmetic is exact in any
order and on any backend, so the bytes are the same for every device count (tested). Random
parameters are drawn as integers too, and the blur kernels come from a table of 256 sigmas
(uniform over [0.1, 2.0], computed in float64 with numpy); float32 appears only at the end,
in one subtraction and one division per value.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping

import jax
import jax.numpy as jnp
import numpy as np

from bt_jax.data import views as views_lib
from bt_jax.data.views import ViewSpec

# Folded into the seed first, so these keys are not those the trainer folds from the same seed.
PHOTOMETRIC_SALT = 0x9A07
PIXEL_BITS = 15
ONE = 1 << PIXEL_BITS  # pixel value 1.0; int32 products of two pixels stay below 2^31
FACTOR_BITS = 12
FACTOR_ONE = 1 << FACTOR_BITS  # factor 1.0: factors up to 2 times pixels fit in int32
# tf.image.rgb_to_grayscale's weights (0.2989, 0.587, 0.114), in pixel steps.
GRAY_WEIGHTS_Q = tuple(int(round(w * ONE)) for w in views_lib.GRAY_WEIGHTS)
# PIL's solarize inverts uint8 values >= 128: the threshold is where uint8 128 lands.
SOLARIZE_THRESHOLD_Q = (128 * ONE + 127) // 255
BLUR_LEVELS = 256  # sigmas in the kernel table


def _blur_table() -> np.ndarray:
    """int32 [BLUR_LEVELS, 2 * BLUR_RADIUS + 1]: Gaussian kernels in pixel steps, each summing to
    ONE exactly (the centre tap takes the rounding), sigma = linspace(*BLUR_SIGMA)."""
    r = views_lib.BLUR_RADIUS
    t = np.arange(-r, r + 1, dtype=np.float64)
    sigma = np.linspace(*views_lib.BLUR_SIGMA, BLUR_LEVELS)[:, None]
    k = np.exp(-(t * t) / (2.0 * sigma * sigma))
    k = np.round(k / k.sum(axis=1, keepdims=True) * ONE).astype(np.int64)
    k[:, r] += ONE - k.sum(axis=1)
    return k.astype(np.int32)


BLUR_TABLE = _blur_table()
BLUR_TABLE_SIGMAS = np.linspace(*views_lib.BLUR_SIGMA, BLUR_LEVELS)


# --------------------------------------------------------------------------- fixed point


def to_fixed(images: jax.Array) -> jax.Array:
    """uint8 -> int32 pixel steps (value * 2^15 / 255, rounded)."""
    return (images.astype(jnp.int32) * ONE + 127) // 255


def from_fixed(x: jax.Array) -> jax.Array:
    """int32 pixel steps -> float32 in [0, 1] (exact)."""
    return x.astype(jnp.float32) / ONE


def _shift_round(x: jax.Array, bits: int) -> jax.Array:
    return (x + (1 << (bits - 1))) >> bits


def _standardize_fixed(x: jax.Array, scale: float) -> jax.Array:
    # (x / scale - mean) / std as (x - scale * mean) / (scale * std): a subtraction and a
    # division, nothing a compiler may fuse into a multiply-add, so the same bytes everywhere.
    mean = np.asarray(views_lib.IMAGENET_MEAN, np.float64) * scale
    std = np.asarray(views_lib.IMAGENET_STD, np.float64) * scale
    return (x.astype(jnp.float32) - mean.astype(np.float32)) / std.astype(np.float32)


def normalize(images: jax.Array) -> jax.Array:
    """uint8 [..., 3] -> float32 [..., 3]: scaled to [0, 1], then ImageNet mean/std."""
    return _standardize_fixed(images, 255.0)


def standardize(x: jax.Array) -> jax.Array:
    """int32 pixel steps [..., 3] -> float32 ImageNet-normalised."""
    return _standardize_fixed(x, float(ONE))


# --------------------------------------------------------------------------- single-image ops
# x: int32 [H, W, 3] in pixel steps [0, ONE]; factors int32 in steps of 2^-12; vmap over a batch.


def factor_q(factor) -> jax.Array:
    """A float factor in factor steps (for callers with float factors, and the tests)."""
    return jnp.round(jnp.asarray(factor, jnp.float32) * FACTOR_ONE).astype(jnp.int32)


def grayscale(x: jax.Array) -> jax.Array:
    """Luma int32 [H, W, 1] (ITU-R 601-2 weights, as tf.image.rgb_to_grayscale)."""
    wr, wg, wb = GRAY_WEIGHTS_Q
    return _shift_round(x[..., 0:1] * wr + x[..., 1:2] * wg + x[..., 2:3] * wb, PIXEL_BITS)


def _blend(a: jax.Array, b: jax.Array, factor: jax.Array) -> jax.Array:
    # torchvision's _blend: factor * a + (1 - factor) * b, clamped.
    mixed = factor * a + (FACTOR_ONE - factor) * b
    return jnp.clip(_shift_round(mixed, FACTOR_BITS), 0, ONE)


def adjust_brightness(x: jax.Array, factor: jax.Array) -> jax.Array:
    """torchvision: multiply by factor, clamp to [0, 1]."""
    return jnp.minimum(_shift_round(x * factor, FACTOR_BITS), ONE)


def mean_luma(x: jax.Array) -> jax.Array:
    """The mean of grayscale(x), int32, as means of row means (int32 sums of up to 65535 values)."""
    luma = grayscale(x)[..., 0]
    height, width = luma.shape
    rows = (jnp.sum(luma, axis=1) + width // 2) // width
    return (jnp.sum(rows) + height // 2) // height


def adjust_contrast(x: jax.Array, factor: jax.Array) -> jax.Array:
    """torchvision: blend with the mean of the grayscale image."""
    return _blend(x, mean_luma(x), factor)


def adjust_saturation(x: jax.Array, factor: jax.Array) -> jax.Array:
    """torchvision: blend with the grayscale image."""
    return _blend(x, grayscale(x), factor)


def hue_q(delta) -> jax.Array:
    """A hue rotation in turns as adjust_hue's shift: sixths of a turn in pixel steps."""
    return jnp.round(jnp.asarray(delta, jnp.float32) * (6 * ONE)).astype(jnp.int32)


def adjust_hue(x: jax.Array, shift: jax.Array) -> jax.Array:
    """Rotates the hue by shift (hue_q(delta)): TF's AdjustHue kernel, vectorised.

    The kernel's formulation: hue as h in [0, 6) from the sorted channels (max, mid, min), then
    back with the same max and min (value and chroma are unchanged).
    """
    r, g, b = x[..., 0], x[..., 1], x[..., 2]
    # The six orderings, as the kernel's branches (ties may fall on either side).
    r_lt_g = r < g
    category = jnp.where(
        r_lt_g,
        jnp.where(b < r, 1, jnp.where(b > g, 3, 2)),
        jnp.where(b < g, 0, jnp.where(b > r, 4, 5)),
    )
    v_max = jnp.maximum(jnp.maximum(r, g), b)
    v_min = jnp.minimum(jnp.minimum(r, g), b)
    v_mid = jnp.where(
        r_lt_g,
        jnp.where(b < r, r, jnp.where(b > g, g, b)),
        jnp.where(b < g, g, jnp.where(b > r, r, b)),
    )
    chroma = v_max - v_min
    ratio = ((v_mid - v_min) * ONE) // jnp.maximum(chroma, 1)
    h = category * ONE + jnp.where(category % 2 == 0, ratio, ONE - ratio)
    h = jnp.mod(jnp.where(chroma > 0, h, 0) + shift, 6 * ONE)

    category = h >> PIXEL_BITS
    ratio = h & (ONE - 1)
    ratio = jnp.where(category % 2 == 0, ratio, ONE - ratio)
    v_mid = v_min + _shift_round(ratio * chroma, PIXEL_BITS)

    def channel(max_at, mid_at):  # categories where this channel is the max, the mid
        is_max = (category == max_at[0]) | (category == max_at[1])
        is_mid = (category == mid_at[0]) | (category == mid_at[1])
        return jnp.where(is_max, v_max, jnp.where(is_mid, v_mid, v_min))

    # (r, g, b) per category: 0 (max, mid, min), 1 (mid, max, min), 2 (min, max, mid),
    # 3 (min, mid, max), 4 (mid, min, max), 5 (max, min, mid).
    return jnp.stack(
        [channel((0, 5), (1, 4)), channel((1, 2), (0, 3)), channel((3, 4), (2, 5))], axis=-1
    )


def to_grayscale(x: jax.Array) -> jax.Array:
    """The grayscale view: luma in all three channels."""
    return jnp.broadcast_to(grayscale(x), x.shape)


def gaussian_blur(x: jax.Array, level: jax.Array) -> jax.Array:
    """Separable Gaussian blur with kernel BLUR_TABLE[level] (sigma BLUR_TABLE_SIGMAS[level]):
    13 taps, reflect padding, the host op's definition; rounded to pixel steps after each pass."""
    r = views_lib.BLUR_RADIUS
    k = jnp.asarray(BLUR_TABLE)[level]
    h, w = x.shape[0], x.shape[1]
    y = jnp.pad(x, ((r, r), (0, 0), (0, 0)), mode="reflect")
    y = _shift_round(sum(k[t] * y[t : t + h] for t in range(2 * r + 1)), PIXEL_BITS)
    y = jnp.pad(y, ((0, 0), (r, r), (0, 0)), mode="reflect")
    return _shift_round(sum(k[t] * y[:, t : t + w] for t in range(2 * r + 1)), PIXEL_BITS)


def solarize(x: jax.Array) -> jax.Array:
    """PIL's ImageOps.solarize(img, 128): invert values >= 128 / 255."""
    return jnp.where(x >= SOLARIZE_THRESHOLD_Q, ONE - x, x)


# --------------------------------------------------------------------------- random views


def _rank_order(u: jax.Array) -> jax.Array:
    """The permutation that sorts u (int32 [n]; uniform draws give a uniform permutation), by
    comparisons: for the 4 jitter operations, cheaper to compile than a sort."""
    n = u.shape[0]
    position = jnp.arange(n)
    # rank of i: how many draws come before it (ties broken by position)
    before = (u[None, :] < u[:, None]) | (
        (u[None, :] == u[:, None]) & (position[None, :] < position[:, None])
    )
    rank = jnp.sum(before, axis=1)
    return jnp.sum(jnp.where(rank[None, :] == position[:, None], position[None, :], 0), axis=1)


def _uniform_int(r: jax.Array, low: jax.Array, span: jax.Array) -> jax.Array:
    """low + span * U[0, 1) from 16 random bits r, in 2^12 steps (span < 2^19)."""
    return low + (((r >> 4) * span) >> 12)


def _probability(p) -> jax.Array:
    """A probability as a threshold for 16 random bits (exact: p * 2^16 is a power-of-2 scale)."""
    return jnp.floor(jnp.asarray(p, jnp.float32) * 65536.0).astype(jnp.int32)


def _maybe(coin: jax.Array, prob, fn, x: jax.Array) -> jax.Array:
    """fn(x) where coin (16 random bits) falls under prob. A Python prob of 0 or 1 is decided
    while tracing; a traced one computes both (under vmap that is what a cond does anyway)."""
    if isinstance(prob, (int, float)):
        if prob <= 0.0:
            return x  # static: no work for steps that never run
        if prob >= 1.0:
            return fn(x)
    return jnp.where(coin < _probability(prob), fn(x), x)


def color_jitter(x: jax.Array, r: jax.Array, spec: ViewSpec) -> jax.Array:
    """torchvision's ColorJitter: factors uniform in 1 +- strength (hue +- spec.hue turns), the
    four operations in a uniformly random order. r: int32 [8], 16 random bits each."""

    def factor(strength, bits):
        s = jnp.round(jnp.asarray(strength, jnp.float32) * FACTOR_ONE).astype(jnp.int32)
        return _uniform_int(bits, FACTOR_ONE - s, 2 * s)

    factors = jnp.stack(
        [factor(spec.brightness, r[0]), factor(spec.contrast, r[1]), factor(spec.saturation, r[2])]
    )
    hue_range = hue_q(spec.hue)
    shift = _uniform_int(r[3], -hue_range, 2 * hue_range)
    order = _rank_order(r[4:8])  # 0 brightness, 1 contrast, 2 saturation, 3 hue

    # One loop body for the four slots (not four switches of four branches): under vmap every
    # branch is computed anyway, and this is a quarter of the program to compile. Brightness,
    # contrast and saturation are one blend, with 0, the mean luma or the luma.
    def slot(k, y):
        op = order[k]
        base = jnp.where(op == 0, 0, jnp.where(op == 1, mean_luma(y), grayscale(y)))
        blended = _blend(y, base, factors[jnp.minimum(op, 2)])
        return jnp.where(op == 3, adjust_hue(y, shift), blended)

    return jax.lax.fori_loop(0, 4, slot, x)


def photometric_view(x: jax.Array, key: jax.Array, spec: ViewSpec) -> jax.Array:
    """One view's photometric ops on int32 pixel steps [H, W, 3]: jitter, grayscale, blur,
    solarize with spec's probabilities, every draw from `key`.

    spec: a ViewSpec, or one whose fields are traced scalars (photometric_views maps one
    program over both views that way: half the program to compile).
    """
    # One draw of all 13 numbers, 16 bits each: each random call is a program to compile.
    r = (jax.random.bits(key, (13,), jnp.uint32) >> 16).astype(jnp.int32)
    x = _maybe(r[0], spec.jitter_prob, lambda y: color_jitter(y, r[4:12], spec), x)
    x = _maybe(r[1], spec.grayscale_prob, to_grayscale, x)
    x = _maybe(r[2], spec.blur_prob, lambda y: gaussian_blur(y, r[12] >> 8), x)
    return _maybe(r[3], spec.solarize_prob, solarize, x)


def example_keys(seed, epoch: jax.Array, index: jax.Array, view: str) -> jax.Array:
    """Keys [n] of one view of n examples: fold_in of (seed, salt, epoch, index, view).

    seed: int (or int scalar); epoch, index: int32 [n].
    """
    base = jax.random.fold_in(jax.random.key(seed), PHOTOMETRIC_SALT)

    def one(e, i):
        key = jax.random.fold_in(jax.random.fold_in(base, e), i)
        return jax.random.fold_in(key, views_lib.VIEW_IDS[view])

    return jax.vmap(one)(epoch, index)


def _device_views(
    batch: Mapping[str, jax.Array], seed, views: Mapping[str, ViewSpec]
) -> dict[str, jax.Array]:
    n = batch["view_a"].shape[0]
    # Both views through one vmapped program, each row with its view's parameters.
    images = to_fixed(jnp.concatenate([batch["view_a"], batch["view_b"]]))
    keys = jnp.concatenate(
        [example_keys(seed, batch["epoch"], batch["index"], name) for name in ("a", "b")]
    )
    specs = {
        field.name: jnp.repeat(
            jnp.asarray([getattr(views[v], field.name) for v in "ab"], jnp.float32), n
        )
        for field in dataclasses.fields(ViewSpec)
    }
    out = jax.vmap(lambda y, k, p: photometric_view(y, k, ViewSpec(**p)))(images, keys, specs)
    return {"view_a": out[:n], "view_b": out[n:]}


def photometric_views(
    batch: Mapping[str, jax.Array], *, seed: int, views: Mapping[str, ViewSpec] | None = None
) -> dict[str, jax.Array]:
    """Device mode's views before normalisation: {"view_a", "view_b": float32 [n, H, W, 3] in
    [0, 1]} from uint8 crops (see finish_views)."""
    views = views_lib.check_views(views)
    return {k: from_fixed(v) for k, v in _device_views(batch, seed, views).items()}


def finish_views(
    batch: Mapping[str, jax.Array],
    *,
    seed: int,
    views: Mapping[str, ViewSpec] | None = None,
    photometric: str = "host",
) -> dict[str, jax.Array]:
    """The network's inputs from (this device's rows of) a pretraining batch.

    batch: {"view_a", "view_b": uint8 [n, H, W, 3], "epoch", "index": int32 [n]} (as
    pretrain_batches yields, on the device). photometric: the mode the batches were made with;
    "host": normalise only; "device": the photometric ops of `views` (default VIEWS), then
    normalise. Returns {"view_a", "view_b": float32 [n, H, W, 3]}. jit/vmap/shard_map-able;
    the arguments other than batch are static.
    """
    views = views_lib.check_views(views)
    views_lib.check_photometric(photometric)
    if photometric == "host":
        return {name: normalize(batch[name]) for name in ("view_a", "view_b")}
    return {k: standardize(v) for k, v in _device_views(batch, seed, views).items()}
