"""ResNet weights between torchvision state dicts and Flax variables.

    variables = torchvision_to_flax(state_dict)   # {"params": ..., "batch_stats": ...}
    state_dict = flax_to_torchvision(variables)

A state dict here is a flat dict of NumPy arrays keyed as torchvision names them; the official
Barlow Twins release `resnet50.pth` is one (torchvision resnet50 without `fc.*`). The architecture
is read from the keys and shapes: depth from the blocks per stage and `conv3`, `width` from
`conv1.weight`, the stem from its kernel size (7: "imagenet", 3: "cifar"), the head from `fc.*`.

Names and layouts (Flax module names are torchvision's, `Sequential` indices joined by "_"):

    torchvision                          Flax (collection / path)             layout
    conv1.weight [O, I, kh, kw]          params/conv1/kernel [kh, kw, I, O]   transpose(2, 3, 1, 0)
    bn1.weight, bn1.bias                 params/bn1/scale, params/bn1/bias
    bn1.running_mean, bn1.running_var    batch_stats/bn1/mean, batch_stats/bn1/var   (copied as is)
    bn1.num_batches_tracked              (none: Flax keeps no count; written as 0)
    layer1.0.conv1.weight                params/layer1_0/conv1/kernel
    layer2.0.downsample.0.weight         params/layer2_0/downsample_0/kernel  (shortcut conv)
    layer2.0.downsample.1.*              params|batch_stats/layer2_0/downsample_1/*  (shortcut BN)
    fc.weight [C, F], fc.bias [C]        params/fc/kernel [F, C], params/fc/bias

Both directions check every key and shape against the architecture read from the input and
raise a `ConversionError` naming the missing, unexpected and mis-shaped ones; nothing is dropped
silently. `num_batches_tracked` is optional on input (PyTorch ignores it when momentum is set).
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from typing import Any

from bt_jax.convert import layout
from bt_jax.convert.layout import ConversionError, Entry, StateDict, Variables


def torchvision_name(flax_module: tuple[str, ...]) -> str:
    """("layer1_0", "downsample_1") -> "layer1.0.downsample.1"; "conv1", "bn1", "fc" unchanged."""
    return ".".join(re.sub(r"_(\d+)$", r".\1", p) for p in flax_module)


def backbone_entries(
    variables: Mapping[str, Any], torch_prefix: str = "", flax_prefix: tuple[str, ...] = ()
) -> list[Entry]:
    """The torchvision table of backbone variables {"params", "batch_stats"} (arrays or shapes)."""
    return layout.entries(variables, torchvision_name, torch_prefix, flax_prefix)


def backbone_variables(variables: Mapping[str, Any]) -> Variables:
    """The backbone's variables out of a `BarlowTwinsModel`'s (`params|batch_stats/backbone`)."""
    out = {"params": variables["params"]["backbone"]}
    if "batch_stats" in variables:
        out["batch_stats"] = variables["batch_stats"]["backbone"]
    return out


def infer_architecture(state_dict: Mapping[str, Any], name: str | None = None) -> dict[str, Any]:
    """`create` arguments read from a torchvision state dict: name, stem, width, num_classes.

    state_dict: torchvision keys to arrays (or anything with a `.shape`).
    name: take this depth instead of reading it from the layerN.i keys.
    """
    from bt_jax.models import BACKBONES

    if name is not None:
        if name.lower() not in BACKBONES:
            raise ConversionError(f"Unknown architecture {name!r}; known: {', '.join(BACKBONES)}.")
        name = name.lower()
    else:
        counts = [0, 0, 0, 0]
        for key in state_dict:
            m = re.match(r"layer([1-4])\.(\d+)\.", key)
            if m:
                stage = int(m.group(1)) - 1
                counts[stage] = max(counts[stage], int(m.group(2)) + 1)
        bottleneck = any(re.match(r"layer[1-4]\.\d+\.conv3\.", k) for k in state_dict)
        for candidate, cls in BACKBONES.items():
            if (
                tuple(cls.stage_sizes) == tuple(counts)
                and (cls.block_cls.expansion == 4) == bottleneck
            ):
                name = candidate
        if name is None:
            kind = "bottleneck" if bottleneck else "basic"
            raise ConversionError(
                f"No known ResNet has {kind} blocks per stage {counts} (from the layerN.i keys); "
                f"known: {', '.join(BACKBONES)}. Check the keys, strip a prefix such as 'module.' "
                "(--prefix), or name the architecture (--arch) to list the missing keys."
            )
    stem, width = "imagenet", 64
    if "conv1.weight" in state_dict:
        shape = layout.shape_of(state_dict["conv1.weight"])
        if len(shape) != 4 or shape[2:] not in ((7, 7), (3, 3)):
            raise ConversionError(
                f"conv1.weight has shape {shape}; expected [width, 3, 7, 7] (imagenet) or "
                "[width, 3, 3, 3] (cifar)."
            )
        width = shape[0]
        stem = "imagenet" if shape[2] == 7 else "cifar"
    num_classes = layout.shape_of(state_dict["fc.weight"])[0] if "fc.weight" in state_dict else None
    return {"name": name, "stem": stem, "width": width, "num_classes": num_classes}


def describe(arch: Mapping[str, Any]) -> str:
    name, stem, width, classes = arch["name"], arch["stem"], arch["width"], arch["num_classes"]
    return f"{name} (stem {stem}, width {width}, num_classes {classes})"


def expected_shapes(
    name: str, stem: str = "imagenet", width: int = 64, num_classes: int | None = None
) -> Variables:
    """The backbone's variable tree as `jax.ShapeDtypeStruct`s (no computation, no memory)."""
    from bt_jax.models import create

    return layout.init_shapes(create(name, stem=stem, width=width, num_classes=num_classes), stem)


