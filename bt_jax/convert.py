"""ResNet weights between torchvision state dicts and Flax variables.

    variables = torchvision_to_flax(state_dict)   # {"params": ..., "batch_stats": ...}
    state_dict = flax_to_torchvision(variables)

A state dict here is a flat dict of NumPy arrays keyed as torchvision names them; the official
Barlow Twins release `resnet50.pth` is one (torchvision resnet50 without `fc.*`). The architecture
is read from the keys and shapes: depth from the blocks per stage and `conv3`, `width` from
`conv1.weight`, the stem from its kernel size (7: "imagenet", 3: "cifar"), the head from `fc.*`.

Name and layout mapping (Flax module names are torchvision's with `Sequential` indices joined by "_"):

    torchvision                          Flax (collection / path)             layout
    conv1.weight [O, I, kh, kw]          params/conv1/kernel [kh, kw, I, O]   transpose(2, 3, 1, 0)
    bn1.weight, bn1.bias                 params/bn1/scale, params/bn1/bias
    bn1.running_mean, bn1.running_var    batch_stats/bn1/mean, batch_stats/bn1/var
    bn1.num_batches_tracked              (none: Flax keeps no count; written as 0)
    layer1.0.conv1.weight                params/layer1_0/conv1/kernel
    layer2.0.downsample.0.weight         params/layer2_0/downsample_0/kernel  (shortcut conv)
    layer2.0.downsample.1.*              params|batch_stats/layer2_0/downsample_1/*  (shortcut BN)
    fc.weight [C, F], fc.bias [C]        params/fc/kernel [F, C], params/fc/bias

Keys that the architecture does not have, and keys it needs that are missing, raise a
`ConversionError` naming them; nothing is dropped silently. `num_batches_tracked` is optional
on input (PyTorch ignores it when momentum is set).

Command line:

    python -m bt_jax.convert IN OUT [--arch resnet50] [--prefix module.backbone.]

The direction follows IN: a torchvision state dict (`.pth`/`.pt`, or `.npz` with torchvision keys)
becomes Flax variables; Flax variables (`.msgpack`, or `.npz` with "/" keys) become a torchvision
state dict. OUT's extension picks the container:
- `.msgpack`: Flax variables `{"params": ..., "batch_stats": ...}` via
  `flax.serialization.msgpack_serialize`; read back with `load_variables`.
- `.npz`: flat NumPy archive, Flax keys "params/layer1_0/conv1/kernel" or torchvision keys.
- `.pth`/`.pt`: torchvision state dict of tensors, loadable with `model.load_state_dict`.
Reading or writing `.pth` needs PyTorch (`pip install 'bt_jax[torch]'`).
"""
from __future__ import annotations

import argparse
import os
import re
import sys
from typing import Any, Iterator, Mapping

import numpy as np

StateDict = dict[str, np.ndarray]
Variables = dict[str, Any]

TORCH_SUFFIXES = (".pth", ".pt")
_CONV_PERM = (3, 2, 0, 1)  # Flax [kh, kw, I, O] -> torch [O, I, kh, kw]
_DENSE_PERM = (1, 0)  # Flax [in, out] -> torch [out, in]


class ConversionError(ValueError):
    """A state dict or variable tree that does not fit the architecture; the message names the keys."""


def _inverse(perm: tuple[int, ...]) -> tuple[int, ...]:
    return tuple(int(i) for i in np.argsort(perm))


def _torch_module_name(flax_path: tuple[str, ...]) -> str:
    # "layer1_0" -> "layer1.0", "downsample_1" -> "downsample.1"; "conv1", "bn1", "fc" unchanged.
    return ".".join(re.sub(r"_(\d+)$", r".\1", p) for p in flax_path)


def _flatten(tree: Mapping[str, Any], prefix: tuple[str, ...] = ()) -> Iterator[tuple[tuple[str, ...], Any]]:
    for k, v in tree.items():
        if isinstance(v, Mapping):
            yield from _flatten(v, prefix + (k,))
        else:
            yield prefix + (k,), v


def _set(tree: dict, path: tuple[str, ...], value: Any) -> None:
    for p in path[:-1]:
        tree = tree.setdefault(p, {})
    tree[path[-1]] = value


