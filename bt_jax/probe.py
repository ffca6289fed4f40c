"""The online linear probe: a classifier trained beside pretraining on stop-gradient features.

The authors tracked one (official issue #26): each step, a linear layer on view A's pooled
representation takes one SGD step on the labelled examples of the batch (labels -1 are left out),
with its own optimiser, so it never touches the backbone's gradients. Its test accuracy, logged
every epoch, shows whether the representation is improving without a separate evaluation run.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import jax
import jax.numpy as jnp
import numpy as np
import optax
from jax import lax

if TYPE_CHECKING:  # the step imports this module; it must run without ml_collections and TF
    import ml_collections

MOMENTUM = 0.9


def optimizer(probe_config: ml_collections.ConfigDict) -> optax.GradientTransformation:
    """SGD with momentum 0.9 at ``config.probe.learning_rate``; nothing shared with LARS."""
    return optax.sgd(probe_config.learning_rate, momentum=MOMENTUM)


def init_params(num_features: int, num_classes: int | None) -> dict:
    """{"kernel": zeros [F, C], "bias": zeros [C]}, or {} (no probe) when num_classes is None."""
    if not num_classes:
        return {}
    return {
        "kernel": jnp.zeros((num_features, num_classes), jnp.float32),
        "bias": jnp.zeros((num_classes,), jnp.float32),
    }


def logits(params: dict, representation: jax.Array) -> jax.Array:
    """representation: [n, F] -> logits [n, C]."""
    return representation @ params["kernel"] + params["bias"]


def step(
    params: dict,
    opt_state,
    representation: jax.Array,
    labels: jax.Array,
    *,
    tx: optax.GradientTransformation,
    axis_name: str,
):
    """One SGD step over the global batch, per device inside ``shard_map`` / ``pmap``.

    representation: [n, F] (its gradient is stopped); labels: int32 [n], -1 where unknown.
    Returns (params, opt_state, {"probe_loss", "probe_train_accuracy"}), the same on every
    device.
    """
    representation = lax.stop_gradient(representation.astype(jnp.float32))
    known = labels >= 0
    count = jnp.maximum(lax.psum(jnp.sum(known), axis_name), 1)

    def loss_fn(p):
        batch_logits = logits(p, representation)
        losses = optax.softmax_cross_entropy_with_integer_labels(
            batch_logits, jnp.maximum(labels, 0)
        )
        # psum makes it the global mean, so the same pmean recipe as the main loss applies.
        return lax.psum(jnp.sum(jnp.where(known, losses, 0.0)), axis_name) / count, batch_logits

    (loss, batch_logits), grads = jax.value_and_grad(loss_fn, has_aux=True)(params)
    grads = lax.pmean(grads, axis_name)
    updates, opt_state = tx.update(grads, opt_state, params)
    correct = jnp.sum(jnp.where(known, jnp.argmax(batch_logits, -1) == labels, False))
    accuracy = lax.psum(correct, axis_name) / count
    return (
        optax.apply_updates(params, updates),
        opt_state,
        {"probe_loss": loss, "probe_train_accuracy": accuracy},
    )


class _Prediction:
    """features.map_split's fn: the probe's predicted class of each image, int32 [n]."""

    def __init__(self, backbone):
        self.backbone = backbone

    def __call__(self, variables, images: jax.Array) -> jax.Array:
        representation = self.backbone.apply(variables["backbone"], images, train=False)
        return jnp.argmax(logits(variables["probe"], representation), axis=-1)

    def __hash__(self) -> int:
        return hash(self.backbone)

    def __eq__(self, other: Any) -> bool:
        return isinstance(other, _Prediction) and other.backbone == self.backbone


def test_accuracy(
    backbone, state: Any, source, *, image_size: int, resize_size: int, mesh: jax.sharding.Mesh
) -> float:
    """The probe's top-1 on the test split of ``source`` (evaluation transform), computed on
    every device of every process (``bt_jax.features``); the same on every process."""
    variables = {
        "backbone": {
            "params": state.params["backbone"],
            "batch_stats": state.batch_stats["backbone"],
        },
        "probe": state.probe_params,
    }
    from bt_jax import features  # reads the test split: the input pipeline, TensorFlow

    predictions, labels = features.map_split(
        _Prediction(backbone.clone(axis_name=None)),
        variables,
        features.split_batches(
            source, split="test", image_size=image_size, resize_size=resize_size, mesh=mesh
        ),
        mesh=mesh,
    )
    known = labels >= 0
    return float(np.mean(predictions[known] == labels[known])) if np.any(known) else float("nan")
