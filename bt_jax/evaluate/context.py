"""What a protocol needs, and the registry of protocols by name (big_vision's evaluators).

A protocol is a function ``fn(context, variables) -> dict`` registered under a name: it scores
one backbone (``variables`` = {"params", "batch_stats"}, host arrays) on the context's labelled
data and returns its results ({"top1", "top5", ...}). The run's pretrained backbone and each
baseline go through the same function.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Callable

import flax.linen as nn
import jax
import ml_collections
import numpy as np

from bt_jax import data
from bt_jax import errors
from bt_jax import features

Protocol = Callable[["Context", Any], dict]
PROTOCOLS: dict[str, Protocol] = {}
QUICK = ("logreg", "knn")  # the protocols the main job ends with: seconds to minutes


class EvaluationError(errors.Error):
    """Something about the run or the request that makes evaluation impossible."""


class UnlabelledSourceError(EvaluationError):
    """The dataset has no labels, which every protocol needs."""


def register(name: str) -> Callable[[Protocol], Protocol]:
    def add(fn: Protocol) -> Protocol:
        PROTOCOLS[name] = fn
        return fn

    return add


def check_protocol(name: str) -> str:
    if name not in PROTOCOLS:
        raise EvaluationError(
            f"Unknown protocol {name!r}. Known protocols: {', '.join(sorted(PROTOCOLS))}.")
    return name


@dataclasses.dataclass
class Context:
    """The labelled data, the architecture and the devices a protocol runs on.

    config: the run's config (``config.eval`` holds the protocols' settings).
    source: the labelled dataset (the pretraining one, or ``config.eval.dataset``).
    module: the backbone, without a cross-device axis (evaluation uses GSPMD: jit over
      batch-sharded arrays, so BatchNorm in train mode sees the global batch).
    mesh: every device of every process.
    """

    config: ml_collections.ConfigDict
    source: data.Source
    module: nn.Module
    mesh: jax.sharding.Mesh
    _representations: dict = dataclasses.field(default_factory=dict, repr=False)

    @property
    def num_classes(self) -> int:
        return int(self.source.num_classes)

    def representations(self, variables: Any, split: str) -> tuple[np.ndarray, np.ndarray]:
        """(features float32 [N, F], labels int32 [N]) of ``split``, extracted once per
        backbone (keyed by the identity of ``variables``: keep them alive while evaluating)."""
        key = (id(variables), split)
        if key not in self._representations:
            self._representations[key] = features.representations(
                self.module, variables, self.source, split=split,
                image_size=self.config.data.image_size,
                resize_size=self.config.data.eval_resize, mesh=self.mesh)
        return self._representations[key]

    def forget(self, variables: Any) -> None:
        """Drops the cached representations of one backbone."""
        for key in [k for k in self._representations if k[0] == id(variables)]:
            del self._representations[key]


def labelled(features_or_pixels: np.ndarray, labels: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Drops examples without a label (-1: images at the root of an image folder)."""
    keep = labels >= 0
    return features_or_pixels[keep], labels[keep]


def topk_accuracy(scores: np.ndarray, labels: np.ndarray,
                  ks: tuple[int, ...] = (1, 5)) -> dict[str, float]:
    """{"top1": ..., "top5": ...}: fraction of rows whose label is among the k highest scores.

    scores: [N, C]; labels: int [N]. k is clipped to C (top-5 of 3 classes is 1.0).
    """
    scores, labels = np.asarray(scores), np.asarray(labels)
    order = np.argsort(-scores, axis=1, kind="stable")
    results = {}
    for k in ks:
        hit = np.any(order[:, :min(k, scores.shape[1])] == labels[:, None], axis=1)
        results[f"top{k}"] = float(np.mean(hit)) if len(labels) else float("nan")
    return results
