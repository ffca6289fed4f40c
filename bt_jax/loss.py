"""The Barlow Twins objective, as a pure function that is exact over the global batch.

Each embedding dimension is standardised over the *global* batch (mean-centred, divided by
sqrt(biased variance + eps): the official code's ``BatchNorm1d(affine=False)``), and

        C = Za_n^T Zb_n / N                                   [D, D]
        L = sum_i (1 - C_ii)^2 + lambd * sum_{i != j} C_ij^2

Two ways to evaluate L, equal in exact arithmetic:

* ``"dense"`` forms C: O(N D^2) time, D x D memory (what every PyTorch port does).
* ``"gram"`` never forms C. With Ga = Za_n Za_n^T and Gb = Zb_n Zb_n^T (both N x N),
    sum_ij C_ij^2 = sum_{b,b'} Ga_bb' Gb_bb' / N^2, and the diagonal C_ii is a column-wise dot
    product; the off-diagonal sum is the total minus the diagonal squares. O(N^2 D) time, N x N
    memory: at N=256, D=8192 that is 16x fewer FLOPs than forming C.

Across devices (``axis_name`` inside ``pmap`` / ``shard_map``) the embeddings are all-gathered,
an autodiff-aware collective whose transpose is a reduce-scatter, so gradients are exact; the
official code instead all-reduces C with a collective autograd does not see, which scales every
gradient by 1/num_devices. No device repeats another's work: with K devices each evaluates 1/K
of the entries (a block of columns of C for ``"dense"``; the rows of the Gram matrices that
belong to its own examples for ``"gram"``) and one psum of two scalars combines them.

Magnitudes. Each column's variance is taken after dividing it by a power of two near its largest
|value|: exact, and invisible to the gradient, as the standardised column does not depend on the
scale. Float32 embeddings from ~1e-30 to ~1e30 give the loss of the same embeddings at unit
scale (with eps=0; eps > 0 rightly matters more as they shrink) and gradients scaled by 1/scale
(beyond, the gradients leave float32's normal range; the value holds up to float32's largest
numbers). A dimension constant over the batch standardises to 0, with eps=0 too (0/0): its row
and column of C are 0, it adds exactly 1 to the invariance and 0 to the redundancy, and its
gradient is 0 (with eps > 0, the centring's over sqrt(eps), as BatchNorm). Non-finite
embeddings give a NaN loss.

The collapse signature, invariance == D and redundancy == 0 exactly (loss == D): float32
embeddings above ~1.8e19 used to produce it silently, with zero gradients (squares overflowed,
the variance became inf, every standardised value 0). Now it means that every dimension is
constant over the batch (complete collapse, or variation below float32's resolution of its
offset), or, with eps=1e-5, spread below ~1e-13 (invariance alone is D from ~1e-7).

Scale. A standardised column of N exchangeable values has norm sqrt(N), is orthogonal to the
ones and has covariance (I - 11^T/N) N/(N-1), so C_ij of independent columns has mean 0 and
E[C_ij^2] = 1/(N-1) exactly. Training starts near E[invariance] = D N/(N-1) and E[redundancy] =
D (D-1)/(N-1), loss ~ D + lambd D^2/N: 8196 + 0.0051 * 32780 = 8363 for the paper's D=8192,
N=2048. It is in the thousands because each of the D diagonal entries starts near 0 and costs
~1; a network's first embeddings are not independent (two views of an image already correlate,
its dimensions are redundant), so its measured start is of that order rather than equal.
Training brings C towards the identity, but C's rank (at most N-1) bounds the loss below:
sum_ij C_ij^2 >= (tr C)^2 / (N-1), and for lambd <= 1 the loss is at least D k/(1+k),
k = lambd (D/(N-1) - 1) when D > N-1 (tight: every C_ii at 1/(1+k)), 124 at N=2048 and
1122 at N=256 for D=8192. ``python experiments/loss_scale.py`` prints both for any D and N.
"""

from __future__ import annotations

import functools
import math
from typing import NamedTuple

import jax
import jax.numpy as jnp
from jax import lax
from jax.sharding import PartitionSpec as P

from bt_jax import errors

METHODS = ("auto", "dense", "gram")
DEFAULT_LAMBD = 0.0051  # The official code; the paper's text says 5e-3.


class BarlowTwinsTerms(NamedTuple):
    """The two terms of the objective, for logging. ``loss = invariance + lambd * redundancy``."""

    invariance: jax.Array  # sum_i (1 - C_ii)^2
    redundancy: jax.Array  # sum_{i != j} C_ij^2, not yet multiplied by lambd


