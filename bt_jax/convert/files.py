"""Reading and writing converted weights, local or on object storage (paths through etils.epath).

- `.msgpack`: Flax variables via `flax.serialization` (also bt_jax's exported `backbone.msgpack`,
  whose `variables` entry is taken).
- `.npz`: a flat NumPy archive, Flax keys "params/layer1_0/conv1/kernel" or torch keys.
- `.pth`/`.pt`: a PyTorch state dict of tensors (needs torch), or a training checkpoint whose
  `model` entry is one (the official `checkpoint.pth`).

A file that cannot be decoded raises ConversionError naming it; I/O errors stay OSError. Writes
are atomic on a local disk (a temporary file in the same directory, then a rename) and a single
object write on object storage, so OUT is either the old file or the whole new one.
"""

from __future__ import annotations

import io
import os
import re
from collections.abc import Callable, Mapping
from typing import Any, BinaryIO

import numpy as np
from etils import epath

from bt_jax.convert import layout
from bt_jax.convert.layout import ConversionError, StateDict, Variables

TORCH_SUFFIXES = (".pth", ".pt")
FLAX_SUFFIXES = (".msgpack", ".npz")
READABLE = (".msgpack", ".npz") + TORCH_SUFFIXES
_ZIP_MAGIC = (b"PK\x03\x04", b"PK\x05\x06")  # a zip with entries / an empty zip


def import_torch() -> Any:
    """The torch module, or a one-line ConversionError saying how to get it."""
    try:
        import torch
    except ImportError:
        raise ConversionError(
            "Reading or writing .pth/.pt files needs PyTorch, which is not installed: "
            "pip install 'bt_jax[torch]' (or torch). Without it, convert through .npz: "
            "np.savez('w.npz', **{k: v.numpy() for k, v in state_dict.items()})."
        ) from None
    return torch


def is_local(path: epath.PathLike) -> bool:
    """False for URIs such as gs://bucket/x."""
    return re.match(r"^[a-zA-Z][a-zA-Z0-9+.-]*://", os.fspath(path)) is None


def _decode_error(path: epath.Path, kind: str, error: Exception) -> ConversionError:
    detail = str(error).strip().splitlines()[0][:200] if str(error).strip() else ""
    cause = f"{type(error).__name__}: {detail}" if detail else type(error).__name__
    return ConversionError(
        f"{path} is not a readable {kind} ({cause}). Is it truncated or damaged? "
        "Convert a complete copy."
    )


def _read_npz(path: epath.Path) -> dict[str, np.ndarray]:
    with path.open("rb") as f:
        if f.read(4) not in _ZIP_MAGIC:
            raise ConversionError(
                f"{path} is not a .npz archive (no zip header): is it a text file, a single .npy "
                "array, or a truncated download?"
            )
        f.seek(0)
        try:
            with np.load(f) as data:
                return {k: data[k] for k in data.keys()}
        except OSError:
            raise
        except Exception as e:  # noqa: BLE001 - whatever the decoder says, the file is bad
            raise _decode_error(path, ".npz archive", e) from e


def is_flax_keys(keys: list[str]) -> bool:
    return bool(keys) and all(k.split("/", 1)[0] in layout.COLLECTIONS for k in keys)


def _read_msgpack(path: epath.Path) -> Variables:
    from flax import serialization

    data = path.read_bytes()
    try:
        tree = serialization.msgpack_restore(data)
    except Exception as e:  # noqa: BLE001
        raise _decode_error(path, "Flax .msgpack file", e) from e
    if (
        isinstance(tree, Mapping)
        and isinstance(tree.get("variables"), Mapping)
        and "config" in tree
    ):
        tree = tree["variables"]  # bt_jax.checkpoint's exported backbone: {"config", "variables"}
    if not isinstance(tree, Mapping) or not tree or set(tree) - set(layout.COLLECTIONS):
        top = sorted(tree) if isinstance(tree, Mapping) else type(tree).__name__
        raise ConversionError(
            f"{path} does not hold Flax variables (top level {top}; expected "
            f"{list(layout.COLLECTIONS)})."
        )
    return dict(tree)


def read(path: epath.PathLike) -> tuple[str, dict, str]:
    """("flax", variables, "") or ("torch", state_dict, note) from IN, by extension and keys.

    note: what was taken out of a training checkpoint, for the summary ("" otherwise).
    """
    path = epath.Path(path)
    if path.suffix == ".msgpack":
        return "flax", _read_msgpack(path), ""
    if path.suffix == ".npz":
        arrays = _read_npz(path)
        if is_flax_keys(list(arrays)):
            return "flax", layout.unflatten((tuple(k.split("/")), v) for k, v in arrays.items()), ""
        return "torch", arrays, ""
    if path.suffix in TORCH_SUFFIXES:
        return ("torch",) + _read_torch(path)
    raise ConversionError(
        f"Cannot read {path}: unknown extension {path.suffix!r}; use one of {list(READABLE)}."
    )


