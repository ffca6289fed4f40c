"""Input pipeline: image sources, the Barlow Twins two-view augmentations, deterministic batches.

    source = load_source("digits")  # or "idx", "folder", "cifar10", "imagenet2012", ...
    batches = pretrain_batches(source, global_batch=256, image_size=32, seed=0, start_step=s)
    for batch in prefetch_to_devices(batches): ...  # batch["view_a"]: [devices, per_device, H, W, 3]

See input_pipeline (determinism, resume, sharding), augment (the recipe and its differences
from torchvision) and sources (what each source holds in memory).
"""
import tensorflow as tf

try:  # tf.data only: JAX owns the accelerators.
    tf.config.set_visible_devices([], "GPU")
except RuntimeError:  # TF already initialised its devices (imported and used elsewhere first)
    pass

from bt_jax.data.augment import VIEWS, ViewSpec, augment_view, eval_transform, view_seed
from bt_jax.data.input_pipeline import (
    check_batch_size,
    epoch_permutation,
    eval_batches,
    labelled_batches,
    pretrain_batches,
    pretrain_dataset,
    steps_per_epoch,
)
from bt_jax.data.sources import (
    BUILTIN_SOURCES,
    DataNotPreparedError,
    Source,
    Split,
    from_arrays,
    load_source,
)

__all__ = [
    "BUILTIN_SOURCES",
    "DataNotPreparedError",
    "Source",
    "Split",
    "VIEWS",
    "ViewSpec",
    "augment_view",
    "check_batch_size",
    "epoch_permutation",
    "eval_batches",
    "eval_transform",
    "from_arrays",
    "load_source",
    "labelled_batches",
    "pretrain_batches",
    "pretrain_dataset",
    "steps_per_epoch",
    "view_seed",
]