def check_like(variables: Mapping[str, Any], template: Mapping[str, Any]) -> None:
    """The converted tree has exactly the template's leaves, shapes and dtypes (float32).

    Every key and shape was checked with a one-line error before; a failure here is a bug.
    """
    import chex

    chex.assert_trees_all_equal_shapes_and_dtypes(variables, template)


def torchvision_to_flax(state_dict: Mapping[str, Any], name: str | None = None) -> Variables:
    """torchvision state dict -> Flax backbone variables {"params": ..., "batch_stats": ...}.

    state_dict: flat mapping of torchvision keys to arrays (NumPy, or anything `np.asarray` reads,
      e.g. CPU torch tensors). With `fc.*` the result includes the head `fc`; without it
      (the Barlow Twins release), use the backbone with num_classes=None.
    name: the expected architecture ("resnet50", ...); None reads it from the keys.

    Raises ConversionError naming every missing key, unexpected key and shape mismatch, or the
    first array with NaN/inf values.
    """
    arch = infer_architecture(state_dict, name)
    template = expected_shapes(**arch)
    table = backbone_entries(template)
    optional = [e.torch_key for e in table if e.flax_path is None]
    problems = layout.compare(state_dict, layout.torch_shapes(table, template), optional)
    if problems:
        raise ConversionError(
            f"State dict does not match {describe(arch)}: " + "; ".join(problems) + "."
        )
    variables = layout.from_torch(state_dict, table)
    check_like(variables, template)
    return variables


def flax_to_torchvision(variables: Mapping[str, Any]) -> StateDict:
    """Flax backbone variables {"params", "batch_stats"} -> torchvision state dict of NumPy arrays.

    The architecture is read from the variables' shapes and every leaf is checked against it.
    `num_batches_tracked` is written as 0 (int64) for every BatchNorm so that a torchvision model
    loads the result with `load_state_dict(strict=True)`.
    """
    layout.check_collections(variables, "backbone variables")
    if "backbone" in variables.get("params", {}):
        raise ConversionError(
            "These are BarlowTwinsModel variables; pass the backbone's with "
            "bt_jax.convert.backbone_variables(variables), or convert the whole model with "
            "bt_jax.convert.flax_model_to_torch."
        )
    found = backbone_entries(variables)
    arch = infer_architecture(layout.torch_shapes(found, variables))
    template = expected_shapes(**arch)
    problems = layout.compare_flax(variables, template)
    if problems:
        raise ConversionError(
            f"Variables do not match {describe(arch)}: " + "; ".join(problems) + "."
        )
    return layout.to_torch(variables, backbone_entries(template))
