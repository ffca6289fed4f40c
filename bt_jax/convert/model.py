"""The whole official Barlow Twins model (backbone + projector) between PyTorch and Flax.

    variables = torch_to_flax_model(checkpoint["model"])      # "module." prefix found by itself
    state_dict = flax_model_to_torch(variables, prefix="module.")

The official `main.py` model has `backbone` (torchvision resnet50, `fc` an identity), `projector`
(an nn.Sequential) and `bn` (BatchNorm1d(affine=False) before the loss); its training checkpoint
`checkpoint.pth` holds `{"epoch", "model", "optimizer"}` with the model saved from DDP, so every
key starts with "module.". The Flax side is exactly what
`BarlowTwinsModel(backbone, Projector(spec)).init(...)` makes:
`{"params": {"backbone", "projector"}, "batch_stats": {"backbone", "projector"}}`.

    official (after the prefix)        Flax                                  layout
    backbone.*                         params|batch_stats/backbone/*         as convert.resnet
    projector.0.weight [8192, 2048]    params/projector/linear0/kernel       [2048, 8192]: .T
    projector.1.weight, .bias          params/projector/bn0/scale, bias
    projector.1.running_mean, _var     batch_stats/projector/bn0/mean, var   copied as is
    projector.1.num_batches_tracked    (none)                                written as 0
    projector.3.*, projector.4.*       linear1, bn1                          (2, 5: ReLUs)
    projector.{3i}.weight              params/projector/linear{i}/kernel     the last has no BN
    bn.running_mean, bn.running_var,   (none: not carried)                   written as 0, 1, 0
      bn.num_batches_tracked                                                 (PyTorch's initial)

The spec ("8192-8192-8192") is read from the Linear weights' shapes, the backbone as in
`bt_jax.convert.resnet`. The loss BatchNorm's running statistics are dropped: the official model
is only ever run in training mode, where BatchNorm1d normalises with the batch's own statistics,
and bt_jax's loss standardises over the global batch the same way; neither reads them. Its shape
is still checked against the spec.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from typing import Any

import numpy as np

from bt_jax.convert import layout, resnet
from bt_jax.convert.layout import ConversionError, Entry, StateDict, Variables

OFFICIAL_PREFIX = "module."  # main.py saves the DistributedDataParallel model's state dict
LOSS_BN = "bn"


def projector_name(flax_module: tuple[str, ...]) -> str:
    """("linear1",) -> "3", ("bn0",) -> "1": indices in the official nn.Sequential, whose hidden
    layers are Linear, BatchNorm1d, ReLU."""
    m = re.fullmatch(r"(linear|bn)(\d+)", "/".join(flax_module))
    if m is None:
        raise ConversionError(
            f"Projector module {'/'.join(flax_module)!r} has no official counterpart; "
            "expected linear0, bn0, linear1, ..."
        )
    return str(3 * int(m.group(2)) + (m.group(1) == "bn"))


def _loss_bn_entries(embedding_dim: int, prefix: str) -> list[Entry]:
    return [
        Entry(f"{prefix}{LOSS_BN}.running_mean", None, fill=np.zeros(embedding_dim, np.float32)),
        Entry(f"{prefix}{LOSS_BN}.running_var", None, fill=np.ones(embedding_dim, np.float32)),
        Entry(f"{prefix}{LOSS_BN}.num_batches_tracked", None, fill=np.zeros((), np.int64)),
    ]


def _submodule(variables: Mapping[str, Any], name: str) -> Variables:
    return {c: variables[c][name] for c in layout.COLLECTIONS if name in variables.get(c, {})}


def model_entries(
    variables: Mapping[str, Any], prefix: str = "", embedding_dim: int | None = None
) -> list[Entry]:
    """The table of BarlowTwinsModel variables; with embedding_dim, also the loss BatchNorm's."""
    layout.check_collections(variables, "BarlowTwinsModel variables")
    params = variables.get("params", {})
    if not {"backbone", "projector"} <= set(params) or set(params) - {"backbone", "projector"}:
        raise ConversionError(
            f"BarlowTwinsModel variables have params/backbone and params/projector; these have "
            f"params/{sorted(params)}. For a backbone alone, convert without the projector."
        )
    table = resnet.backbone_entries(
        _submodule(variables, "backbone"), f"{prefix}backbone.", ("backbone",)
    )
    table += layout.entries(
        _submodule(variables, "projector"), projector_name, f"{prefix}projector.", ("projector",)
    )
    if embedding_dim is not None:
        table += _loss_bn_entries(embedding_dim, prefix)
    return table


def infer_projector_spec(state_dict: Mapping[str, Any]) -> str:
    """The spec, e.g. "8192-8192-8192", from the Linear weights `projector.{0,3,6,...}.weight`.

    state_dict: keys without the "module." prefix; arrays or anything with a `.shape`.
    """
    linears = {}
    for key, value in state_dict.items():
        m = re.fullmatch(r"projector\.(\d+)\.weight", key)
        if m and len(layout.shape_of(value)) == 2:
            linears[int(m.group(1))] = layout.shape_of(value)
    if not linears:
        raise ConversionError(
            "No projector Linear weights (projector.0.weight, projector.3.weight, ...): these "
            "weights hold no official projector. Convert the backbone alone (without "
            "--with-projector), or check the prefix."
        )
    indices = sorted(linears)
    if indices != [3 * i for i in range(len(indices))]:
        raise ConversionError(
            f"Projector Linear layers at indices {indices}; the official nn.Sequential has them at "
            f"{[3 * i for i in range(len(indices))]} (Linear, BatchNorm1d, ReLU per hidden layer)."
        )
    return "-".join(str(linears[i][0]) for i in indices)


