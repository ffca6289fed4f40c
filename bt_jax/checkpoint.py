"""Checkpoints of a pretraining run (orbax) and the exported backbone.

A workdir holds ``config.json`` (the resolved config of the run), ``checkpoints/<step>/`` (orbax,
written to a temporary directory and renamed, so a kill mid-write leaves the previous checkpoint
intact) and, at the end, ``backbone.msgpack``: the backbone's variables and the config fields that
rebuild it, for :func:`load_backbone`.
"""

from __future__ import annotations

import json
import os
from typing import Any

import flax.serialization
import jax
import ml_collections
import orbax.checkpoint as ocp

from bt_jax import models
from bt_jax.config import RESUME_KEYS

CONFIG_FILE = "config.json"
BACKBONE_FILE = "backbone.msgpack"
# The config fields that rebuild a backbone (bt_jax.models.create keyword arguments).
BACKBONE_FIELDS = ("model", "stem", "width", "zero_init_residual")


class IncompatibleCheckpointError(ValueError):
    """The workdir holds a run whose config cannot be resumed by the one given."""


def check_resumable(workdir: str, config: ml_collections.ConfigDict) -> None:
    """Refuses to resume a workdir whose saved config differs in a key that shapes the run."""
    path = os.path.join(workdir, CONFIG_FILE)
    if not os.path.exists(path):
        return
    with open(path) as f:
        saved = json.load(f)
    # Compared as JSON holds them: tuples come back as lists.
    given = json.loads(json.dumps({key: config[key] for key in RESUME_KEYS}))
    different = {key: (saved.get(key), given[key]) for key in RESUME_KEYS
                 if saved.get(key) != given[key]}
    if different:
        details = ", ".join(f"{key}: saved {old!r}, given {new!r}"
                            for key, (old, new) in different.items())
        raise IncompatibleCheckpointError(
            f"The workdir {workdir} holds a run with another config ({details}). Nothing was "
            "overwritten. Use a new --workdir, or the saved values to resume.")


def write_config(workdir: str, config: ml_collections.ConfigDict) -> None:
    if jax.process_index() != 0:
        return
    os.makedirs(workdir, exist_ok=True)
    tmp = os.path.join(workdir, CONFIG_FILE + ".tmp")
    with open(tmp, "w") as f:
        json.dump(config.to_dict(), f, indent=2, sort_keys=True)
    os.replace(tmp, os.path.join(workdir, CONFIG_FILE))


def read_config(workdir: str) -> ml_collections.ConfigDict:
    path = os.path.join(workdir, CONFIG_FILE)
    if not os.path.exists(path):
        raise FileNotFoundError(
            f"{path} does not exist: {workdir} is not a bt_jax run directory. Pass the --workdir "
            "of a pretraining run.")
    with open(path) as f:
        return ml_collections.ConfigDict(json.load(f))


def checkpoint_manager(workdir: str, config: ml_collections.ConfigDict) -> ocp.CheckpointManager:
    """Keeps the last ``config.keep_checkpoints``; saving is synchronous so a save is complete
    (and renamed into place) before training goes on, which exact resume after SIGKILL needs."""
    options = ocp.CheckpointManagerOptions(
        max_to_keep=config.keep_checkpoints,
        create=True,
        enable_async_checkpointing=False,
        cleanup_tmp_directories=True,
    )
    return ocp.CheckpointManager(os.path.join(os.path.abspath(workdir), "checkpoints"),
                                 options=options)


def save(manager: ocp.CheckpointManager, step: int, state: Any) -> None:
    manager.save(step, args=ocp.args.StandardSave(state), force=True)
    manager.wait_until_finished()


def restore(manager: ocp.CheckpointManager, target: Any, step: int | None = None) -> Any:
    """Restores the given step (default the latest) into the structure and shardings of target."""
    step = manager.latest_step() if step is None else step
    abstract = jax.tree.map(ocp.utils.to_shape_dtype_struct, target)
    return manager.restore(step, args=ocp.args.StandardRestore(abstract))


def export_backbone(path: str, config: ml_collections.ConfigDict, variables: dict) -> None:
    """Writes the backbone's variables ({"params", "batch_stats"}) and how to rebuild it."""
    if jax.process_index() != 0:
        return
    payload = {
        "config": json.dumps({key: config[key] for key in BACKBONE_FIELDS}),
        "variables": jax.device_get(variables),
    }
    tmp = path + ".tmp"
    with open(tmp, "wb") as f:
        f.write(flax.serialization.msgpack_serialize(payload))
    os.replace(tmp, path)


def load_backbone(path: str, **overrides: Any) -> tuple[Any, dict]:
    """A pretrained backbone for downstream use: ``(module, variables)``.

    ``path`` is a ``backbone.msgpack`` (or a workdir containing one). ``overrides`` change module
    fields that do not affect the variables, e.g. ``dtype="bfloat16"`` or ``axis_name="batch"``.

        module, variables = bt_jax.load_backbone("runs/default")
        features = module.apply(variables, images, train=False)   # [B, F]
    """
    if os.path.isdir(path):
        path = os.path.join(path, BACKBONE_FILE)
    if not os.path.exists(path):
        raise FileNotFoundError(
            f"No exported backbone at {path}. It is written at the end of `python -m "
            "bt_jax.train`; pass that file or its workdir.")
    with open(path, "rb") as f:
        payload = flax.serialization.msgpack_restore(f.read())
    fields = json.loads(payload["config"])
    module = models.create(fields.pop("model"), **fields, **overrides)
    return module, payload["variables"]
