"""The order of the examples: global step -> (epoch, the indices this process reads).

One index stream serves pretraining (every example of the pretrain split) and
the labelled protocols (a subset of the train split):
- The order of epoch e is `indices[np.random.default_rng([seed, e]).permutation(len(indices))]`,
  a pure function of (seed, epoch). Global step k is (epoch, position) = divmod(k,
  steps_per_epoch); global batch k is positions [position * B, (position + 1) * B) of that
  order; the last incomplete batch of an epoch is dropped.
- Process p of P takes rows [p * B / P, (p + 1) * B / P) of every global batch B, so the
  processes read disjoint shares of each epoch that together cover it (the share
  `tfds.split_for_jax_process` would give, but re-dealt every epoch). The trainer assembles
  the global batch with `jax.make_array_from_process_local_data`, so the global batch is the
  same bytes for any number of processes and devices.
Pure numpy (no TensorFlow): the trainer's step counting and the tests use it alone.
"""

from __future__ import annotations

import dataclasses

import numpy as np

from bt_jax.data.errors import DataError
from bt_jax.data.sources import Source


def steps_per_epoch(source: Source, global_batch: int) -> int:
    """Full global batches per pretraining epoch: num_train // global_batch (the rest is
    dropped)."""
    return source.num_train // global_batch


def check_batch_size(global_batch: int, num_train: int, device_count: int) -> int:
    """The per-device batch, or DataError naming the values that do not fit. Pure."""
    if global_batch <= 0 or device_count <= 0 or global_batch % device_count:
        raise DataError(
            f"global batch size {global_batch} is not divisible by the number of devices "
            f"{device_count}; use a multiple of {device_count}, e.g. "
            f"{max(device_count, global_batch // max(device_count, 1) * device_count)}"
        )
    if global_batch > num_train:
        raise DataError(
            f"global batch size {global_batch} is larger than the {num_train} "
            "training examples, so an epoch has no full batch; use a smaller batch"
        )
    return global_batch // device_count


def epoch_permutation(seed: int, epoch: int, num_examples: int) -> np.ndarray:
    """The example order of one epoch: int64 [num_examples], a pure function of (seed, epoch)."""
    return np.random.default_rng([seed, epoch]).permutation(num_examples)


@dataclasses.dataclass(frozen=True, eq=False)
class IndexStream:
    """Global step -> (epoch, the example indices this process reads): the whole shuffling.

    indices: int64 [M], the examples an epoch covers (arange(num_train) for pretraining).
    """

    indices: np.ndarray
    global_batch: int
    seed: int
    process_index: int = 0
    process_count: int = 1

    def __post_init__(self):
        if self.seed < 0:
            raise DataError(f"seed must be >= 0, got {self.seed}")
        if self.process_count <= 0 or not 0 <= self.process_index < self.process_count:
            raise DataError(
                f"process_index {self.process_index} is not in "
                f"[0, process_count={self.process_count})"
            )
        if self.global_batch <= 0 or self.global_batch % self.process_count:
            raise DataError(
                f"batch size {self.global_batch} is not divisible by the "
                f"{self.process_count} processes; use a multiple of "
                f"{self.process_count}"
            )
        object.__setattr__(self, "_orders", {})
        if self.steps_per_epoch == 0:
            raise DataError(
                f"batch size {self.global_batch} is larger than the "
                f"{len(self.indices)} examples, so an epoch has no full batch; "
                "use a smaller batch"
            )

    @property
    def local_batch(self) -> int:
        return self.global_batch // self.process_count

    @property
    def steps_per_epoch(self) -> int:
        return len(self.indices) // self.global_batch

    def order(self, epoch: int) -> np.ndarray:
        """int64 [M]: the examples of epoch `epoch`, in reading order."""
        cache = self._orders  # the latest two epochs' (a batch never spans more)
        order = cache.get(epoch)
        if order is None:
            permutation = np.random.default_rng([self.seed, epoch]).permutation(len(self.indices))
            order = cache[epoch] = self.indices[permutation]
            for stale in sorted(cache)[:-2]:
                cache.pop(stale, None)
        return order

    def at(self, step: int) -> tuple[int, np.ndarray]:
        """(epoch, int64 [local_batch]) of global step `step` for this process."""
        epoch, position = divmod(int(step), self.steps_per_epoch)
        start = position * self.global_batch + self.process_index * self.local_batch
        return epoch, self.order(epoch)[start : start + self.local_batch]
