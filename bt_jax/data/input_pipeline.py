"""Pretraining and evaluation batches: deterministic, resumable at any step, sharded per process.

Why tf.data over an index stream (not grain, not tfds's shuffled reads): determinism and exact
resume then hold by construction, with no iterator state to checkpoint, and decoding and
augmentation run as parallel C++ ops outside the GIL. (grain would give the same index-based
design, but it is not a dependency; tfds's file shuffling cannot start at step s without
replaying the epoch.)
- The order of epoch e is `np.random.default_rng([seed, e]).permutation(num_train)`, a pure
  function of (seed, epoch). Global step k is (epoch, position) = divmod(k, steps_per_epoch);
  global batch k is positions [position * global_batch, (position + 1) * global_batch) of that
  permutation; the last incomplete batch of an epoch is dropped.
- Process p of P takes the fixed slice [p * B / P, (p + 1) * B / P) of every global batch B, so
  the processes read disjoint shares of each epoch that together cover it (the same share as
  `tfds.split_for_jax_process` would give, but re-dealt every epoch, so every process sees the
  whole dataset over training). Within a process, device d gets the d-th block of that slice.
  The global batch is therefore the same bytes for any number of processes and devices.
- Each view of each example is augmented with a seed derived from (seed, epoch, example index,
  view) by stateless ops (`augment.view_seed`), so the bytes do not depend on map parallelism,
  thread scheduling or which process reads the example. tf.data runs with deterministic=True
  and max_intra_op_parallelism=1 (single-threaded ops: float reductions cannot change with the
  core count).
- Restarting at step s starts the index stream at (epoch, position) of s: nothing is replayed.
Sources give random access by index (see sources.py); tf.data reads a step's indices (one numpy
fancy-index, or one `__getitems__` on a tfds data source), maps decode + two views in parallel
(AUTOTUNE, deterministic order) and batches.

Batches are numpy dicts {"view_a", "view_b": float32 [L, per_device_batch, H, W, 3],
"label": int32 [L, per_device_batch]} with L = local device count; `prefetch_to_devices`
moves them onto the devices.
"""
from __future__ import annotations

from collections.abc import Mapping

import functools
from typing import Iterator

import jax
import numpy as np
import tensorflow as tf

from bt_jax.data import augment
from bt_jax.data.sources import Source

AUTOTUNE = tf.data.AUTOTUNE


def steps_per_epoch(source: Source, global_batch: int) -> int:
    """Full global batches per pretraining epoch: num_train // global_batch (the rest is dropped)."""
    return source.num_train // global_batch


def check_batch_size(global_batch: int, num_train: int, process_count: int,
                     local_device_count: int) -> tuple[int, int]:
    """(per-process batch, per-device batch), or ValueError naming the values that do not fit."""
    devices = process_count * local_device_count
    if global_batch <= 0 or global_batch % devices:
        raise ValueError(
            f"global batch size {global_batch} is not divisible by the number of devices "
            f"{devices} ({process_count} process(es) x {local_device_count} local device(s)); "
            f"use a multiple of {devices}, e.g. {max(devices, global_batch // devices * devices)}")
    if global_batch > num_train:
        raise ValueError(f"global batch size {global_batch} is larger than the {num_train} "
                         f"training examples, so an epoch has no full batch; use a smaller batch")
    return global_batch // process_count, global_batch // devices


def epoch_permutation(seed: int, epoch: int, num_examples: int) -> np.ndarray:
    """The example order of one epoch: int64 [num_examples], a pure function of (seed, epoch)."""
    return np.random.default_rng([seed, epoch]).permutation(num_examples)


@functools.lru_cache(maxsize=4)
def _cached_permutation(seed: int, epoch: int, num_examples: int) -> np.ndarray:
    return epoch_permutation(seed, epoch, num_examples)