def load_variables(path: epath.PathLike) -> Variables:
    """Flax variables from a `.msgpack` or "/"-keyed `.npz` written by this module."""
    kind, tree, _ = read(path)
    if kind != "flax":
        raise ConversionError(
            f"{path} does not hold Flax variables ('params/...' keys); is it a PyTorch state dict?"
        )
    return tree


def load_state_dict(path: epath.PathLike) -> StateDict:
    """A PyTorch state dict from `.pth`/`.pt` (needs torch) or a torch-keyed `.npz`."""
    kind, state_dict, _ = read(path)
    if kind != "torch":
        raise ConversionError(f"{path} holds Flax variables, not a PyTorch state dict.")
    return state_dict


def _exclude_bias_and_norm(p: Any) -> bool:
    return p.ndim == 1


def _torch_load(torch: Any, f: BinaryIO) -> Any:
    # The official main.py pickles its LARS filter function (defined in its __main__) into the
    # optimizer state of checkpoint.pth; weights_only loading refuses unknown globals, so allow
    # that one name, bound to a stand-in. Nothing else but tensors and plain data is loaded.
    allowed = [(_exclude_bias_and_norm, "__main__.exclude_bias_and_norm")]
    with torch.serialization.safe_globals(allowed):
        return torch.load(f, map_location="cpu", weights_only=True)


def _is_flat_tensors(obj: Any) -> bool:
    return isinstance(obj, Mapping) and bool(obj) and all(hasattr(v, "shape") for v in obj.values())


def _read_torch(path: epath.Path) -> tuple[StateDict, str]:
    torch = import_torch()
    with path.open("rb") as f:
        try:
            obj = _torch_load(torch, f)
        except OSError:
            raise
        except Exception as e:  # noqa: BLE001
            raise _decode_error(path, "PyTorch file", e) from e
    note = ""
    if isinstance(obj, Mapping) and _is_flat_tensors(obj.get("model")):
        others = sorted(k for k in obj if k != "model")
        epoch = f" (epoch {obj['epoch']})" if "epoch" in obj else ""
        note = f" Took the 'model' entry of a training checkpoint{epoch}; left out {others}."
        obj = obj["model"]
    if not _is_flat_tensors(obj):
        nested = (
            sorted(k for k, v in obj.items() if isinstance(v, Mapping))
            if isinstance(obj, Mapping)
            else []
        )
        raise ConversionError(
            f"{path} is not a flat state dict of tensors"
            + (
                f" (it has nested dicts under {nested}: save the model's state_dict() first)"
                if nested
                else ""
            )
            + "."
        )
    # NumPy has no bfloat16: floating tensors (fp16/bf16 checkpoints) are widened to float32.
    state_dict = {
        k: (v.detach().cpu().float() if v.is_floating_point() else v.detach().cpu()).numpy()
        for k, v in obj.items()
    }
    return state_dict, note


def write_atomically(path: epath.PathLike, write: Callable[[BinaryIO], None]) -> None:
    """Runs write(file) into PATH: a temporary sibling renamed into place locally (removed on any
    failure), one object write on object storage."""
    path = epath.Path(path)
    if not is_local(path):
        buffer = io.BytesIO()
        write(buffer)
        path.write_bytes(buffer.getvalue())
        return
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    try:
        with tmp.open("wb") as f:
            write(f)
            f.flush()
            os.fsync(f.fileno())  # the bytes are on disk before the name points at them
        tmp.replace(path)
    finally:
        tmp.unlink(missing_ok=True)


def _to_numpy_tree(tree: Mapping[str, Any]) -> dict:
    return {
        k: _to_numpy_tree(v) if isinstance(v, Mapping) else np.asarray(v) for k, v in tree.items()
    }


def save_variables(variables: Mapping[str, Any], path: epath.PathLike) -> None:
    """Write Flax variables as `.msgpack` (flax.serialization) or `.npz` with "/"-joined keys."""
    path = epath.Path(path)
    if path.suffix == ".msgpack":
        from flax import serialization

        data = serialization.msgpack_serialize(_to_numpy_tree(variables))
        write_atomically(path, lambda f: f.write(data))
    elif path.suffix == ".npz":
        arrays = {"/".join(p): np.asarray(v) for p, v in layout.flatten(variables)}
        write_atomically(path, lambda f: np.savez(f, **arrays))
    else:
        raise ConversionError(f"Cannot write Flax variables to {path}: use .msgpack or .npz.")


def save_state_dict(state_dict: Mapping[str, np.ndarray], path: epath.PathLike) -> None:
    """Write a PyTorch state dict as `.pth`/`.pt` (needs torch) or `.npz`."""
    path = epath.Path(path)
    if path.suffix in TORCH_SUFFIXES:
        torch = import_torch()
        tensors = {k: torch.from_numpy(np.array(v)) for k, v in state_dict.items()}
        write_atomically(path, lambda f: torch.save(tensors, f))
    elif path.suffix == ".npz":
        write_atomically(path, lambda f: np.savez(f, **state_dict))
    else:
        raise ConversionError(
            f"Cannot write a PyTorch state dict to {path}: use .pth, .pt or .npz."
        )