def _entries(variables: Mapping[str, Any]) -> list[tuple[str, str, tuple[str, ...], tuple[int, ...] | None]]:
    """The mapping table of one variable tree: (torch key, flax collection, flax path, perm to torch).

    perm None marks `num_batches_tracked`, which has no Flax counterpart. Works on arrays and on
    `jax.ShapeDtypeStruct`s alike (only `.ndim`/`.shape` are read).
    """
    unknown_collections = sorted(set(variables) - {"params", "batch_stats"})
    if unknown_collections:
        raise ConversionError(
            f"Unexpected variable collections {unknown_collections}; expected only 'params' and 'batch_stats' of a backbone."
        )
    params = variables.get("params", {})
    if "backbone" in params:
        raise ConversionError(
            "These are BarlowTwinsModel variables; pass the backbone's with "
            "bt_jax.convert.backbone_variables(variables)."
        )
    stats = dict(_flatten(variables.get("batch_stats", {})))
    table = []
    bn_modules = []
    for path, leaf in _flatten(params):
        module, name = path[:-1], path[-1]
        tkey = _torch_module_name(module)
        ndim = len(leaf.shape)
        if name == "kernel" and ndim == 4:
            table.append((f"{tkey}.weight", "params", path, _CONV_PERM))
        elif name == "kernel" and ndim == 2:
            table.append((f"{tkey}.weight", "params", path, _DENSE_PERM))
        elif name == "scale":
            table.append((f"{tkey}.weight", "params", path, (0,)))
            bn_modules.append(module)
        elif name == "bias":
            table.append((f"{tkey}.bias", "params", path, (0,)))
        else:
            raise ConversionError(f"Parameter {'/'.join(path)} (shape {tuple(leaf.shape)}) has no torchvision counterpart.")
    for module in bn_modules:
        tkey = _torch_module_name(module)
        for flax_name, torch_name in (("mean", "running_mean"), ("var", "running_var")):
            path = module + (flax_name,)
            if path not in stats:
                raise ConversionError(f"batch_stats/{'/'.join(path)} is missing; BatchNorm {'/'.join(module)} needs it.")
            table.append((f"{tkey}.{torch_name}", "batch_stats", path, (0,)))
            del stats[path]
        table.append((f"{tkey}.num_batches_tracked", "batch_stats", module + ("num_batches_tracked",), None))
    if stats:
        raise ConversionError(f"batch_stats entries without a BatchNorm: {sorted('/'.join(p) for p in stats)}.")
    return table


def backbone_variables(variables: Mapping[str, Any]) -> Variables:
    """The backbone's variables out of a `BarlowTwinsModel`'s (`params/backbone`, `batch_stats/backbone`)."""
    out = {"params": variables["params"]["backbone"]}
    if "batch_stats" in variables:
        out["batch_stats"] = variables["batch_stats"]["backbone"]
    return out


def flax_to_torchvision(variables: Mapping[str, Any]) -> StateDict:
    """Flax backbone variables {"params", "batch_stats"} -> torchvision state dict of NumPy arrays.

    `num_batches_tracked` is written as 0 (int64) for every BatchNorm so that a torchvision model
    loads the result with `load_state_dict(strict=True)`.
    """
    params = dict(_flatten(variables.get("params", {})))
    stats = dict(_flatten(variables.get("batch_stats", {})))
    out: StateDict = {}
    for tkey, collection, path, perm in _entries(variables):
        if perm is None:
            out[tkey] = np.zeros((), np.int64)
        else:
            value = np.asarray((params if collection == "params" else stats)[path], np.float32)
            out[tkey] = np.ascontiguousarray(np.transpose(value, perm))
    return out


def infer_architecture(state_dict: Mapping[str, Any], name: str | None = None) -> dict[str, Any]:
    """`create` arguments read from a torchvision state dict: name, stem, width, num_classes.

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
            if tuple(cls.stage_sizes) == tuple(counts) and (cls.block_cls.expansion == 4) == bottleneck:
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
        shape = tuple(np.shape(state_dict["conv1.weight"]))
        width = int(shape[0])
        if len(shape) != 4 or shape[2:] not in ((7, 7), (3, 3)):
            raise ConversionError(f"conv1.weight has shape {shape}; expected [width, 3, 7, 7] (imagenet) or [width, 3, 3, 3] (cifar).")
        stem = "imagenet" if shape[2] == 7 else "cifar"
    num_classes = int(np.shape(state_dict["fc.weight"])[0]) if "fc.weight" in state_dict else None
    return {"name": name, "stem": stem, "width": width, "num_classes": num_classes}


def expected_shapes(name: str, stem: str = "imagenet", width: int = 64, num_classes: int | None = None) -> Variables:
    """The backbone's variable tree as `jax.ShapeDtypeStruct`s (no computation, no memory)."""
    import jax
    import jax.numpy as jnp

    from bt_jax.models import create

    model = create(name, stem=stem, width=width, num_classes=num_classes)
    size = 64 if stem == "imagenet" else 32
    return jax.eval_shape(model.init, jax.random.PRNGKey(0), jnp.zeros((1, size, size, 3), jnp.float32))


