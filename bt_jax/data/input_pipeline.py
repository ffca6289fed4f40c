"""Pretraining, labelled and evaluation batches: deterministic, resumable at any step, sharded
over processes, flat per-process uint8 batches.

Why tf.data over an index stream (not grain, not tfds's shuffled reads): determinism and exact
resume then hold by construction, with no iterator state to checkpoint, and decoding and
augmentation run as parallel C++ ops outside the GIL. (grain would give the same index-based
design, but it is not a dependency; tfds's file shuffling cannot start at step s without
replaying the epoch.)

The order and the sharding are `index_stream.IndexStream`'s (a pure function of (seed, step,
process)); this module reads the rows it names and augments them:
- Each view of each example is augmented with a seed derived from (seed, epoch, example index,
  view) by stateless ops (`augment.view_seed`), so the bytes do not depend on map parallelism,
  thread scheduling or which process reads the example. tf.data runs with deterministic=True
  and max_intra_op_parallelism=1 (single-threaded ops: float reductions cannot change with the
  core count).
- Restarting at step s starts the stream at (epoch, position) of s: nothing is replayed.
Each step is one numpy hop (the step's indices, then one fancy-index or one `__getitems__` of
the split), then decode + views per example in parallel (AUTOTUNE, deterministic order), then
batching.

Evaluation batches are not shuffled or dropped: global batch k holds examples [k * B, (k + 1) *
B) in order, process p its rows [p * b, (p + 1) * b), the last one padded (label -1, mask False).
"""

from __future__ import annotations

import atexit
import math
import weakref
from collections.abc import Callable, Iterator, Mapping

import numpy as np

from bt_jax.data import augment
from bt_jax.data import views as views_lib
from bt_jax.data.errors import DataError
from bt_jax.data.index_stream import IndexStream
from bt_jax.data.sources import Source, Split
from bt_jax.data.tf_runtime import tf
from bt_jax.data.views import ViewSpec

AUTOTUNE = tf.data.AUTOTUNE


def _options(num_workers: int | None) -> tf.data.Options:
    options = tf.data.Options()
    options.deterministic = True
    options.threading.max_intra_op_parallelism = 1
    if num_workers:
        options.threading.private_threadpool_size = num_workers
    return options


def _image_signature(split: Split) -> tuple[tf.DType, list[int]]:
    if split.encoded:
        return tf.string, []
    return tf.uint8, list(split.images.shape[1:])


def _read_rows(
    split: Split, rows: Callable[[int], tuple[int, np.ndarray, np.ndarray]], batch: int
) -> Callable:
    """A TF function: step -> (epoch [b], index [b], images [b, ...], labels [b], valid [b]).

    rows(step) -> (epoch, indices int64 [b], valid bool [b]); one numpy hop reads them.
    """
    image_dtype, image_shape = _image_signature(split)

    def numpy_read(step):
        epoch, indices, valid = rows(int(step))
        images, labels = split.fetch(indices)
        return np.int64(epoch), indices, valid, images, labels

    def read(step):
        epoch, indices, valid, images, labels = tf.numpy_function(
            numpy_read, [step], [tf.int64, tf.int64, tf.bool, image_dtype, tf.int32], stateful=False
        )
        return (
            tf.fill([batch], tf.ensure_shape(epoch, [])),
            tf.ensure_shape(indices, [batch]),
            tf.ensure_shape(images, [batch] + image_shape),
            tf.ensure_shape(labels, [batch]),
            tf.ensure_shape(valid, [batch]),
        )

    return read


def _batches(
    steps: tf.data.Dataset,
    read: Callable,
    example_fn: Callable,
    batch: int,
    num_workers: int | None,
) -> tf.data.Dataset:
    """step -> read -> map(example_fn) per example -> batch: the one pipeline of this module."""
    # Plain TF ops, no Python control flow on tensors: autograph's source rewriting would only
    # add seconds of tracing to every pipeline (a third of a small run's start-up).
    read, example_fn = map(tf.autograph.experimental.do_not_convert, (read, example_fn))
    ds = steps.map(read).unbatch()
    ds = ds.map(example_fn, num_parallel_calls=num_workers or AUTOTUNE, deterministic=True)
    return (
        ds.batch(batch, drop_remainder=True).prefetch(AUTOTUNE).with_options(_options(num_workers))
    )