def expected_model_shapes(
    name: str, stem: str = "imagenet", width: int = 64, spec: str = "8192-8192-8192"
) -> Variables:
    """The variables of `BarlowTwinsModel(create(name, stem, width), Projector(spec))`, as
    `jax.ShapeDtypeStruct`s."""
    from bt_jax.models import BarlowTwinsModel, Projector, create

    return layout.init_shapes(
        BarlowTwinsModel(create(name, stem=stem, width=width), Projector(spec)), stem
    )


def _describe(arch: Mapping[str, Any], spec: str) -> str:
    return f"{arch['name']} (stem {arch['stem']}, width {arch['width']}) + projector {spec}"


def detect_prefix(state_dict: Mapping[str, Any]) -> str:
    """'module.' when every key has it (saved from DDP, as checkpoint.pth), else ''."""
    keys = list(state_dict)
    return OFFICIAL_PREFIX if keys and all(k.startswith(OFFICIAL_PREFIX) for k in keys) else ""


def infer_model(
    state_dict: Mapping[str, Any], prefix: str = "", arch: str | None = None
) -> tuple[dict, str]:
    """(backbone architecture as `resnet.infer_architecture` gives it, projector spec) of an
    official model state dict whose keys start with `prefix`."""
    stripped = {k[len(prefix) :]: v for k, v in state_dict.items() if k.startswith(prefix)}
    start = "backbone."
    backbone_keys = {k[len(start) :]: v for k, v in stripped.items() if k.startswith(start)}
    if not backbone_keys:
        raise ConversionError(
            f"No key starts with {prefix + start!r} (keys: {layout.listing(sorted(state_dict))}); "
            "pass the prefix before 'backbone.' (--prefix), e.g. 'module.'."
        )
    return resnet.infer_architecture(backbone_keys, arch), infer_projector_spec(stripped)


def torch_to_flax_model(
    state_dict: Mapping[str, Any], prefix: str | None = None, arch: str | None = None
) -> Variables:
    """Official Barlow Twins model state dict -> BarlowTwinsModel variables.

    state_dict: keys `{prefix}backbone.*`, `{prefix}projector.*`, and optionally `{prefix}bn.*`
      (the loss BatchNorm, checked and dropped); arrays or CPU tensors.
    prefix: what precedes "backbone." in every key; None: "module." if every key has it, else "".
    arch: the backbone ("resnet50", ...); None reads it from the keys.

    Returns {"params": {"backbone", "projector"}, "batch_stats": {"backbone", "projector"}}.
    Raises ConversionError naming every missing, unexpected or mis-shaped key, or the first
    array with NaN/inf values.
    """
    prefix = detect_prefix(state_dict) if prefix is None else prefix
    info, spec = infer_model(state_dict, prefix, arch)
    template = expected_model_shapes(info["name"], info["stem"], info["width"], spec)
    table = model_entries(template, prefix, int(spec.split("-")[-1]))
    optional = [e.torch_key for e in table if e.flax_path is None]
    problems = layout.compare(state_dict, layout.torch_shapes(table, template), optional)
    if problems:
        raise ConversionError(
            f"State dict does not match {_describe(info, spec)}: " + "; ".join(problems) + "."
        )
    variables = layout.from_torch(state_dict, table)
    resnet.check_like(variables, template)
    return variables


def flax_model_to_torch(variables: Mapping[str, Any], prefix: str = "") -> StateDict:
    """BarlowTwinsModel variables -> the official model's state dict of NumPy arrays.

    prefix: put before every key; "module." matches checkpoint.pth's `model` (saved from DDP),
      "" a plain `BarlowTwins(args)` of main.py.

    Every BatchNorm's `num_batches_tracked` is 0 and the loss BatchNorm `bn` gets PyTorch's initial
    statistics (mean 0, var 1), so the official model loads it with `load_state_dict(strict=True)`.
    """
    found = model_entries(variables)
    shapes = layout.torch_shapes(found, variables)
    backbone_shapes = {
        k[len("backbone.") :]: v for k, v in shapes.items() if k.startswith("backbone.")
    }
    info = resnet.infer_architecture(backbone_shapes)
    if info["num_classes"] is not None:
        raise ConversionError(
            "params/backbone/fc is a classifier head; the official model's backbone has none "
            "(fc is an identity). Drop it before converting."
        )
    spec = infer_projector_spec(shapes)
    template = expected_model_shapes(info["name"], info["stem"], info["width"], spec)
    problems = layout.compare_flax(variables, template)
    if problems:
        raise ConversionError(
            f"Variables do not match {_describe(info, spec)}: " + "; ".join(problems) + "."
        )
    return layout.to_torch(variables, model_entries(template, prefix, int(spec.split("-")[-1])))