def torchvision_to_flax(state_dict: Mapping[str, Any], name: str | None = None) -> Variables:
    """torchvision state dict -> Flax backbone variables {"params": ..., "batch_stats": ...}.

    state_dict: flat mapping of torchvision keys to arrays (NumPy, or anything `np.asarray` reads,
      e.g. CPU torch tensors). With `fc.*` the result includes the head `fc`; without it
      (the Barlow Twins release), use the backbone with num_classes=None.
    name: the expected architecture ("resnet50", ...); None reads it from the keys.

    Raises ConversionError naming every missing key, unexpected key and shape mismatch.
    """
    arch = infer_architecture(state_dict, name)
    template = expected_shapes(arch["name"], arch["stem"], arch["width"], arch["num_classes"])
    table = _entries(template)
    params_t = dict(_flatten(template["params"]))
    stats_t = dict(_flatten(template["batch_stats"]))

    expected = {tkey for tkey, *_ in table}
    required = {tkey for tkey, _, _, perm in table if perm is not None}
    missing = sorted(required - set(state_dict))
    extra = sorted(set(state_dict) - expected)
    problems = []
    if missing:
        problems.append(f"missing keys: {missing}")
    if extra:
        problems.append(f"unexpected keys: {extra}")
    variables: Variables = {"params": {}, "batch_stats": {}}
    for tkey, collection, path, perm in table:
        if perm is None or tkey not in state_dict:
            continue
        target = (params_t if collection == "params" else stats_t)[path]
        want = tuple(target.shape[i] for i in perm)
        value = np.asarray(state_dict[tkey], np.float32)
        if value.shape != want:
            problems.append(f"{tkey} has shape {value.shape}, {arch['name']} needs {want}")
            continue
        _set(variables[collection], path, np.ascontiguousarray(np.transpose(value, _inverse(perm))))
    if problems:
        described = f"{arch['name']} (stem {arch['stem']}, width {arch['width']}, num_classes {arch['num_classes']})"
        raise ConversionError(f"State dict does not match {described}: " + "; ".join(problems) + ".")
    return variables


# ---------------------------------------------------------------------------------------------
# Files.


def _import_torch():
    try:
        import torch
    except ImportError as e:
        raise SystemExit(
            "Reading or writing .pth/.pt files needs PyTorch: pip install 'bt_jax[torch]' (or torch). "
            "Without it, convert through .npz: np.savez('w.npz', **{k: v.numpy() for k, v in sd.items()})."
        ) from e
    return torch


def _is_flax_keys(keys: list[str]) -> bool:
    return bool(keys) and all(k.split("/", 1)[0] in ("params", "batch_stats") for k in keys)


def load_variables(path: str) -> Variables:
    """Flax variables from a `.msgpack` or "/"-keyed `.npz` written by this module."""
    if path.endswith(".msgpack"):
        from flax import serialization

        with open(path, "rb") as f:
            return serialization.msgpack_restore(f.read())
    if path.endswith(".npz"):
        with np.load(path) as data:
            if not _is_flax_keys(list(data.keys())):
                raise ConversionError(f"{path} does not hold Flax variables ('params/...' keys); is it a torchvision state dict?")
            variables: Variables = {}
            for k in data.keys():
                _set(variables, tuple(k.split("/")), data[k])
            return variables
    raise ConversionError(f"Cannot read Flax variables from {path!r}: use .msgpack or .npz.")


def save_variables(variables: Mapping[str, Any], path: str) -> None:
    """Write Flax variables as `.msgpack` (flax.serialization) or `.npz` with "/"-joined keys."""
    if path.endswith(".msgpack"):
        from flax import serialization

        with open(path, "wb") as f:
            f.write(serialization.msgpack_serialize(_to_numpy_tree(variables)))
    elif path.endswith(".npz"):
        np.savez(path, **{"/".join(p): np.asarray(v) for p, v in _flatten(variables)})
    else:
        raise ConversionError(f"Cannot write Flax variables to {path!r}: use .msgpack or .npz.")


def _to_numpy_tree(tree: Mapping[str, Any]) -> dict:
    return {k: _to_numpy_tree(v) if isinstance(v, Mapping) else np.asarray(v) for k, v in tree.items()}


