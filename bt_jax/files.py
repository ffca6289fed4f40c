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


def configure_object_storage_clients() -> None:
    """Environment for the storage clients, set by the command lines before they load: every
    process of a pod reads what the others wrote, so no client may answer from a stale cache.

    TensorFlow's GCS client (epath's default backend, TensorBoard) caches each object's size for
    5 s and would read another host's rewrite truncated to the old size; gcsfs (epath with
    ``EPATH_USE_TF=false``) caches directory listings and would miss new objects.
    """
    os.environ.setdefault("GCS_STAT_CACHE_MAX_AGE", "0")
    os.environ.setdefault("FSSPEC_GCS_USE_LISTINGS_CACHE", "false")


# Also on import (a user's own setting wins): library users that never run a command line.
configure_object_storage_clients()


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
            "was edited by hand. Restore it, or delete it to let bt_jax write a new one."
        ) from None


def check_usable(path: epath.PathLike, *, what: str) -> epath.Path:
    """``path`` as an epath.Path (absolute if local), or StorageError when its filesystem is
    not installed or its bucket does not exist.

    A scheme with no installed filesystem (``s3://`` without s3fs) would otherwise fail at the
    first write, after compiling.
    """
    try:
        path = epath.Path(path)
        if is_remote(path):
            # The bucket first: a missing one is a clear error here, where a write into it
            # could retry for minutes.
            scheme, rest = os.fspath(path).split("://", 1)
            bucket = epath.Path(f"{scheme}://{rest.split('/', 1)[0]}")
            if not bucket.exists():
                raise StorageError(
                    f"{what} {os.fspath(path)!r}: the bucket {os.fspath(bucket)} does not exist "
                    "or is not visible with these credentials. Create it, or check its name and "
                    "the credentials (gcloud auth application-default login)."
                )
        path.exists()
    except StorageError:
        raise
    except Exception as error:  # noqa: BLE001 - TensorFlow and fsspec raise their own types
        scheme = os.fspath(path).split("://", 1)[0] if is_remote(path) else "file"
        no_filesystem = (
            isinstance(error, (ImportError, NotImplementedError, KeyError))
            or "Unimplemented" in type(error).__name__
        )
        if no_filesystem:
            raise StorageError(
                f"{what} {os.fspath(path)!r}: no filesystem for '{scheme}://' is installed. For "
                "gs:// TensorFlow or gcsfs serves it; for other schemes install the fsspec "
                "package that does (e.g. s3fs)."
            ) from None
        reason = getattr(error, "strerror", None) or getattr(error, "message", None) or error
        raise StorageError(
            f"{what} {os.fspath(path)!r} cannot be reached: {reason}. Check the "
            "bucket's name, your credentials and the network."
        ) from None
    # Absolute on a local disk: orbax refuses relative checkpoint paths, and a relative path
    # would change meaning with the working directory.
    return path if is_remote(path) else path.absolute()


def check_directory(path: epath.PathLike, *, what: str) -> epath.Path:
    """``path`` usable as a directory, checked without writing anything: reachable
    (:func:`check_usable`), not a file, and on a local disk not under one. StorageError naming
    the path otherwise."""
    path = check_usable(path, what=what)
    if path.exists() and not path.is_dir():
        raise StorageError(
            f"{what} {path} is a file, not a directory. Pass a directory "
            "(it is created if missing)."
        )
    if not is_remote(path):
        ancestor = path.parent
        while not ancestor.exists():  # ends at the root at the latest
            ancestor = ancestor.parent
        if not ancestor.is_dir():
            raise StorageError(
                f"{what} {path} cannot be created: {ancestor} is a file. Pass a directory path."
            )
    return path


def check_writable_directory(path: epath.Path, *, what: str) -> epath.Path:
    """Creates ``path`` (one that :func:`check_directory` passed) if needed and proves it
    writable with a small probe object, which is removed again; StorageError naming the path
    and what to fix otherwise."""
    try:
        path.mkdir(parents=True, exist_ok=True)
        probe = path / f".bt_jax_write_check_{uuid.uuid4().hex[:8]}"
        probe.write_text("ok")
        probe.unlink()
    except (OSError, PermissionError) as error:
        reason = getattr(error, "strerror", None) or str(error)
        raise StorageError(
            f"{what} {path} is not writable: {reason}. Check the path, its permissions and "
            "the free space, or pass another one."
        ) from None
    return path
