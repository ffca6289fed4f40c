"""Input pipeline: image sources, the Barlow Twins two-view augmentations, deterministic batches.

    source = load_source("digits")  # or "idx", "folder", "cifar10", "imagenet2012", ...
    batches = pretrain_batches(source, global_batch=256, image_size=32, seed=0, start_step=s,
                               photometric="device")
    # each batch: this process's rows, uint8 views; in the train step, on the device:
    views = finish_views(batch, seed=0, views=VIEWS, photometric="device")

See input_pipeline (determinism, resume, sharding), augment (the host ops and their differences
from torchvision), photometric (the device ops), views (the recipe) and sources (what each
source holds in memory).

Importing this package does not import TensorFlow: the names that need it (the pipeline, the
host augmentations) load on first use, so the train step and its benchmarks import without it.
"""

from __future__ import annotations

import importlib

from bt_jax.data.errors import DataError, DataNotPreparedError
from bt_jax.data.views import CROP_FLIP, VIEWS, ViewSpec

# name -> module that defines it, imported on first access (PEP 562).
_LAZY = {
    "augment_view": "augment",
    "augment_views": "augment",
    "eval_transform": "augment",
    "view_seed": "augment",
    "check_batch_size": "index_stream",
    "epoch_permutation": "index_stream",
    "eval_batches": "input_pipeline",
    "labelled_batches": "input_pipeline",
    "pretrain_batches": "input_pipeline",
    "pretrain_dataset": "input_pipeline",
    "steps_per_epoch": "index_stream",
    "IndexStream": "index_stream",
    "finish_views": "photometric",
    "normalize": "photometric",
    "photometric_views": "photometric",
    "BUILTIN_SOURCES": "sources",
    "Source": "sources",
    "Split": "sources",
    "from_arrays": "sources",
    "load_source": "catalog",
}
_SUBMODULES = (
    "augment",
    "catalog",
    "file_sources",
    "index_stream",
    "input_pipeline",
    "photometric",
    "preview",
    "sources",
    "tfds_sources",
    "views",
    "errors",
)


def __getattr__(name: str):
    if name in _LAZY:
        value = getattr(importlib.import_module(f"bt_jax.data.{_LAZY[name]}"), name)
        globals()[name] = value
        return value
    if name in _SUBMODULES:
        return importlib.import_module(f"bt_jax.data.{name}")
    raise AttributeError(f"module 'bt_jax.data' has no attribute {name!r}")


def __dir__():
    return sorted(set(globals()) | set(_LAZY) | set(_SUBMODULES))


__all__ = sorted(["CROP_FLIP", "DataError", "DataNotPreparedError", "VIEWS", "ViewSpec", *_LAZY])