def load_state_dict(path: str) -> StateDict:
    """A torchvision state dict from `.pth`/`.pt` (needs torch) or a torchvision-keyed `.npz`."""
    if path.endswith(TORCH_SUFFIXES):
        torch = _import_torch()
        obj = torch.load(path, map_location="cpu", weights_only=True)
        if not isinstance(obj, Mapping) or not all(hasattr(v, "shape") for v in obj.values()):
            nested = [k for k, v in obj.items() if isinstance(v, Mapping)] if isinstance(obj, Mapping) else []
            raise ConversionError(
                f"{path} is not a flat state dict of tensors"
                + (f" (it has nested dicts under {nested}: a training checkpoint? save its model state dict first)" if nested else "")
                + "."
            )
        # NumPy has no bfloat16: widen floating tensors (fp16/bf16 checkpoints) to float32.
        return {
            k: (v.detach().cpu().float() if v.is_floating_point() else v.detach().cpu()).numpy()
            for k, v in obj.items()
        }
    if path.endswith(".npz"):
        with np.load(path) as data:
            return {k: data[k] for k in data.keys()}
    raise ConversionError(f"Cannot read a state dict from {path!r}: use .pth, .pt or .npz.")


def save_state_dict(state_dict: Mapping[str, np.ndarray], path: str) -> None:
    """Write a torchvision state dict as `.pth`/`.pt` (needs torch) or `.npz`."""
    if path.endswith(TORCH_SUFFIXES):
        torch = _import_torch()
        torch.save({k: torch.from_numpy(np.array(v)) for k, v in state_dict.items()}, path)
    elif path.endswith(".npz"):
        np.savez(path, **state_dict)
    else:
        raise ConversionError(f"Cannot write a state dict to {path!r}: use .pth, .pt or .npz.")


def _input_is_flax(path: str) -> bool:
    if path.endswith(".msgpack"):
        return True
    if path.endswith(".npz"):
        with np.load(path) as data:
            return _is_flax_keys(list(data.keys()))
    return False


def convert_file(src: str, dst: str, arch: str | None = None, prefix: str = "") -> str:
    """Convert SRC to DST (direction from SRC's content, container from DST's extension); returns a summary."""
    if not os.path.exists(src):
        raise ConversionError(f"Input file {src!r} does not exist.")
    if _input_is_flax(src):
        variables = load_variables(src)
        if "backbone" in variables.get("params", {}):
            variables = backbone_variables(variables)
        state_dict = flax_to_torchvision(variables)
        if dst.endswith(".msgpack"):
            raise ConversionError(f"{src} already holds Flax variables; write torchvision weights to .pth or .npz.")
        save_state_dict(state_dict, dst)
        return f"Flax variables -> torchvision state dict: {len(state_dict)} keys written to {dst}."
    state_dict = load_state_dict(src)
    note = ""
    if prefix:
        outside = [k for k in state_dict if not k.startswith(prefix)]
        state_dict = {k[len(prefix):]: v for k, v in state_dict.items() if k.startswith(prefix)}
        if not state_dict:
            raise ConversionError(f"No key of {src} starts with prefix {prefix!r}.")
        note = f" Ignored {len(outside)} keys outside prefix {prefix!r}" + (f", e.g. {outside[:3]}." if outside else ".")
    if dst.endswith(TORCH_SUFFIXES):
        raise ConversionError(f"{src} holds torchvision weights; write Flax variables to .msgpack or .npz.")
    info = infer_architecture(state_dict, arch)
    variables = torchvision_to_flax(state_dict, name=arch)
    save_variables(variables, dst)
    return (
        f"torchvision state dict -> Flax variables of {info['name']} (stem {info['stem']}, "
        f"width {info['width']}, num_classes {info['num_classes']}) written to {dst}.{note}"
    )


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m bt_jax.convert",
        description="Convert ResNet weights between a torchvision state dict (.pth/.pt/.npz) and Flax variables (.msgpack/.npz).",
    )
    parser.add_argument("src", metavar="IN", help="torchvision .pth/.pt/.npz, or Flax .msgpack/.npz")
    parser.add_argument("dst", metavar="OUT", help="Flax .msgpack/.npz, or torchvision .pth/.pt/.npz")
    parser.add_argument("--arch", default=None, help="expected architecture (resnet18 ... resnet152); default: read from the keys")
    parser.add_argument(
        "--prefix", default="", help="take only keys starting with this and strip it, e.g. 'module.backbone.'"
    )
    args = parser.parse_args(argv)
    try:
        print(convert_file(args.src, args.dst, arch=args.arch, prefix=args.prefix))
    except ConversionError as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
