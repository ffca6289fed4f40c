"""What the linear and fine-tuning protocols share: the head, the labelled training batches on
every device, and the test accuracy of backbone + head."""

from __future__ import annotations

import functools
from collections.abc import Iterator
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
from absl import logging

from bt_jax import data, parallel
from bt_jax.evaluate.context import (
    Backbone,
    Context,
    UnlabelledSourceError,
    labelled,
    topk_accuracy,
)

HEAD_SALT = 0x4EAD  # the classifier's initialisation key, folded into config.seed


def train_labels(source: data.Source) -> np.ndarray:
    """Labels int32 of the train split (read once from disk for tfds data sources)."""
    split = source.split("train")
    if split.labels is None:
        logging.info("Reading the labels of %d examples.", split.num_examples)
        chunks = [
            split.fetch(np.arange(start, min(start + 4096, split.num_examples)))[1]
            for start in range(0, split.num_examples, 4096)
        ]
        split.labels = np.concatenate(chunks).astype(np.int32)
    return split.labels


def labelled_train_indices(source: data.Source) -> np.ndarray:
    """Indices int64 of the train-split examples that have a label."""
    indices = np.flatnonzero(train_labels(source) >= 0)
    if len(indices) == 0:
        raise UnlabelledSourceError(
            f"No example of the train split of {source.name!r} has a label: nothing to train a "
            "classifier on. Put the images in one sub-folder per class, or use another dataset."
        )
    return indices


def batch_size_for(wanted: int, num_examples: int, device_count: int) -> int:
    """The global batch: ``wanted``, at most the examples, a multiple of the devices."""
    size = min(wanted, num_examples) // device_count * device_count
    return max(size, device_count)


@functools.cache
def linear_head(num_classes: int) -> nn.Dense:
    """The classifier: weights N(0, 0.01), bias 0 (official evaluate.py). Cached: its
    initialisers are new closures each call, and the jitted steps take it as a static value."""
    return nn.Dense(
        num_classes, kernel_init=nn.initializers.normal(0.01), bias_init=nn.initializers.zeros
    )


def init_head(head: nn.Dense, num_features: int, seed: int) -> dict:
    key = jax.random.fold_in(jax.random.key(seed), HEAD_SALT)
    return head.init(key, jnp.zeros((1, num_features), jnp.float32))["params"]


def cross_entropy(logits: jax.Array, labels: jax.Array) -> jax.Array:
    return jnp.mean(optax.softmax_cross_entropy_with_integer_labels(logits, labels))


def training_batches(
    context: Context, indices: np.ndarray, *, batch_size: int, num_epochs: int
) -> Iterator[dict]:
    """Crop + flip views of the train examples ``indices``, ``num_epochs`` epochs, as global
    arrays {"image": uint8 [batch_size, H, W, 3], "label": int32 [batch_size]} split over the
    mesh (each process reads its rows, ``bt_jax.data.labelled_batches``)."""
    for local in data.labelled_batches(
        context.source,
        indices,
        batch_size=batch_size,
        image_size=context.config.data.image_size,
        seed=context.config.seed,
        num_epochs=num_epochs,
        min_crop_scale=context.config.data.min_crop_scale,
        process_index=jax.process_index(),
        process_count=jax.process_count(),
    ):
        yield parallel.global_batch(local, context.mesh)


def test_accuracy(context: Context, head: nn.Dense, backbone: Backbone, head_params: Any) -> dict:
    """{"top1", "top5"} of backbone (inference mode) + head on the test split."""
    features, labels = labelled(*context.representations(backbone, "test"))
    logits = head.apply({"params": head_params}, features)
    return topk_accuracy(np.asarray(logits), labels)
