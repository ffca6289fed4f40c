"""A run's workdir: its config and the history of its starts, and a lease against two writers.

    WORKDIR/config.json                    the config of the latest start (what evaluation reads)
    WORKDIR/config_history/0000-step0.json the config of every start, never overwritten
    WORKDIR/lock.json                      the lease of the run writing this workdir

The lease holds its owner (host, pid, a run id) and a heartbeat, renewed every
:data:`HEARTBEAT_SECONDS` by a background thread. A second run refuses the workdir while the
lease is fresh; a lease whose owner is a dead process on this host, or whose heartbeat is older
than :data:`STALE_SECONDS`, is taken over. On object storage there is no atomic
create-if-absent through etils.epath, so the lease is best effort there: written, then read back
after a pause to detect a run that started at the same moment.
"""

from __future__ import annotations

import os
import socket
import threading
import time
import uuid
from typing import Any

import jax
import ml_collections
from etils import epath

from bt_jax import checkpoint, files, saved_config
from bt_jax import config as config_lib

CONFIG_FILE = "config.json"
HISTORY_DIR = "config_history"
LOCK_FILE = "lock.json"
HEARTBEAT_SECONDS = 15.0
STALE_SECONDS = 120.0


class WorkdirInUseError(config_lib.ConfigError):
    """Another live run holds the workdir's lease."""


def read_config(workdir: epath.PathLike) -> ml_collections.ConfigDict:
    """The run's config (either layout, mapped onto today's groups)."""
    path = epath.Path(workdir) / CONFIG_FILE
    if not path.exists():
        raise checkpoint.NoCheckpointError(
            f"{path} does not exist: {workdir} is not a bt_jax run directory. Pass the --workdir "
            "of a pretraining run."
        )
    return saved_config.from_saved(files.read_json(path), where=str(path))


def check_resumable(workdir: epath.PathLike, config: ml_collections.ConfigDict) -> None:
    """Refuses a workdir whose saved config differs in a key that shapes the run.

    Reads ``config.json`` if there is one; the checkpoints carry the identity too and are
    checked when restored, so deleting ``config.json`` cannot make a changed run resume.
    """
    path = epath.Path(workdir) / CONFIG_FILE
    if path.exists():
        saved = config_lib.resume_identity(read_config(workdir))
        checkpoint.check_identity(
            saved, config_lib.resume_identity(config), f"The workdir {workdir}"
        )


def record_start(
    workdir: epath.PathLike, config: ml_collections.ConfigDict, start_step: int
) -> None:
    """Writes the config as ``config.json`` and as a new entry of ``config_history/`` (process
    0 only): a resume keeps the record of what earlier steps ran with."""
    if jax.process_index() != 0:
        return
    workdir = epath.Path(workdir)
    history = workdir / HISTORY_DIR
    history.mkdir(parents=True, exist_ok=True)
    number = len([p for p in history.glob("*.json")])
    payload = config.to_dict()
    files.write_json(history / f"{number:04d}-step{start_step}.json", payload)
    files.write_json(workdir / CONFIG_FILE, payload)


def history(workdir: epath.PathLike) -> list[tuple[int, dict]]:
    """(start step, config dict) of every start of the run, oldest first."""
    entries = sorted((epath.Path(workdir) / HISTORY_DIR).glob("*.json"))
    return [(int(p.stem.split("-step")[1]), files.read_json(p)) for p in entries]


# ---------------------------------------------------------------------------------------------
# The lease.


def _alive_here(owner: dict) -> bool | None:
    """Whether the owner process lives, if it ran on this host; None when it cannot be known."""
    if owner.get("host") != socket.gethostname():
        return None
    try:
        os.kill(int(owner["pid"]), 0)
    except ProcessLookupError:
        return False
    except (PermissionError, KeyError, ValueError, TypeError):
        return None
    return True


def check(workdir: epath.PathLike, config: ml_collections.ConfigDict) -> epath.Path:
    """Every check of the workdir that writes nothing: a usable directory
    (:func:`bt_jax.files.check_directory`), its checkpoints folder not a file, resumable by
    ``config``, not in use by another run. Returns it as :func:`bt_jax.files.check_usable`."""
    workdir = files.check_directory(workdir, what="The workdir")
    checkpoints = checkpoint.directory(workdir)
    if checkpoints.exists() and not checkpoints.is_dir():
        raise files.StorageError(
            f"{checkpoints} is a file; bt_jax keeps its checkpoints in that folder. Move the "
            "file away or use another --workdir."
        )
    check_resumable(workdir, config)
    Lease(workdir).check()
    return workdir


class Lease:
    """The right to write a workdir, held by process 0 of one run at a time."""

    def __init__(self, workdir: epath.PathLike):
        self.path = epath.Path(workdir) / LOCK_FILE
        self.owner = {
            "host": socket.gethostname(),
            "pid": os.getpid(),
            "run": uuid.uuid4().hex[:12],
        }
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def holder(self) -> dict | None:
        """The live lease of another run, or None if the workdir is free (or the lease stale)."""
        if not self.path.exists():
            return None
        try:
            lease = files.read_json(self.path)
            owner, heartbeat = lease["owner"], float(lease["heartbeat"])
        except Exception:  # noqa: BLE001 - a half-written or foreign lock file is stale
            return None
        if owner.get("run") == self.owner["run"]:
            return None
        alive = _alive_here(owner)
        if alive is False or (alive is None and time.time() - heartbeat > STALE_SECONDS):
            return None
        return {**owner, "age": time.time() - heartbeat}

    def check(self) -> None:
        """WorkdirInUseError when another live run holds the lease (reads only)."""
        holder = self.holder()
        if holder is not None:
            raise WorkdirInUseError(
                f"The workdir {self.path.parent} is in use by another run (host "
                f"{holder['host']}, pid {holder['pid']}, heartbeat {holder['age']:.0f} s ago): "
                "two runs writing one workdir would corrupt it. If that run is dead, delete "
                f"{self.path} (or wait {STALE_SECONDS:.0f} s after its last heartbeat)."
            )

    def acquire(self) -> None:
        """Takes the lease and starts the heartbeat; WorkdirInUseError if another run holds it."""
        self.check()
        self._write()
        if files.is_remote(self.path):
            time.sleep(1.0)  # A run that started at the same moment wrote last: it wins.
            self.check()
        self._thread = threading.Thread(target=self._beat, name="bt_jax-lease", daemon=True)
        self._thread.start()

    def _write(self) -> None:
        files.write_json(self.path, {"owner": self.owner, "heartbeat": time.time()})

    def _beat(self) -> None:
        while not self._stop.wait(HEARTBEAT_SECONDS):
            try:
                self._write()
            except Exception:  # noqa: BLE001 - a missed heartbeat only ages the lease
                pass

    def release(self) -> None:
        """Stops the heartbeat and removes the lease if it is still ours."""
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=5)
        try:
            lease: Any = files.read_json(self.path) if self.path.exists() else None
            if lease and lease.get("owner", {}).get("run") == self.owner["run"]:
                self.path.unlink()
        except Exception:  # noqa: BLE001 - a stale lease is taken over by the next run anyway
            pass
