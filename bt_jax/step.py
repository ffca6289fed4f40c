"""The per-device pretraining step and the per-epoch picture of C.

Both are per-device functions over the named axis ``axis_name`` (``bt_jax.parallel.map_step``
runs them under ``shard_map`` or ``pmap``): each device holds ``n`` examples of the global batch,
BatchNorm normalises over the whole global batch (SyncBatchNorm), the loss is computed over the
all-gathered embeddings, and ``pmean`` of the gradients is exactly the single-device gradient on
the global batch (see ``bt_jax.loss``).
"""

from __future__ import annotations

from collections.abc import Callable, Mapping

import chex
import jax
import jax.numpy as jnp
import optax
from jax import lax

from bt_jax import loss as loss_lib
from bt_jax import probe
from bt_jax.parallel import AXIS
from bt_jax.state import TrainState

# batch (uint8 views, labels, indices, epochs) -> {"view_a", "view_b": float32 [n, H, W, 3]}.
FinishViews = Callable[[Mapping[str, jax.Array]], dict[str, jax.Array]]


def check_batch(batch: Mapping[str, jax.Array]) -> None:
    """The batch entering the step, checked at trace time (free per step): views [n, H, W, 3]
    of one shape, and [n] labels, indices and epochs. A wrong layout fails here, by name, rather
    than deep inside XLA."""
    chex.assert_rank(batch["view_a"], 4)
    chex.assert_equal_shape([batch["view_a"], batch["view_b"]])
    chex.assert_axis_dimension(batch["view_a"], 3, 3)
    per_device_batch = batch["view_a"].shape[0]
    for key in ("label", "index", "epoch"):
        if key in batch:
            chex.assert_shape(batch[key], (per_device_batch,))


def _embed_both_views(model, params, batch_stats, views, rng, views_in_one_call: bool):
    """(representation of A, z_a, z_b, new batch_stats).

    Each view's BatchNorm statistics are its own and the running averages are updated twice per
    step, view A first, as the official code's two calls do: either with two calls, or with one
    call on both views stacked (``views=2``), where every convolution sees twice the batch.
    """
    del rng  # The model has no stochastic layer; the key is kept for those that do.
    variables = {"params": params, "batch_stats": batch_stats}
    if views_in_one_call:
        n = views["view_a"].shape[0]
        both = jnp.concatenate([views["view_a"], views["view_b"]])
        (representation, z), updates = model.apply(
            variables, both, train=True, views=2, mutable=["batch_stats"]
        )
        return representation[:n], z[:n], z[n:], updates["batch_stats"]
    (representation_a, z_a), updates = model.apply(
        variables, views["view_a"], train=True, mutable=["batch_stats"]
    )
    (_, z_b), updates = model.apply(
        {"params": params, **updates}, views["view_b"], train=True, mutable=["batch_stats"]
    )
    return representation_a, z_a, z_b, updates["batch_stats"]


def train_step(
    state: TrainState,
    batch: Mapping[str, jax.Array],
    rng: jax.Array,
    *,
    model,
    tx: optax.GradientTransformation,
    probe_tx: optax.GradientTransformation,
    loss_options: Mapping,
    finish_views: FinishViews,
    views_in_one_call: bool = True,
    axis_name: str = AXIS,
) -> tuple[TrainState, dict]:
    """One update, per device.

    batch: this device's n examples, {"view_a", "view_b": uint8 [n, H, W, 3], "label": int32
    [n], "index", "epoch": int32 [n]} (``bt_jax.data.pretrain_batches``); ``finish_views`` turns
    them into normalised float32 views (and runs the photometric ops when they are on the device).
    rng: the step's key, folded with the device index for any stochastic layer.
    loss_options: ``config.loss`` (lambd, method).
    views_in_one_call: both views through the model in one call (each still normalised with its
    own BatchNorm statistics; faster on the CPU, ``experiments/benchmarks/train_step.py``) rather
    than one call per view; the same values either way.
    Returns the new state and {"loss", "invariance", "redundancy"[, "probe_loss",
    "probe_train_accuracy"]}, the same on every device.
    """
    check_batch(batch)
    views = finish_views(batch)
    rng = jax.random.fold_in(rng, lax.axis_index(axis_name))

    def loss_fn(params):
        representation_a, z_a, z_b, batch_stats = _embed_both_views(
            model, params, state.batch_stats, views, rng, views_in_one_call
        )
        chex.assert_rank([z_a, z_b], 2)  # embeddings leaving the model: [n, D]
        loss, terms = loss_lib.barlow_twins_loss(
            z_a, z_b, axis_name=axis_name, return_terms=True, **loss_options
        )
        return loss, (terms, batch_stats, representation_a)

    (loss, (terms, batch_stats, representation_a)), grads = jax.value_and_grad(
        loss_fn, has_aux=True
    )(state.params)
    grads = lax.pmean(grads, axis_name)
    updates, opt_state = tx.update(grads, state.opt_state, state.params)
    params = optax.apply_updates(state.params, updates)
    metrics = {"loss": loss, "invariance": terms.invariance, "redundancy": terms.redundancy}
    probe_params, probe_opt_state = state.probe_params, state.probe_opt_state
    if probe_params:
        probe_params, probe_opt_state, probe_metrics = probe.step(
            probe_params,
            probe_opt_state,
            representation_a,
            batch["label"],
            tx=probe_tx,
            axis_name=axis_name,
        )
        metrics.update(probe_metrics)
    new_state = state.replace(
        step=state.step + 1,
        params=params,
        batch_stats=batch_stats,
        opt_state=opt_state,
        probe_params=probe_params,
        probe_opt_state=probe_opt_state,
    )
    return new_state, metrics


def correlation_block(
    state: TrainState,
    batch: Mapping[str, jax.Array],
    rng: jax.Array,
    *,
    model,
    size: int,
    finish_views: FinishViews,
    views_in_one_call: bool = True,
    axis_name: str = AXIS,
) -> tuple[None, jax.Array]:
    """The leading [size, size] block of C on this batch (training-mode BatchNorm, nothing
    updated), for the picture of C approaching the identity; the same on every device.

    Returns ``(None, block)`` so that it maps like a step that leaves the state alone.
    """
    del rng
    views = finish_views(batch)
    _, z_a, z_b, _ = _embed_both_views(
        model, state.params, state.batch_stats, views, None, views_in_one_call
    )
    size = min(size, z_a.shape[-1])
    block = loss_lib.cross_correlation(z_a[:, :size], z_b[:, :size], axis_name=axis_name)
    # Every device computed the same block; the pmean says so to shard_map (a [size, size]
    # collective once an epoch), so it comes back replicated and any process can read it.
    return None, lax.pmean(block, axis_name)