def _stream_batches(
    split: Split,
    stream: IndexStream,
    example_fn: Callable,
    *,
    start_step: int,
    num_epochs: int | None,
    num_workers: int | None,
) -> tf.data.Dataset:
    if start_step < 0:
        raise DataError(f"start_step must be >= 0, got {start_step}")
    if num_epochs is None:
        steps = tf.data.Dataset.counter(start_step)
    else:
        steps = tf.data.Dataset.range(
            start_step, max(start_step, num_epochs * stream.steps_per_epoch)
        )

    def rows(step):
        epoch, indices = stream.at(step)
        return epoch, indices, np.ones(len(indices), bool)

    def example(epoch, index, image, label, valid):
        del valid  # an index stream has no padding
        return example_fn(epoch, index, image, label)

    return _batches(
        steps, _read_rows(split, rows, stream.local_batch), example, stream.local_batch, num_workers
    )


class _Batches:
    """Iterator of a dataset's numpy batches; tf.data's threads start on the first next().

    Closed at interpreter exit if still open: tf.data threads inside the pipeline's numpy hop
    cannot take the GIL once Python finalises, and a pipeline destroyed then would wait for them
    forever.
    """

    def __init__(self, ds: tf.data.Dataset):
        self._ds = ds
        self._iterator = None
        _OPEN.add(self)

    def __iter__(self) -> Iterator[dict]:
        return self

    def __next__(self) -> dict:
        if self._ds is None:
            raise StopIteration
        if self._iterator is None:
            self._iterator = self._ds.as_numpy_iterator()
        return next(self._iterator)

    def close(self) -> None:
        """Stops the pipeline's threads now; next() then raises StopIteration."""
        self._iterator = self._ds = None


_OPEN: weakref.WeakSet = weakref.WeakSet()


@atexit.register
def _close_open_pipelines() -> None:
    for batches in list(_OPEN):
        batches.close()


def _numpy_iterator(ds: tf.data.Dataset) -> Iterator[dict]:
    return _Batches(ds)


def _process(process_index: int | None, process_count: int | None) -> tuple[int, int]:
    if process_index is None or process_count is None:
        import jax  # only for the defaults

        process_index = jax.process_index() if process_index is None else process_index
        process_count = jax.process_count() if process_count is None else process_count
    return int(process_index), int(process_count)


def pretrain_dataset(
    source: Source,
    *,
    global_batch: int,
    image_size: int,
    seed: int,
    start_step: int = 0,
    min_crop_scale: float = 0.08,
    views: Mapping[str, ViewSpec] | None = None,
    photometric: str = "host",
    process_index: int = 0,
    process_count: int = 1,
    num_epochs: int | None = None,
    num_workers: int | None = None,
) -> tf.data.Dataset:
    """The tf.data.Dataset behind `pretrain_batches` (same arguments, no defaults from jax)."""
    views = views_lib.check_views(views)
    views_lib.check_photometric(photometric)
    views_lib.check_image_args(image_size, min_crop_scale)
    stream = IndexStream(
        np.arange(source.num_train, dtype=np.int64),
        global_batch,
        seed,
        process_index,
        process_count,
    )

    def two_views(epoch, index, image, label):
        view_a, view_b = augment.augment_views(
            image,
            [augment.view_seed(seed, epoch, index, v) for v in ("a", "b")],
            [views["a"], views["b"]],
            image_size=image_size,
            min_crop_scale=min_crop_scale,
            photometric=photometric,
        )
        return {
            "view_a": view_a,
            "view_b": view_b,
            "label": label,
            "index": tf.cast(index, tf.int32),
            "epoch": tf.cast(epoch, tf.int32),
        }

    return _stream_batches(
        source.split("pretrain"),
        stream,
        two_views,
        start_step=start_step,
        num_epochs=num_epochs,
        num_workers=num_workers,
    )


def pretrain_batches(
    source: Source,
    *,
    global_batch: int,
    image_size: int,
    seed: int,
    start_step: int = 0,
    min_crop_scale: float = 0.08,
    views: Mapping[str, ViewSpec] | None = None,
    photometric: str = "host",
    process_index: int | None = None,
    process_count: int | None = None,
    num_epochs: int | None = None,
    num_workers: int | None = None,
) -> Iterator[dict]:
    """This process's share of each global pretraining batch, from global step start_step on.

    Yields numpy dicts {"view_a", "view_b": uint8 [local_batch, image_size, image_size, 3]
    (unnormalised), "label": int32 [local_batch] (-1 unlabelled), "index": int32 [local_batch]
    (example index in the pretrain split), "epoch": int32 [local_batch]}, local_batch =
    global_batch // process_count (defaults: jax.process_index() and jax.process_count()).
    photometric="host": the whole recipe on the host; "device": crop, flip and resize only,
    photometric.finish_views does the rest on the device. views: {"a", "b": ViewSpec} (default
    VIEWS). Infinite if num_epochs is None. num_workers: tf.data threads (default AUTOTUNE;
    never changes the bytes). Raises DataError before building anything on bad arguments.
    """
    process_index, process_count = _process(process_index, process_count)
    ds = pretrain_dataset(
        source,
        global_batch=global_batch,
        image_size=image_size,
        seed=seed,
        start_step=start_step,
        min_crop_scale=min_crop_scale,
        views=views,
        photometric=photometric,
        process_index=process_index,
        process_count=process_count,
        num_epochs=num_epochs,
        num_workers=num_workers,
    )
    return _numpy_iterator(ds)