class LossError(errors.Error, ValueError):
    """Arguments the loss cannot use; the message names the value and what to do."""


def _validate(z_a, z_b, *, method: str, eps, axis_name) -> tuple[jax.Array, jax.Array, int]:
    """Checks the arguments; returns (z_a, z_b) as arrays and the global batch size."""
    z_a, z_b = _as_array("z_a", z_a), _as_array("z_b", z_b)
    for name, z in (("z_a", z_a), ("z_b", z_b)):
        if z.ndim != 2:
            raise LossError(
                f"{name} must be a 2-D array of embeddings [batch, embedding_dim]; got shape "
                f"{z.shape}. Flatten or pool your features first."
            )
        if not jnp.issubdtype(z.dtype, jnp.floating):
            raise LossError(
                f"{name} must be floating point (float32, bfloat16, float16, float64); got "
                f"{z.dtype}. Cast the embeddings, e.g. z.astype(jnp.float32)."
            )
    if z_a.shape != z_b.shape:
        raise LossError(
            f"z_a and z_b must have the same shape [batch, embedding_dim]; got {z_a.shape} "
            f"and {z_b.shape}. They are the embeddings of two views of the same images."
        )
    if method not in METHODS:
        raise LossError(f"method must be one of {METHODS}; got {method!r}.")
    _check_finite_non_negative(
        "eps", eps, "It is added to each dimension's variance; BatchNorm1d's is 1e-5."
    )
    global_batch = z_a.shape[0] * _num_shards(axis_name)
    if global_batch < 2:
        raise LossError(
            f"The global batch has {global_batch} example(s); the cross-correlation needs at "
            "least 2 to standardise each dimension. Use a larger batch."
        )
    return z_a, z_b, global_batch


def _as_array(name: str, z) -> jax.Array:
    """Arrays, tracers, NumPy arrays and nested lists alike: the loss is a function of values."""
    try:
        return jnp.asarray(z)
    except (TypeError, ValueError) as error:
        raise LossError(
            f"{name} must be an array of embeddings [batch, embedding_dim]; got a "
            f"{type(z).__name__} that is not one ({error})."
        ) from None


def _check_finite_non_negative(name: str, value, hint: str) -> None:
    if isinstance(value, jax.core.Tracer):
        return  # Traced (e.g. a vmapped sweep over lambd): no value to check at trace time.
    try:
        if isinstance(value, (str, bytes)):
            raise TypeError  # float("0.1") would pass, and then fail deep inside.
        number = float(value)
    except (TypeError, ValueError):
        raise LossError(f"{name} must be a number; got {value!r}. {hint}") from None
    if not math.isfinite(number) or number < 0:
        raise LossError(f"{name} must be finite and >= 0; got {number}. {hint}")


def _num_shards(axis_name) -> int:
    return 1 if axis_name is None else lax.axis_size(axis_name)


@jax.custom_jvp
def _standardize(z: jax.Array, eps) -> jax.Array:
    """z: [N, D] -> (z - mean) / sqrt(biased variance + eps) per dimension, at any magnitude.

    A constant dimension gives 0, with eps=0 too (0/0); see the module docstring.
    """
    return _standardized(z, eps)[0]


@_standardize.defjvp
def _standardize_jvp(primals, tangents):
    # The derivative in closed form, as BatchNorm's: with y = c r, c = z - mean(z) and
    # r = 1 / sqrt(var(z) + eps), dy = r (dc - y mean(y dc)) - y r^2 deps / 2. Its transpose
    # makes fewer passes over [N, D] than differentiating the scaled forward pass, and no
    # intermediate vanishes or overflows at any magnitude of z.
    z, eps = primals
    dz, deps = tangents
    y, inverse_std = _standardized(z, eps)
    dc = dz - jnp.mean(dz, axis=0)
    dy = inverse_std * (dc - y * jnp.mean(y * dc, axis=0))
    return y, dy - 0.5 * y * jnp.square(inverse_std) * deps


