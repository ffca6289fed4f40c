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
"""

from __future__ import annotations

import functools
from typing import NamedTuple

import jax
import jax.numpy as jnp
from jax import lax
from jax.sharding import PartitionSpec as P

METHODS = ("auto", "dense", "gram")
DEFAULT_LAMBD = 0.0051  # The official code; the paper's text says 5e-3.


class BarlowTwinsTerms(NamedTuple):
    """The two terms of the objective, for logging. ``loss = invariance + lambd * redundancy``."""

    invariance: jax.Array  # sum_i (1 - C_ii)^2
    redundancy: jax.Array  # sum_{i != j} C_ij^2, not yet multiplied by lambd


def _validate(z_a: jax.Array, z_b: jax.Array, *, method: str, eps: float, axis_name) -> int:
    """Checks the arguments; returns the global batch size."""
    for name, z in (("z_a", z_a), ("z_b", z_b)):
        if jnp.ndim(z) != 2:
            raise ValueError(
                    f"{name} must be a 2-D array of embeddings [batch, embedding_dim]; got shape "
                    f"{jnp.shape(z)}. Flatten or pool your features first.")
        dtype = jnp.result_type(z)
        if not jnp.issubdtype(dtype, jnp.floating):
            raise ValueError(
                    f"{name} must be floating point (float32, bfloat16, float16, float64); got {dtype}. "
                    "Cast the embeddings, e.g. z.astype(jnp.float32).")
    if jnp.shape(z_a) != jnp.shape(z_b):
        raise ValueError(
                f"z_a and z_b must have the same shape [batch, embedding_dim]; got {jnp.shape(z_a)} "
                f"and {jnp.shape(z_b)}. They are the embeddings of two views of the same images.")
    if method not in METHODS:
        raise ValueError(f"method must be one of {METHODS}; got {method!r}.")
    if not isinstance(eps, jax.core.Tracer) and float(eps) < 0:
        raise ValueError(f"eps must be >= 0; got {eps}.")
    global_batch = z_a.shape[0] * _num_shards(axis_name)
    if global_batch < 2:
        raise ValueError(
                f"The global batch has {global_batch} example(s); the cross-correlation needs at "
                "least 2 to standardise each dimension. Use a larger batch.")
    return global_batch


def _validate_lambd(lambd) -> None:
    if isinstance(lambd, jax.core.Tracer):
        return  # A traced lambd (e.g. in a vmapped sweep) cannot be checked at trace time.
    if float(lambd) < 0:
        raise ValueError(
                f"lambd weighs the redundancy-reduction term and must be >= 0; got {lambd}. "
                f"The official value is {DEFAULT_LAMBD}.")


def _num_shards(axis_name) -> int:
    return 1 if axis_name is None else lax.axis_size(axis_name)


def _standardize(z: jax.Array, eps) -> jax.Array:
    """z: [N, D] -> per-dimension zero mean and unit (biased) variance over the batch."""
    mean = jnp.mean(z, axis=0)
    centred = z - mean
    variance = jnp.mean(jnp.square(centred), axis=0)
    return centred * lax.rsqrt(variance + eps)


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
    global_batch = _validate(z_a, z_b, method=method, eps=eps, axis_name=axis_name)
    if method == "auto":
        method = choose_method(global_batch, z_a.shape[1])
    if axis_name is None and _has_explicit_sharding(z_a, z_b):
        # Explicit-sharding meshes (jax.make_mesh's default) reject matmuls whose output
        # sharding is ambiguous; let the compiler choose inside, as in GSPMD, and return a
        # replicated scalar.
        terms = functools.partial(_terms, method=method, eps=eps, precision=precision,
                                  axis_name=None, global_batch=global_batch)
        return BarlowTwinsTerms(*jax.sharding.auto_axes(terms, out_sharding=P())(z_a, z_b))
    return BarlowTwinsTerms(*_terms(z_a, z_b, method=method, eps=eps, precision=precision,
                                    axis_name=axis_name, global_batch=global_batch))


def _has_explicit_sharding(*arrays) -> bool:
    return any(axis is not None for z in arrays for axis in jax.typeof(z).sharding.spec)


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
        z_a: [n, D] embeddings of view A (this device's examples when ``axis_name`` is set).
        z_b: [n, D] embeddings of view B, row b the same image as row b of ``z_a``.
        lambd: weight of the redundancy-reduction term (official 0.0051).
        axis_name: the mapped axis of ``pmap`` / ``shard_map`` that splits the batch, or None for
            one device or GSPMD (``jit`` on batch-sharded arrays: XLA inserts the collectives).
        method: ``"dense"`` (form C), ``"gram"`` (never form C) or ``"auto"`` (the cheaper one for
            the shapes, :func:`choose_method`). All agree to ~1e-5 relative in float32.
        eps: added to the variance before the square root, as BatchNorm1d; 0 gives the paper's
            normalised cross-correlation exactly.
        precision: matmul precision. HIGHEST by default: on TPU and recent GPUs the default float32
            matmul rounds inputs to bfloat16/TF32, and C is the numerically sensitive part of training
            (loss spikes under reduced precision are a known failure of other ports).
        return_terms: also return :class:`BarlowTwinsTerms`, computed once with the loss.

    Returns:
        The float32 scalar loss (the same on every device), or ``(loss, terms)``.

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
    _validate_lambd(lambd)
    terms = barlow_twins_terms(
            z_a, z_b, axis_name=axis_name, method=method, eps=eps, precision=precision)
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
    global_batch = _validate(z_a, z_b, method="dense", eps=eps, axis_name=axis_name)
    za, zb = _global_standardized(z_a, z_b, axis_name, eps)
    return jnp.matmul(za.T, zb, precision=precision) / global_batch


__all__ = [
        "BarlowTwinsTerms",
        "DEFAULT_LAMBD",
        "METHODS",
        "barlow_twins_loss",
        "barlow_twins_terms",
        "choose_method",
        "cross_correlation",
]
