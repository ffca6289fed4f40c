"""The kNN protocol: weighted k-nearest neighbours on L2-normalised representations.

Cosine similarity, each test example's k most similar train examples vote for their class with
weight exp(similarity / T) (InstDisc; the protocol of solo-learn and lightly: k = 200, T = 0.1).
The test examples are split over every device (GSPMD); the train set is on each.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np

from bt_jax import parallel
from bt_jax.evaluate.context import Backbone, Context, labelled, register, topk_accuracy

CHUNK_SIZE = 256  # test examples per similarity block: memory is chunk x num_train floats


def _l2_normalize(x: jax.Array) -> jax.Array:
    return x / jnp.maximum(jnp.linalg.norm(x, axis=-1, keepdims=True), 1e-12)


@functools.partial(jax.jit, static_argnames=("num_classes", "k", "chunk_size"))
def _scores(
    train_features, train_labels, test_features, temperature, *, num_classes, k, chunk_size
):
    train_features = _l2_normalize(train_features)
    test_features = _l2_normalize(test_features)

    def chunk_scores(queries):  # [chunk, F] -> [chunk, C]
        similarity = jnp.matmul(queries, train_features.T, precision=jax.lax.Precision.HIGHEST)
        top_similarity, top_index = jax.lax.top_k(similarity, k)  # [chunk, k]
        weights = jnp.exp(top_similarity / temperature)
        votes = jax.nn.one_hot(train_labels[top_index], num_classes) * weights[..., None]
        return jnp.sum(votes, axis=1)

    chunks = test_features.reshape(-1, chunk_size, test_features.shape[-1])
    return jax.lax.map(chunk_scores, chunks).reshape(-1, num_classes)


def knn_scores(
    train_features: np.ndarray,
    train_labels: np.ndarray,
    test_features: np.ndarray,
    *,
    num_classes: int,
    k: int,
    temperature: float,
    chunk_size: int = CHUNK_SIZE,
    mesh: jax.sharding.Mesh | None = None,
) -> np.ndarray:
    """Weighted kNN class scores: float32 [M, num_classes].

    train_features [N, F], train_labels int [N] in [0, num_classes), test_features [M, F]. k is
    clipped to N. With ``mesh``, the test examples are split over its devices (and processes);
    the scores come back whole on every process.
    """
    k = min(int(k), len(train_features))
    num_test = len(test_features)
    chunk_size = max(1, min(chunk_size, num_test))
    shards = 1 if mesh is None else mesh.size
    padded_size = -(-num_test // (chunk_size * shards)) * chunk_size * shards
    padded = np.zeros((padded_size, test_features.shape[1]), np.float32)
    padded[:num_test] = test_features
    arguments = (
        np.asarray(train_features, np.float32),
        np.asarray(train_labels, np.int32),
        padded,
        jnp.float32(temperature),
    )
    if mesh is not None:
        arguments = (
            *parallel.replicate(arguments[:2], mesh),
            parallel.split_rows(padded, mesh),
            arguments[3],
        )
    scores = _scores(*arguments, num_classes=int(num_classes), k=k, chunk_size=chunk_size)
    return np.asarray(parallel.gather_to_host(scores) if mesh is not None else scores)[:num_test]


def knn_protocol(
    train_features: np.ndarray,
    train_labels: np.ndarray,
    test_features: np.ndarray,
    test_labels: np.ndarray,
    *,
    num_classes: int,
    k: int,
    temperature: float,
    mesh: jax.sharding.Mesh | None = None,
) -> dict:
    """{"top1", "top5", "k"}: weighted kNN accuracy on the test set (labels -1 left out)."""
    train_features, train_labels = labelled(train_features, train_labels)
    test_features, test_labels = labelled(test_features, test_labels)
    scores = knn_scores(
        train_features,
        train_labels,
        test_features,
        num_classes=num_classes,
        k=k,
        temperature=temperature,
        mesh=mesh,
    )
    return {**topk_accuracy(scores, test_labels), "k": min(int(k), len(train_features))}


@register("knn")
def knn(context: Context, backbone: Backbone) -> dict:
    settings = context.config.eval
    return knn_protocol(
        *context.representations(backbone, "train"),
        *context.representations(backbone, "test"),
        num_classes=context.num_classes,
        k=settings.knn_k,
        temperature=settings.knn_temperature,
        mesh=context.mesh,
    )