def _standardized(z: jax.Array, eps) -> tuple[jax.Array, jax.Array]:
    """(the standardised z [N, D], 1 / sqrt(var(z) + eps) [D], 0 for a constant column)."""
    # Float32 squares overflow above ~1.8e19 and vanish below ~1e-19: the variance is of
    # z / scale, scale a power of two near each column's max |value| (over the global batch:
    # the gathered one, or GSPMD's), so that the result is exactly that of unit-scale z. Only
    # products by powers of two: XLA rewrites (a / b) / c as a / (b * c), which can underflow.
    inverse_scale = _inverse_power_of_two(jnp.max(jnp.abs(z), axis=0))  # [D]
    # Shifting by the first example makes a constant column exactly 0 (a mean of identical
    # values need not round to them) and spares the mean the cancellation of a large offset.
    # Summing shifted / N, no partial sum exceeds 2 max |z|, and the sum needs no scale.
    shifted = z - z[0]
    centred = shifted - jnp.sum(shifted * (1.0 / z.shape[0]), axis=0)
    variance = jnp.mean(jnp.square(centred * inverse_scale), axis=0)  # of z / scale
    eps = jnp.asarray(eps, z.dtype)
    # eps / scale^2, inf only where eps dwarfs the variance; not 0 * inf if XLA reassociates.
    scaled_eps = jnp.where(eps > 0, eps * inverse_scale * inverse_scale, 0.0)
    total = variance + scaled_eps
    positive = total > 0
    inverse_std = jnp.where(positive, lax.rsqrt(jnp.where(positive, total, 1.0)), 0.0)
    inverse_std = inverse_std * inverse_scale  # 1 / sqrt(var(z) + eps), in z's units
    # Where scaled_eps overflowed, float32 evaluates 1 / sqrt(var(z) + eps) as 1 / sqrt(eps).
    overflowed = jnp.isinf(scaled_eps)
    inverse_std = jnp.where(overflowed, lax.rsqrt(jnp.where(overflowed, eps, 1.0)), inverse_std)
    return centred * inverse_std, inverse_std


def _inverse_power_of_two(magnitude: jax.Array) -> jax.Array:
    """[D] -> 2^-e with 2^e <= magnitude < 2^(e+1), e clipped so that both are normal numbers."""
    finfo = jnp.finfo(magnitude.dtype)
    bits = jnp.int32 if finfo.bits == 32 else jnp.int64
    bias = finfo.maxexp - 1  # 127 for float32
    # The biased exponent field of a non-negative float; 2 bias - field negates the exponent.
    field = lax.bitcast_convert_type(magnitude, bits) >> finfo.nmant
    field = jnp.clip(field, 1, 2 * bias - 1)
    return lax.bitcast_convert_type((2 * bias - field) << finfo.nmant, magnitude.dtype)


def _global_standardized(z_a, z_b, axis_name, eps):
    """The standardised embeddings of the whole global batch: [N_global, D] each."""
    # At least float32 whatever comes in (bf16 embeddings give a float32 loss); float64 stays.
    dtype = jnp.promote_types(jnp.result_type(z_a), jnp.float32)
    z_a = jnp.asarray(z_a, dtype)
    z_b = jnp.asarray(z_b, dtype)
    if axis_name is not None:
        z_a = lax.all_gather(z_a, axis_name, axis=0, tiled=True)
        z_b = lax.all_gather(z_b, axis_name, axis=0, tiled=True)
    return _standardize(z_a, eps), _standardize(z_b, eps)