def labelled_batches(
    source: Source,
    indices: np.ndarray,
    *,
    batch_size: int,
    image_size: int,
    seed: int,
    num_epochs: int,
    min_crop_scale: float = 0.08,
    process_index: int = 0,
    process_count: int = 1,
) -> Iterator[dict]:
    """Crop + flip training views of the train-split examples `indices`, for the linear and
    semi-supervised protocols.

    num_epochs epochs, each a fresh permutation of indices (numpy default_rng([seed, epoch]))
    cut into len(indices) // batch_size full global batches (the remainder is dropped: fixed
    shapes, and no tiny batch for train-mode BatchNorm), of which this process yields its rows.
    Each view's crop and flip come from (seed, epoch, example index) salted
    (`augment.labelled_seed`). Yields {"image": uint8 [batch_size // process_count, image_size,
    image_size, 3], "label": int32 [batch_size // process_count]}.
    """
    views_lib.check_image_args(image_size, min_crop_scale)
    stream = IndexStream(
        np.asarray(indices, np.int64), batch_size, seed, process_index, process_count
    )

    def crop_flip(epoch, index, image, label):
        view = augment.augment_view(
            image,
            augment.labelled_seed(seed, epoch, index),
            view=views_lib.CROP_FLIP,
            image_size=image_size,
            min_crop_scale=min_crop_scale,
        )
        return {"image": view, "label": label}

    return _numpy_iterator(
        _stream_batches(
            source.split("train"),
            stream,
            crop_flip,
            start_step=0,
            num_epochs=num_epochs,
            num_workers=None,
        )
    )


def eval_batches(
    source: Source,
    *,
    split: str,
    batch_size: int,
    image_size: int,
    resize_size: int | None = None,
    process_index: int = 0,
    process_count: int = 1,
    num_workers: int | None = None,
) -> Iterator[dict]:
    """Every example of split ("train" or "test") once, in order, un-augmented.

    Global batch k holds examples [k * batch_size, (k + 1) * batch_size), the last one padded
    to full size; this process yields rows [p * b, (p + 1) * b) of each (b = batch_size //
    process_count), ceil(N / batch_size) batches on every process. Yields {"image": uint8 [b,
    image_size, image_size, 3] (zeros where padded), "label": int32 [b] (-1 where padded),
    "mask": bool [b] (False where padded)}. Transform: resize the short side to resize_size
    (default image_size), centre crop (augment.eval_transform).
    """
    if split not in ("train", "test"):
        raise DataError(f"split must be 'train' or 'test', got {split!r}")
    if batch_size <= 0 or process_count <= 0 or batch_size % process_count:
        raise DataError(
            f"evaluation batch size {batch_size} must be a positive multiple of the "
            f"{process_count} processes"
        )
    if not 0 <= process_index < process_count:
        raise DataError(f"process_index {process_index} is not in [0, {process_count})")
    if resize_size is not None and resize_size < image_size:
        raise DataError(f"resize_size ({resize_size}) must be >= image_size ({image_size})")
    data = source.split(split)
    num_examples = data.num_examples
    local = batch_size // process_count

    def rows(step):
        wanted = step * batch_size + process_index * local + np.arange(local, dtype=np.int64)
        valid = wanted < num_examples
        return 0, np.minimum(wanted, max(num_examples - 1, 0)), valid

    def example(epoch, index, image, label, valid):
        del epoch, index
        view = augment.eval_transform(image, image_size=image_size, resize_size=resize_size)
        return {
            "image": view * tf.cast(valid, tf.uint8),
            "label": tf.where(valid, label, -1),
            "mask": valid,
        }

    steps = tf.data.Dataset.range(math.ceil(num_examples / batch_size))
    return _numpy_iterator(
        _batches(steps, _read_rows(data, rows, local), example, local, num_workers)
    )
