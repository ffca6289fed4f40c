"""Per-example outputs over a whole split, sharded over every device of every process.

Representations for the evaluation protocols and the online probe's test predictions both come
from :func:`map_split`: each process reads its share of every evaluation batch
(``bt_jax.data.eval_batches``), the shares become one global array split over the mesh, one jitted
forward runs on every device at once, and the outputs are gathered so that every process ends
with the whole split in dataset order. No process repeats another's work, and none idles while
another evaluates (which a pod's shutdown barrier would not survive).
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Iterator
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from bt_jax import data, parallel
from bt_jax.data import photometric

EVAL_BATCH_SIZE = 256  # examples per global batch (rounded up to a multiple of the devices)

# fn(variables, images float32 [n, H, W, 3] normalised) -> [n, ...] per-example outputs.
ExampleFn = Callable[[Any, jax.Array], jax.Array]


def eval_batch_size(device_count: int, wanted: int = EVAL_BATCH_SIZE) -> int:
    """``wanted`` rounded up to a multiple of ``device_count``: every device gets equal rows."""
    return -(-wanted // device_count) * device_count


def split_batches(
    source: data.Source,
    *,
    split: str,
    image_size: int,
    resize_size: int,
    mesh: jax.sharding.Mesh,
    batch_size: int = EVAL_BATCH_SIZE,
) -> Iterator[dict]:
    """This process's share of every evaluation batch of ``split`` (``data.eval_batches``:
    {"image" uint8, "label", "mask"}), the global batch a multiple of the mesh's devices."""
    return data.eval_batches(
        source,
        split=split,
        batch_size=eval_batch_size(mesh.size, batch_size),
        image_size=image_size,
        resize_size=resize_size,
        process_index=jax.process_index(),
        process_count=jax.process_count(),
    )


def map_split(
    fn: ExampleFn, variables: Any, batches: Iterable[dict], *, mesh: jax.sharding.Mesh
) -> tuple[np.ndarray, np.ndarray]:
    """``fn`` on every example of a split, on every device.

    variables: replicated global arrays (the trainer's state) or host values (a checkpoint).
    batches: this process's share of the split's evaluation batches (:func:`split_batches`).
    Returns (outputs [N, ...], labels int32 [N]) as numpy, on every process, in dataset order.
    """
    variables = parallel.replicate(variables, mesh)
    forward = _compiled(fn, mesh)
    outputs, labels = [], []
    for local in batches:
        batch = parallel.global_batch(local, mesh)
        out, label, mask = parallel.gather_to_host(forward(variables, batch))
        outputs.append(out[mask])
        labels.append(label[mask])
    return np.concatenate(outputs), np.concatenate(labels).astype(np.int32)


_COMPILED: dict[tuple, Callable] = {}


def _compiled(fn: ExampleFn, mesh: jax.sharding.Mesh) -> Callable:
    """One jitted forward per (fn, mesh): the evaluation of every checkpoint reuses it."""
    key = (fn, mesh)
    if key not in _COMPILED:
        split = parallel.batch_sharded(mesh)

        def forward(variables, batch):
            images = photometric.normalize(batch["image"])
            return fn(variables, images), batch["label"], batch["mask"]

        _COMPILED[key] = parallel.CompiledOnce(
            jax.jit(forward, in_shardings=(parallel.replicated(mesh), split), out_shardings=split),
            f"features of {type(fn).__name__}",
        )
    return _COMPILED[key]


class Representation:
    """``fn`` for :func:`map_split`: a backbone's pooled representation in inference mode,
    float32 [n, F]. Hashable by module, so one compilation serves every call."""

    def __init__(self, module: nn.Module):
        self.module = module

    def __call__(self, variables: Any, images: jax.Array) -> jax.Array:
        return self.module.apply(variables, images, train=False).astype(jnp.float32)

    def __hash__(self) -> int:
        return hash(self.module)

    def __eq__(self, other: Any) -> bool:
        return isinstance(other, Representation) and other.module == self.module


def representations(
    module: nn.Module, variables: Any, batches: Iterable[dict], *, mesh: jax.sharding.Mesh
) -> tuple[np.ndarray, np.ndarray]:
    """(features float32 [N, F], labels int32 [N]) of a backbone on a split's ``batches`` (as in
    :func:`map_split`), every process."""
    return map_split(Representation(module), variables, batches, mesh=mesh)
