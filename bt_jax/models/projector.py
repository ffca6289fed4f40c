"""The Barlow Twins projector and the backbone + projector model.

Official (facebookresearch/barlowtwins main.py): for a spec "8192-8192-8192" and a 2048-d backbone,
Linear(2048, 8192, bias=False) -> BN -> ReLU -> Linear(8192, 8192, bias=False) -> BN -> ReLU ->
Linear(8192, 8192, bias=False). The input size is inferred from the representation.
"""

from __future__ import annotations

from typing import Any

import flax.linen as nn
import jax.numpy as jnp

from bt_jax.models.resnet import TorchLinear, batch_norm, canonical_dtype


def parse_spec(spec: str) -> tuple[int, ...]:
    """ "8192-8192-8192" -> (8192, 8192, 8192); a ValueError naming the bad value otherwise."""
    if not isinstance(spec, str) or not spec.strip():
        raise ValueError(
            f"Projector spec must be a non-empty string like '8192-8192-8192', got {spec!r}."
        )
    sizes = []
    for part in spec.strip().split("-"):
        if not part.strip().isdigit() or int(part) <= 0:
            raise ValueError(
                f"Bad projector spec {spec!r}: {part!r} is not a positive integer; "
                "use layer sizes joined by '-', e.g. '8192-8192-8192'."
            )
        sizes.append(int(part))
    return tuple(sizes)


class Projector(nn.Module):
    """MLP projector in the official string form.

    Every layer but the last is Linear(no bias) -> BatchNorm -> ReLU; the last is a plain
    Linear(no bias). Variables: `linear0`, `bn0`, `linear1`, `bn1`, ..., `linear{n-1}`.

    Fields:
      spec: layer sizes joined by "-", e.g. "8192-8192-8192".
      dtype: computation dtype (parameters and output stay float32).
      axis_name: mapped axis for global-batch BatchNorm statistics in training (SyncBatchNorm).
    """

    spec: str = "8192-8192-8192"
    dtype: Any = jnp.float32
    axis_name: str | None = None

    def __post_init__(self) -> None:
        parse_spec(self.spec)  # fail at construction, not at the first trace
        super().__post_init__()

    @nn.compact
    def __call__(self, x: jnp.ndarray, train: bool = True, views: int = 1) -> jnp.ndarray:
        """x: [B, F] -> [B, D] float32, D the last size of the spec; ``views`` as the backbone's
        (each of the stacked views normalised with its own statistics)."""
        dtype = canonical_dtype(self.dtype)
        sizes = parse_spec(self.spec)
        x = x.astype(dtype)
        for i, size in enumerate(sizes[:-1]):
            x = TorchLinear(size, use_bias=False, dtype=dtype, name=f"linear{i}")(x)
            x = nn.relu(batch_norm(train, self.axis_name, dtype, f"bn{i}")(x, views))
        x = TorchLinear(sizes[-1], use_bias=False, dtype=dtype, name=f"linear{len(sizes) - 1}")(x)
        return x.astype(jnp.float32)


class BarlowTwinsModel(nn.Module):
    """Backbone followed by projector: images -> (representation, embedding).

    Variables: `backbone/...` (the backbone's own tree, e.g. `backbone/layer1_0/conv1/kernel`) and
    `projector/...`.

    The official code calls the network once per view, so each view's batch is normalised on
    its own. Either call it once per view, threading the batch_stats updated by the first call
    into the second (PyTorch updates the running averages twice per step):

        (r1, z1), upd = model.apply({"params": p, "batch_stats": bs}, y1, mutable=["batch_stats"])
        (r2, z2), upd = model.apply({"params": p, **upd}, y2, mutable=["batch_stats"])

    or once on both views stacked, ``views=2``: the same values, gradients and running averages
    (each BatchNorm normalises each view over its own statistics and updates the averages view
    A first), with every convolution over twice the batch:

        (r, z), upd = model.apply({"params": p, "batch_stats": bs}, jnp.concatenate([y1, y2]),
                                  views=2, mutable=["batch_stats"])

    A plain call on stacked views (``views=1``) would pool the two views' statistics, which
    departs from the paper.
    """

    backbone: nn.Module
    projector: nn.Module

    def __call__(
        self, images: jnp.ndarray, train: bool = True, views: int = 1
    ) -> tuple[jnp.ndarray, jnp.ndarray]:
        """images: [B, H, W, 3] (``views`` views of B / views images, stacked) ->
        (representation [B, F] float32, embedding [B, D] float32)."""
        representation = self.backbone(images, train=train, views=views)
        embedding = self.projector(representation, train=train, views=views)
        return representation, embedding