def _dimension_block(
    z: jax.Array, num_shards: int, shard_index
) -> tuple[jax.Array, jax.Array, jax.Array]:
    """This shard's block of embedding dimensions.

    Returns (z[:, block] zero-padded to a common width [N, B], the global indices of the block's
    dimensions [B], and whether each is a real dimension rather than padding [B]).
    """
    dim = z.shape[1]
    width = -(-dim // num_shards)
    if num_shards == 1:
        index = jnp.arange(dim)
        return z, index, jnp.ones((dim,), bool)
    z = jnp.pad(z, ((0, 0), (0, width * num_shards - dim)))
    start = shard_index * width
    block = lax.dynamic_slice_in_dim(z, start, width, axis=1)
    index = start + jnp.arange(width)
    return block, index, index < dim


def _diagonal_terms(za_block, zb_block, valid, global_batch):
    """Invariance term and sum of squared diagonal entries over one block of dimensions."""
    c_diag = jnp.sum(za_block * zb_block, axis=0) / global_batch  # [B]
    invariance = jnp.sum(jnp.where(valid, jnp.square(1.0 - c_diag), 0.0))
    diagonal_squares = jnp.sum(jnp.where(valid, jnp.square(c_diag), 0.0))
    return invariance, diagonal_squares


def _dense_partial(za, zb, num_shards, shard_index, global_batch, precision):
    """This shard's share of both terms from a [D, B] block of columns of C."""
    zb_block, column, valid = _dimension_block(zb, num_shards, shard_index)
    c_block = jnp.matmul(za.T, zb_block, precision=precision) / global_batch  # [D, B]
    row = jnp.arange(za.shape[1])[:, None]
    on_diagonal = row == column[None, :]
    invariance = jnp.sum(jnp.where(on_diagonal, jnp.square(1.0 - c_block), 0.0))
    redundancy = jnp.sum(jnp.where(on_diagonal | ~valid[None, :], 0.0, jnp.square(c_block)))
    return invariance, redundancy


def _gram_partial(za, zb, num_shards, shard_index, global_batch, precision):
    """This shard's share of both terms from its rows of the Gram matrices, C never formed."""
    if num_shards == 1:
        za_rows, zb_rows = za, zb
    else:
        rows = global_batch // num_shards
        za_rows = lax.dynamic_slice_in_dim(za, shard_index * rows, rows, axis=0)
        zb_rows = lax.dynamic_slice_in_dim(zb, shard_index * rows, rows, axis=0)
    gram_a = jnp.matmul(za_rows, za.T, precision=precision)  # [n, N]
    gram_b = jnp.matmul(zb_rows, zb.T, precision=precision)  # [n, N]
    all_squares = jnp.sum(gram_a * gram_b) / (global_batch * global_batch)
    za_block, _, valid = _dimension_block(za, num_shards, shard_index)
    zb_block, _, _ = _dimension_block(zb, num_shards, shard_index)
    invariance, diagonal_squares = _diagonal_terms(za_block, zb_block, valid, global_batch)
    return invariance, all_squares - diagonal_squares


def choose_method(global_batch: int, embedding_dim: int) -> str:
    """The cheaper evaluation for these shapes: ``"gram"`` when 2N < D, else ``"dense"``.

    Dense costs N D^2 multiply-adds; gram costs 2 N^2 D (two Gram matrices), so gram wins when
    2N < D. At equality dense is kept: it has no cancellation in the off-diagonal sum.
    """
    return "gram" if 2 * global_batch < embedding_dim else "dense"


def barlow_twins_terms(
    z_a: jax.Array,
    z_b: jax.Array,
    *,
    axis_name=None,
    method: str = "auto",
    eps: float = 1e-5,
    precision=lax.Precision.HIGHEST,
) -> BarlowTwinsTerms:
    """Both terms of the Barlow Twins objective over the global batch, in float32.

    See :func:`barlow_twins_loss` for the arguments; ``loss = invariance + lambd * redundancy``.
    """
    z_a, z_b, global_batch = _validate(z_a, z_b, method=method, eps=eps, axis_name=axis_name)
    if method == "auto":
        method = choose_method(global_batch, z_a.shape[1])
    if axis_name is None and _has_explicit_sharding(z_a, z_b):
        # Explicit-sharding meshes (jax.make_mesh's default) reject matmuls whose output
        # sharding is ambiguous; let the compiler choose inside, as in GSPMD, and return a
        # replicated scalar.
        terms = functools.partial(
            _terms,
            method=method,
            eps=eps,
            precision=precision,
            axis_name=None,
            global_batch=global_batch,
        )
        return BarlowTwinsTerms(*jax.sharding.auto_axes(terms, out_sharding=P())(z_a, z_b))
    return BarlowTwinsTerms(
        *_terms(
            z_a,
            z_b,
            method=method,
            eps=eps,
            precision=precision,
            axis_name=axis_name,
            global_batch=global_batch,
        )
    )


def _has_explicit_sharding(*arrays) -> bool:
    return any(axis is not None for z in arrays for axis in jax.typeof(z).sharding.spec)


# Jitted: called eagerly, the loss is one compiled program rather than dozens of dispatches.
@functools.partial(jax.jit, static_argnames=("method", "precision", "axis_name", "global_batch"))
def _terms(z_a, z_b, *, method, eps, precision, axis_name, global_batch):
    za, zb = _global_standardized(z_a, z_b, axis_name, eps)
    num_shards = _num_shards(axis_name)
    shard_index = 0 if axis_name is None else lax.axis_index(axis_name)
    partial = _dense_partial if method == "dense" else _gram_partial
    invariance, redundancy = partial(za, zb, num_shards, shard_index, global_batch, precision)
    if axis_name is not None:
        invariance, redundancy = lax.psum((invariance, redundancy), axis_name)
    return invariance, redundancy


def barlow_twins_loss(
    z_a: jax.Array,
    z_b: jax.Array,
    *,
    lambd: float = DEFAULT_LAMBD,
    axis_name=None,
    method: str = "auto",
    eps: float = 1e-5,
    precision=lax.Precision.HIGHEST,
    return_terms: bool = False,
):
    """The Barlow Twins loss of two views' embeddings over the global batch.

    Args:
        z_a: [n, D] embeddings of view A (this device's examples when ``axis_name`` is set): a
            JAX or NumPy array or nested lists, of any magnitude (see the module docstring).
        z_b: [n, D] embeddings of view B, row b the same image as row b of ``z_a``.
        lambd: weight of the redundancy-reduction term (official 0.0051).
        axis_name: the mapped axis of ``pmap`` / ``shard_map`` that splits the batch, or None for
            one device or GSPMD (``jit`` on batch-sharded arrays: XLA inserts the collectives).
        method: ``"dense"`` (form C), ``"gram"`` (never form C) or ``"auto"`` (the cheaper one for
            the shapes, :func:`choose_method`). All agree to ~1e-5 relative in float32.
        eps: added to the variance before the square root, as BatchNorm1d; 0 gives the paper's
            normalised cross-correlation exactly (a constant dimension then standardises to 0).
        precision: matmul precision. HIGHEST by default: on TPU and recent GPUs the default
            float32 matmul rounds inputs to bfloat16/TF32, and C is the numerically sensitive
            part of training (loss spikes under reduced precision are a known failure of other
            ports).
        return_terms: also return :class:`BarlowTwinsTerms`, computed once with the loss.

    Returns:
        The float32 scalar loss (the same on every device), or ``(loss, terms)``.

    Raises:
        LossError (a ValueError): bad shapes or dtype, a global batch under 2, an unknown method,
        or a ``lambd`` or ``eps`` that is negative, NaN or infinite. A traced ``lambd`` or
        ``eps`` (an argument of a jitted or vmapped function, e.g. a sweep) has no value when the
        loss is traced and cannot be checked: a NaN one gives a NaN loss.

    Gradient convention, under ``axis_name``: every device returns the loss L of the concatenated
    global batch, and the standard data-parallel recipe, per-device ``jax.grad`` then
    ``lax.pmean(grads, axis_name)``, gives exactly the gradient of L computed on one device with
    the whole batch. (Under ``pmap`` and ``shard_map(check_vma=False)`` the psum of the partial
    terms transposes to a psum, so each device's raw gradient is K times its share and the pmean
    sums the shares; under ``shard_map`` with the default ``check_vma=True`` the gradient of
    replicated parameters already comes out as the exact total, and the pmean leaves it
    unchanged.) This differs from the official PyTorch code, whose untracked all-reduce of C
    yields gradients divided by the number of GPUs.
    """
    _check_finite_non_negative(
        "lambd",
        lambd,
        f"It weighs the redundancy-reduction term; the official value is {DEFAULT_LAMBD}.",
    )
    terms = barlow_twins_terms(
        z_a, z_b, axis_name=axis_name, method=method, eps=eps, precision=precision
    )
    loss = terms.invariance + lambd * terms.redundancy
    return (loss, terms) if return_terms else loss


def cross_correlation(
    z_a: jax.Array,
    z_b: jax.Array,
    *,
    axis_name=None,
    eps: float = 1e-5,
    precision=lax.Precision.HIGHEST,
) -> jax.Array:
    """The cross-correlation matrix C of the global batch: [D, D] float32, entries in [-1, 1].

    z_a, z_b: [n, D] (this device's rows when ``axis_name`` is set). Every device returns the
    whole matrix, so this costs O(N D^2) per device: use it for logging and pictures; the loss
    itself never needs it (:func:`barlow_twins_loss`).
    """
    z_a, z_b, global_batch = _validate(z_a, z_b, method="dense", eps=eps, axis_name=axis_name)
    return _cross_correlation(z_a, z_b, eps=eps, precision=precision, axis_name=axis_name)


@functools.partial(jax.jit, static_argnames=("precision", "axis_name"))
def _cross_correlation(z_a, z_b, *, eps, precision, axis_name):
    za, zb = _global_standardized(z_a, z_b, axis_name, eps)
    return jnp.matmul(za.T, zb, precision=precision) / za.shape[0]


__all__ = [
    "BarlowTwinsTerms",
    "DEFAULT_LAMBD",
    "LossError",
    "METHODS",
    "barlow_twins_loss",
    "barlow_twins_terms",
    "choose_method",
    "cross_correlation",
]
