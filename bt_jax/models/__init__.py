"""Flax ResNet backbones (torchvision layout), the projector and the Barlow Twins model.

backbone = create("resnet50", zero_init_residual=True, axis_name="batch")
model = BarlowTwinsModel(backbone, Projector("8192-8192-8192", axis_name="batch"))
"""

from __future__ import annotations

from typing import Any

import flax.linen as nn

from bt_jax.models.batch_norm import BatchNorm
from bt_jax.models.conv import FORMS as CONV_FORMS
from bt_jax.models.conv import Conv
from bt_jax.models.projector import BarlowTwinsModel, Projector, parse_spec
from bt_jax.models.resnet import (
    STEMS,
    BasicBlock,
    Bottleneck,
    ResNet,
    ResNet18,
    ResNet34,
    ResNet50,
    ResNet101,
    ResNet152,
    canonical_dtype,
)

BACKBONES: dict[str, type[ResNet]] = {
    "resnet18": ResNet18,
    "resnet34": ResNet34,
    "resnet50": ResNet50,
    "resnet101": ResNet101,
    "resnet152": ResNet152,
}

# Fields a caller may set through `create`; the architecture itself comes from the name.
_OPTIONS = ("stem", "width", "zero_init_residual", "dtype", "axis_name", "num_classes", "conv")


def create(name: str, **kw: Any) -> nn.Module:
    """A backbone by name ("resnet18", "resnet34", "resnet50", "resnet101", "resnet152").

    kw: stem ("imagenet" | "cifar"), width (64 standard), zero_init_residual, dtype (a jnp dtype
    or its name, e.g. "bfloat16"), axis_name, num_classes (None: no head, pooled representation),
    conv ("xla" default | "auto" | "tap_matmul": how convolutions run, ``bt_jax.models.conv``).
    """
    key = name.lower() if isinstance(name, str) else name
    if key not in BACKBONES:
        raise ValueError(f"Unknown backbone {name!r}; known names: {', '.join(BACKBONES)}.")
    unknown = sorted(set(kw) - set(_OPTIONS))
    if unknown:
        raise TypeError(
            f"Unknown option(s) {unknown} for {name!r}; accepted: {', '.join(_OPTIONS)}."
        )
    if "dtype" in kw:
        kw["dtype"] = canonical_dtype(kw["dtype"])
    return BACKBONES[key](**kw)


def create_model(
    name: str,
    *,
    projector: str,
    stem: str = "imagenet",
    width: int = 64,
    zero_init_residual: bool = True,
    dtype: Any = "float32",
    axis_name: str | None = None,
    conv: str = "xla",
) -> BarlowTwinsModel:
    """Backbone + projector from the fields of ``config.model``: ``create_model(**config.model)``.

    ``axis_name`` makes every BatchNorm, the projector's included, a SyncBatchNorm over that
    mapped axis (the official recipe); None keeps statistics per call.
    """
    backbone = create(
        name,
        stem=stem,
        width=width,
        zero_init_residual=zero_init_residual,
        dtype=dtype,
        axis_name=axis_name,
        conv=conv,
    )
    return BarlowTwinsModel(
        backbone, Projector(projector, dtype=canonical_dtype(dtype), axis_name=axis_name)
    )


__all__ = [
    "BACKBONES",
    "STEMS",
    "CONV_FORMS",
    "BarlowTwinsModel",
    "BatchNorm",
    "BasicBlock",
    "Bottleneck",
    "Conv",
    "Projector",
    "ResNet",
    "ResNet18",
    "ResNet34",
    "ResNet50",
    "ResNet101",
    "ResNet152",
    "create",
    "create_model",
    "parse_spec",
]
