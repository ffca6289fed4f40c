"""Divergence checks: nothing diverged is ever saved as a checkpoint or called good.

The trainer checks every step's metrics when it logs them, and the whole state before every
checkpoint, so each retained checkpoint is one that every step up to it passed:

* the loss must be finite;
* the terms must not have the signature of collapsed or overflowed embeddings: a batch whose
  embeddings are constant per dimension standardises to zeros, so C = 0, the invariance term is
  exactly D and the redundancy term exactly 0 (the loss itself is finite, so a loss check alone
  misses it);
* every value of the state (parameters, BatchNorm statistics, optimiser and probe states) must
  be finite and below :data:`DIVERGED_MAGNITUDE`, where squares overflow float32 (a run with a
  huge learning rate reaches 1e19 before its loss turns NaN).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from bt_jax import errors

COLLAPSE_TOLERANCE = 1e-6
DIVERGED_MAGNITUDE = 1e18


class DivergenceError(errors.Error):
    """Training diverged; the last good checkpoint is left as it was."""


def check_metrics(
    step: int, metrics: dict, embedding_dim: int, last_good: Callable[[], str]
) -> None:
    """DivergenceError for a non-finite loss or the collapse signature at ``step``.

    metrics: host values {"loss", "invariance", "redundancy", ...}; last_good() says what to tell
    the user about the checkpoints ("the last good checkpoint (step 400) is intact"), asked only
    on failure (it waits for a save in flight).
    """
    loss = metrics["loss"]
    if not np.isfinite(loss):
        raise DivergenceError(
            f"The loss is {loss} at step {step}. Training stopped; {last_good()}. Lower "
            "the learning rate, or use model.dtype=float32 if you trained in reduced precision."
        )
    invariance, redundancy = metrics["invariance"], metrics["redundancy"]
    if (
        abs(invariance - embedding_dim) <= COLLAPSE_TOLERANCE * embedding_dim
        and redundancy <= COLLAPSE_TOLERANCE
    ):
        raise DivergenceError(
            f"The embeddings are constant over the batch at step {step} (the cross-correlation "
            f"is all zero: invariance {invariance:.6g} = D, redundancy {redundancy:.3g}): the "
            f"run collapsed or diverged. Training stopped; {last_good()}. Lower the learning rate."
        )


@jax.jit
def largest_magnitude(tree: Any) -> jax.Array:
    """max |x| over every floating-point value of ``tree`` (inf or nan if any is)."""
    leaves = [x for x in jax.tree.leaves(tree) if jnp.issubdtype(jnp.result_type(x), jnp.inexact)]
    return jnp.max(jnp.stack([jnp.max(jnp.abs(x)) for x in leaves]))


def check_state(step: int, largest: float, last_good: Callable[[], str]) -> None:
    """DivergenceError unless the state's ``largest`` magnitude is finite and sane."""
    if not np.isfinite(largest) or largest >= DIVERGED_MAGNITUDE:
        raise DivergenceError(
            f"The training state after step {step} has diverged (largest magnitude {largest:.3g}"
            f"{'' if np.isfinite(largest) else ', not finite'}). Training stopped before saving "
            f"it; {last_good()}. Lower the learning rate."
        )