def step_indices(step: int, *, num_examples: int, global_batch: int, seed: int,
                 process_index: int, local_batch: int) -> tuple[int, np.ndarray]:
    """(epoch, example indices int64 [local_batch]) that process process_index reads at global step `step`."""
    epoch, position = divmod(int(step), num_examples // global_batch)
    start = position * global_batch + process_index * local_batch
    order = _cached_permutation(seed, epoch, num_examples)
    return epoch, order[start:start + local_batch].astype(np.int64)


def _options(num_workers: int | None) -> tf.data.Options:
    options = tf.data.Options()
    options.deterministic = True
    options.threading.max_intra_op_parallelism = 1
    if num_workers:
        options.threading.private_threadpool_size = num_workers
    return options


def _numpy_iterator(ds: tf.data.Dataset):
    # A generator: the tf.data iterator (threads, graph optimisation) starts on the first next().
    for batch in ds.as_numpy_iterator():
        yield batch


def pretrain_dataset(source: Source, *, global_batch: int, image_size: int, seed: int,
                     start_step: int = 0, min_crop_scale: float = 0.08,
                     process_index: int = 0, process_count: int = 1,
                     num_epochs: int | None = None, num_workers: int | None = None,
                     views: Mapping[str, augment.ViewSpec] | None = None,
                     photometric: str = "host") -> tf.data.Dataset:
    """The tf.data.Dataset behind `pretrain_batches` (same arguments, no defaults from jax)."""
    views = dict(augment.VIEWS if views is None else views)
    if sorted(views) != ["a", "b"]:
        raise ValueError(f"views must map 'a' and 'b' to ViewSpecs, got keys {sorted(views)}")
    num_train = source.num_train
    local_batch, _ = check_batch_size(global_batch, num_train, process_count, 1)
    if photometric != "host":
        raise NotImplementedError("photometric='device' is not implemented yet")
    if not 0 <= process_index < process_count:
        raise ValueError(f"process_index {process_index} is not in [0, {process_count})")
    if start_step < 0 or seed < 0:
        raise ValueError(f"start_step ({start_step}) and seed ({seed}) must be >= 0")
    if image_size < augment.MIN_IMAGE_SIZE:
        raise ValueError(f"image_size must be at least {augment.MIN_IMAGE_SIZE}, got {image_size}")
    split = source.split("pretrain")
    read = split.reader()
    parallel = num_workers or AUTOTUNE

    lookup = functools.partial(step_indices, num_examples=num_train, global_batch=global_batch,
                               seed=seed, process_index=process_index, local_batch=local_batch)

    def lookup_numpy(step):
        epoch, idx = lookup(step)
        return np.int64(epoch), idx

    def read_step(step):
        # The index stream is numpy (a cached permutation per epoch); everything after it is TF.
        epoch, idx = tf.numpy_function(lookup_numpy, [step], [tf.int64, tf.int64], stateful=False)
        idx = tf.ensure_shape(idx, [local_batch])
        images, labels = read(idx)
        return tf.fill([local_batch], tf.ensure_shape(epoch, [])), idx, images, labels

    def two_views(epoch, index, image, label):
        example = {
            f"view_{v}": _to_uint8(augment.augment_view(
                image, augment.view_seed(seed, epoch, index, v), view=views[v],
                image_size=image_size, min_crop_scale=min_crop_scale, normalise=False))
            for v in ("a", "b")
        }
        example["label"] = label
        example["index"] = tf.cast(index, tf.int32)
        example["epoch"] = tf.cast(epoch, tf.int32)
        return example

    end = None if num_epochs is None else num_epochs * (num_train // global_batch)
    steps = (tf.data.Dataset.counter(start_step) if end is None
             else tf.data.Dataset.range(start_step, max(start_step, end)))
    ds = steps.map(read_step).unbatch()
    ds = ds.map(two_views, num_parallel_calls=parallel, deterministic=True)
    ds = ds.batch(local_batch, drop_remainder=True)
    return ds.prefetch(AUTOTUNE).with_options(_options(num_workers))


def _to_uint8(x: tf.Tensor) -> tf.Tensor:
    """[0, 1] floats -> uint8, rounded (as PIL stores every intermediate image)."""
    return tf.cast(tf.round(tf.clip_by_value(x, 0.0, 1.0) * 255.0), tf.uint8)


def pretrain_batches(source: Source, *, global_batch: int, image_size: int, seed: int,
                     start_step: int = 0, min_crop_scale: float = 0.08,
                     process_index: int | None = None, process_count: int | None = None,
                     num_epochs: int | None = None, num_workers: int | None = None,
                     views: Mapping[str, augment.ViewSpec] | None = None,
                     photometric: str = "host") -> Iterator[dict]:
    """This process's pretraining batches from global step start_step on (infinite if num_epochs is None).

    Yields numpy dicts {"view_a", "view_b": float32 [L, per_device_batch, image_size, image_size, 3],
    "label": int32 [L, per_device_batch] (-1 = unlabelled)} and, with with_index, "index" int32
    (the example indices). L = local_device_count (default jax.local_device_count()),
    per_device_batch = global_batch / (process_count * L). The first batch yielded is global
    step start_step. num_workers: tf.data threads (default AUTOTUNE; never changes the bytes).
    views: {"a": ViewSpec, "b": ViewSpec}, the two views' augmentations (default the official
    recipe, augment.VIEWS).
    Raises ValueError before building anything when the batch does not fit the devices or data.
    """
    process_index = jax.process_index() if process_index is None else process_index
    process_count = jax.process_count() if process_count is None else process_count
    check_batch_size(global_batch, source.num_train, process_count, 1)
    ds = pretrain_dataset(source, global_batch=global_batch, image_size=image_size, seed=seed,
                          start_step=start_step, min_crop_scale=min_crop_scale,
                          process_index=process_index, process_count=process_count,
                          num_epochs=num_epochs, num_workers=num_workers, views=views,
                          photometric=photometric)
    return _numpy_iterator(ds)


def eval_batches(source: Source, *, split: str, batch_size: int, image_size: int,
                 resize_size: int | None = None, process_index: int = 0, process_count: int = 1,
                 num_workers: int | None = None) -> Iterator[dict]:
    """Every example of split ("train" or "test") once, in order, un-augmented, sharded.

    Global batch k holds examples [k * batch_size, (k + 1) * batch_size); process p yields rows
    [p * b, (p + 1) * b) of it (b = batch_size // process_count) as {"image": uint8 [b, H, W, 3],
    "label": int32 [b] (-1 for padding), "mask": bool [b] (False for padding)}; the last global
    batch is padded so that every process yields ceil(N / batch_size) batches.
    """
    if split not in ("train", "test"):
        raise ValueError(f"split must be 'train' or 'test', got {split!r}")
    if batch_size <= 0 or batch_size % process_count:
        raise ValueError(f"batch_size {batch_size} must be a positive multiple of the "
                         f"{process_count} processes")
    data = source.split(split)
    read = data.reader()
    num_examples = data.num_examples
    local = batch_size // process_count
    num_batches = -(-num_examples // batch_size)

    def rows(k):
        start = k * batch_size + process_index * local
        index = start + tf.range(local, dtype=tf.int64)
        mask = index < num_examples
        return tf.minimum(index, num_examples - 1), mask

    def read_rows(index, mask):
        images, labels = read(index)
        return images, tf.where(mask, labels, -1), mask

    ds = tf.data.Dataset.range(num_batches).map(rows).map(read_rows).unbatch()
    ds = ds.map(lambda image, label, mask: {
        "image": _to_uint8(augment.eval_transform(image, image_size=image_size,
                                                  resize_size=resize_size, normalise=False)),
        "label": label, "mask": mask},
        num_parallel_calls=num_workers or AUTOTUNE, deterministic=True)
    ds = ds.batch(local).prefetch(AUTOTUNE).with_options(_options(num_workers))
    return _numpy_iterator(ds)


# RandomResizedCrop + horizontal flip and nothing else: the training views of the linear and
# semi-supervised protocols (official evaluate.py).
CROP_FLIP = augment.ViewSpec(flip_prob=0.5, jitter_prob=0.0, grayscale_prob=0.0, blur_prob=0.0,
                             solarize_prob=0.0)
LABELLED_SALT = 0xE7A1  # decorrelates evaluation crops from the pretraining views of a seed


def labelled_batches(source: Source, indices: np.ndarray, *, batch_size: int, image_size: int,
                     seed: int, num_epochs: int, min_crop_scale: float = 0.08,
                     process_index: int = 0, process_count: int = 1) -> Iterator[dict]:
    """num_epochs epochs over the train-split examples ``indices``, crop + flip views.

    Each epoch is a fresh permutation of indices (numpy default_rng([seed, epoch])) cut into
    len(indices) // batch_size full batches; process p takes rows [p * b, (p + 1) * b) of each
    (b = batch_size // process_count). Yields {"image": uint8 [b, H, W, 3], "label": int32 [b]}.
    """
    indices = np.asarray(indices, np.int64)
    steps_per_epoch = len(indices) // batch_size
    local = batch_size // process_count
    read = source.split("train").reader()

    @functools.lru_cache(maxsize=2)
    def epoch_order(epoch: int) -> np.ndarray:
        return indices[np.random.default_rng([seed, epoch]).permutation(len(indices))]

    def step_indices(step):
        epoch, position = divmod(int(step), steps_per_epoch)
        start = position * batch_size + process_index * local
        return np.int64(epoch), epoch_order(epoch)[start:start + local]

    def read_step(step):
        epoch, idx = tf.numpy_function(step_indices, [step], [tf.int64, tf.int64], stateful=False)
        idx = tf.ensure_shape(idx, [local])
        images, labels = read(idx)
        return tf.fill([local], tf.ensure_shape(epoch, [])), idx, images, labels

    def crop_flip(epoch, index, image, label):
        view_seed = tf.random.experimental.stateless_fold_in(
            augment.view_seed(seed, epoch, index, "a"), LABELLED_SALT, alg="philox")
        view = augment.augment_view(image, view_seed, view=CROP_FLIP, image_size=image_size,
                                    min_crop_scale=min_crop_scale, normalise=False)
        return {"image": _to_uint8(view), "label": label}

    ds = tf.data.Dataset.range(num_epochs * steps_per_epoch).map(read_step).unbatch()
    ds = ds.map(crop_flip, num_parallel_calls=AUTOTUNE, deterministic=True)
    ds = ds.batch(local, drop_remainder=True).prefetch(AUTOTUNE).with_options(_options(None))
    return _numpy_iterator(ds)
