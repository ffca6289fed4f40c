"""Writing a run's files on a local disk or on object storage (``gs://``) alike, via etils.epath.

On a local disk a file is written to a temporary name and renamed over the target, so a reader
(or a run killed mid-write) never sees half a file. On object storage a single-object write is
already atomic, and there is no rename: the object is written directly. Neither has an append:
growing logs are written as new objects (``bt_jax.metric_logging``).
"""

from __future__ import annotations

import json
import os
import uuid
from typing import Any

from etils import epath

from bt_jax import errors


class StorageError(errors.Error):
    """A path that cannot be used: unknown scheme, unreachable bucket, not writable."""


def is_remote(path: epath.PathLike) -> bool:
    """Whether ``path`` is on object storage (``gs://``, ``s3://``, ...), not a local disk."""
    return "://" in os.fspath(path)


def write_bytes(path: epath.PathLike, data: bytes) -> None:
    path = epath.Path(path)
    if is_remote(path):
        path.write_bytes(data)
        return
    tmp = path.with_name(f".{path.name}.{uuid.uuid4().hex[:8]}.tmp")
    try:
        tmp.write_bytes(data)
        tmp.replace(path)
    finally:
        if tmp.exists():
            tmp.unlink()


def write_text(path: epath.PathLike, text: str) -> None:
    write_bytes(path, text.encode("utf-8"))


def write_json(path: epath.PathLike, payload: Any) -> None:
    write_text(path, json.dumps(payload, indent=2, sort_keys=True) + "\n")


def read_json(path: epath.PathLike) -> Any:
    """The JSON in ``path``; StorageError naming the file when it is truncated or not JSON."""
    path = epath.Path(path)
    text = path.read_text()
    try:
        return json.loads(text)
    except json.JSONDecodeError as error:
        raise StorageError(
            f"{path} is not valid JSON ({error.msg} at line {error.lineno}): it is truncated or "
            "was edited by hand. Restore it, or delete it to let bt_jax write a new one.") from None


def check_usable(path: epath.PathLike, *, what: str) -> epath.Path:
    """``path`` as an epath.Path, or StorageError when its filesystem is not installed.

    A scheme with no installed filesystem (``s3://`` without s3fs) would otherwise fail at the
    first write, after compiling.
    """
    try:
        path = epath.Path(path)
        path.exists()
    except (ImportError, ValueError, NotImplementedError) as error:
        scheme = os.fspath(path).split("://", 1)[0]
        raise StorageError(
            f"{what} {os.fspath(path)!r}: no filesystem for '{scheme}://' is installed "
            f"({error}). For gs:// install gcsfs (pip install gcsfs); for other schemes the "
            "fsspec package that serves them.") from None
    except OSError as error:
        raise StorageError(f"{what} {os.fspath(path)!r} cannot be reached: "
                           f"{error.strerror or error}. Check the bucket's name, your "
                           "credentials and the network.") from None
    return path


def check_writable_directory(path: epath.PathLike, *, what: str) -> epath.Path:
    """Creates ``path`` if needed and proves it writable with a small probe object, which is
    removed again; StorageError naming the path and what to fix otherwise."""
    path = check_usable(path, what=what)
    try:
        if path.exists() and not path.is_dir():
            raise StorageError(f"{what} {path} is a file, not a directory. Pass a directory "
                               "(it is created if missing).")
        path.mkdir(parents=True, exist_ok=True)
        probe = path / f".bt_jax_write_check_{uuid.uuid4().hex[:8]}"
        probe.write_text("ok")
        probe.unlink()
    except StorageError:
        raise
    except (OSError, PermissionError) as error:
        reason = getattr(error, "strerror", None) or str(error)
        raise StorageError(
            f"{what} {path} is not writable: {reason}. Check the path, its permissions and "
            "the free space, or pass another one.") from None
    return path
