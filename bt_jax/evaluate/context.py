"""What a protocol needs, and the registry of protocols by name (big_vision's evaluators).

A protocol is a function ``fn(context, backbone) -> dict`` registered under a name: it scores
one :class:`Backbone` on the context's labelled data and returns its results ({"top1", "top5",
...}). The run's pretrained backbone and each baseline go through the same function.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Iterable
from typing import Any

import flax.linen as nn
import jax
import ml_collections
import numpy as np

from bt_jax import data, errors, features, parallel

Protocol = Callable[["Context", "Backbone"], dict]
PROTOCOLS: dict[str, Protocol] = {}
QUICK = ("logreg", "knn")  # the protocols the main job ends with: seconds to minutes
# A split whose evaluation images (this process's share, uint8) fit in this many bytes is read
# once and kept for every backbone (the baselines: ~10 passes over the data at the end of a
# run); a larger one (ImageNet's train split: 193 GB at 224 px) is read again for each.
KEEP_SPLIT_MAX_BYTES = 2**30


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
            f"Unknown protocol {name!r}. Known protocols: {', '.join(sorted(PROTOCOLS))}."
        )
    return name


@dataclasses.dataclass(eq=False)
class Backbone:
    """One backbone to score: its name ("pretrained", "random_init", ...), its variables
    {"params", "batch_stats"} (host arrays), and what is computed from them once for every
    protocol (the variables on the devices, the representations of each split)."""

    name: str
    variables: Any
    placed: Any = None
    representations: dict = dataclasses.field(default_factory=dict, repr=False)


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
    kept_batches: dict = dataclasses.field(default_factory=dict, repr=False)

    @property
    def num_classes(self) -> int:
        return int(self.source.num_classes)

    def batches(self, split: str) -> Iterable[dict]:
        """This process's share of the split's evaluation batches (``features.split_batches``);
        read once and kept when it holds at most KEEP_SPLIT_MAX_BYTES of images."""
        if split in self.kept_batches:
            return self.kept_batches[split]
        image_size = self.config.data.image_size
        batches = features.split_batches(
            self.source,
            split=split,
            image_size=image_size,
            resize_size=self.config.data.eval_resize,
            mesh=self.mesh,
        )
        local_examples = -(-self.source.num_examples(split) // jax.process_count())
        if local_examples * image_size**2 * 3 > KEEP_SPLIT_MAX_BYTES:
            return batches
        self.kept_batches[split] = list(batches)
        return self.kept_batches[split]

    def placed(self, backbone: Backbone) -> Any:
        """The backbone's variables replicated over the mesh (placed once)."""
        if backbone.placed is None:
            backbone.placed = parallel.replicate(backbone.variables, self.mesh)
        return backbone.placed

    def representations(self, backbone: Backbone, split: str) -> tuple[np.ndarray, np.ndarray]:
        """(features float32 [N, F], labels int32 [N]) of ``split``, extracted once per
        backbone, on every device of every process."""
        if split not in backbone.representations:
            backbone.representations[split] = features.representations(
                self.module, self.placed(backbone), self.batches(split), mesh=self.mesh
            )
        return backbone.representations[split]


def labelled(features_or_pixels: np.ndarray, labels: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Drops examples without a label (-1: images at the root of an image folder)."""
    keep = labels >= 0
    return features_or_pixels[keep], labels[keep]


def topk_accuracy(
    scores: np.ndarray, labels: np.ndarray, ks: tuple[int, ...] = (1, 5)
) -> dict[str, float]:
    """{"top1": ..., "top5": ...}: fraction of rows whose label is among the k highest scores.

    scores: [N, C]; labels: int [N]. k is clipped to C (top-5 of 3 classes is 1.0).
    """
    scores, labels = np.asarray(scores), np.asarray(labels)
    order = np.argsort(-scores, axis=1, kind="stable")
    results = {}
    for k in ks:
        hit = np.any(order[:, : min(k, scores.shape[1])] == labels[:, None], axis=1)
        results[f"top{k}"] = float(np.mean(hit)) if len(labels) else float("nan")
    return results
