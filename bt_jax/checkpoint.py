"""Checkpoints of a pretraining run (orbax) and the exported backbone and model.

``WORKDIR/checkpoints/<step>/`` holds two orbax items: ``state`` (the replicated TrainState) and
``run`` (the run's identity, :func:`bt_jax.config.resume_identity`, so that a resumed run is
checked against the checkpoint itself, not only against ``config.json``). Saves are asynchronous
(orbax writes in the background while the devices go on) and atomic: a step directory appears
only once complete (renamed from a temporary directory on a local disk, a commit marker on
object storage), so a run killed at any moment resumes from its last complete checkpoint.
Restoring tries the latest step first and falls back to earlier ones, saying why.

Runs written before the ``run`` item existed hold one item, ``default``; they still resume and
evaluate (their identity comes from their ``config.json``).

At the end of a run, ``backbone.msgpack`` (backbone variables and the fields that rebuild it,
for :func:`load_backbone`) and ``model.msgpack`` (backbone + projector, :func:`load_model`).
"""

from __future__ import annotations

import json
from collections.abc import Callable
from typing import Any

import flax.serialization
import jax
import numpy as np
import orbax.checkpoint as ocp
from etils import epath

from bt_jax import cli, errors, files, models

CHECKPOINTS = "checkpoints"
UNREADABLE = "checkpoints_unreadable"  # where checkpoints that fail to restore are set aside
BACKBONE_FILE = "backbone.msgpack"
MODEL_FILE = "model.msgpack"
STATE, RUN, LEGACY_STATE = "state", "run", "default"
# The model.* fields that rebuild a backbone (bt_jax.models.create keyword arguments).
BACKBONE_FIELDS = ("name", "stem", "width", "zero_init_residual")
REPLICA_PARALLEL_MIN_BYTES = 2**20  # see _state_writer


class CheckpointError(errors.Error):
    """No checkpoint of the workdir can be used; the message says why and what to do."""


class IncompatibleCheckpointError(CheckpointError):
    """The workdir holds a run whose config cannot be resumed by the one given."""


class NoCheckpointError(CheckpointError):
    """The workdir holds no checkpoint (or not the step asked for)."""


def directory(workdir: epath.PathLike) -> epath.Path:
    """``WORKDIR/checkpoints``, absolute on a local disk (orbax refuses relative paths)."""
    path = epath.Path(workdir)
    return (path if files.is_remote(path) else path.absolute()) / CHECKPOINTS


_HOST_TYPES = (int, float, bytes, np.number, np.ndarray, str)


def _state_writer() -> ocp.PyTreeCheckpointHandler:
    """orbax's handler with one change: replicated arrays under REPLICA_PARALLEL_MIN_BYTES per
    replica are written whole by one replica instead of a slice by each. Slicing takes one eager
    program per array shape and device, compiled in the caller at a process's first save while
    the devices wait (seconds: experiments/benchmarks/checkpoint_save.py), to split writes too
    small to gain from it; larger arrays are still written by every replica (on a pod, by every
    host). The files are orbax's usual ones: StandardRestore reads them, and old ones."""
    default = ocp.type_handlers.get_type_handler(jax.Array)
    arrays = ocp.type_handlers.ArrayHandler(
        min_slice_bytes_for_replica_parallel=REPLICA_PARALLEL_MIN_BYTES,
        # orbax's own array metadata (write shapes), as its default handler writes it.
        array_metadata_store=getattr(default, "_array_metadata_store", None),
    )
    # Every other type (host arrays, scalars) as orbax's default registry handles it.
    others = [(ty, ocp.type_handlers.get_type_handler(ty)) for ty in _HOST_TYPES]
    return ocp.PyTreeCheckpointHandler(
        type_handler_registry=ocp.type_handlers.create_type_handler_registry(
            *others, (jax.Array, arrays)
        )
    )


def _registry(partial: bool = False) -> ocp.handlers.DefaultCheckpointHandlerRegistry:
    registry = ocp.handlers.DefaultCheckpointHandlerRegistry()
    if partial:  # reading some subtrees only, as numpy: PyTree restore arguments
        for item in (STATE, LEGACY_STATE):
            registry.add(item, ocp.args.PyTreeRestore, ocp.PyTreeCheckpointHandler)
    else:
        registry.add(STATE, ocp.args.PyTreeSave, _state_writer())
        for item in (STATE, LEGACY_STATE):
            registry.add(item, ocp.args.StandardRestore, ocp.StandardCheckpointHandler)
    registry.add(RUN, ocp.args.JsonSave, ocp.JsonCheckpointHandler)
    registry.add(RUN, ocp.args.JsonRestore, ocp.JsonCheckpointHandler)
    return registry


def open_manager(workdir: epath.PathLike, *, keep: int) -> ocp.CheckpointManager:
    """The training run's manager: async saves, the latest ``keep`` kept, temporary directories
    of interrupted saves cleaned up."""
    options = ocp.CheckpointManagerOptions(
        preservation_policy=ocp.checkpoint_managers.LatestN(keep),
        create=True,
        cleanup_tmp_directories=True,
        enable_async_checkpointing=True,
    )
    return ocp.CheckpointManager(directory(workdir), options=options, handler_registry=_registry())


def _reader(workdir: epath.PathLike, partial: bool = False) -> ocp.CheckpointManager:
    # Never creates, prunes or cleans anything: a training run may be writing this workdir.
    options = ocp.CheckpointManagerOptions(
        read_only=True, create=False, cleanup_tmp_directories=False
    )
    return ocp.CheckpointManager(
        directory(workdir), options=options, handler_registry=_registry(partial)
    )


def save(manager: ocp.CheckpointManager, step: int, state: Any, identity: dict) -> None:
    """Starts an asynchronous save of ``state`` and the run's identity at ``step``.

    Returns once the arrays are copied off the devices (the state may then be donated to the
    next step); the files are written in the background, the previous save finished first.
    """
    manager.save(
        step,
        args=ocp.args.Composite(
            **{STATE: ocp.args.PyTreeSave(state), RUN: ocp.args.JsonSave(identity)}
        ),
    )


def _items(manager: ocp.CheckpointManager, step: int) -> set[str]:
    path = epath.Path(manager.directory) / str(step)
    return {child.name for child in path.iterdir()} if path.exists() else set()


def _state_item(manager: ocp.CheckpointManager, step: int) -> str:
    return LEGACY_STATE if LEGACY_STATE in _items(manager, step) else STATE


def stored_identity(manager: ocp.CheckpointManager, step: int) -> dict | None:
    """The run identity saved with ``step``; None for checkpoints older than the ``run`` item."""
    if RUN not in _items(manager, step):
        return None
    restored = manager.restore(step, args=ocp.args.Composite(**{RUN: ocp.args.JsonRestore()}))
    return dict(restored[RUN])


def check_identity(saved: dict, given: dict, where: str) -> None:
    """IncompatibleCheckpointError naming every key whose value differs."""
    different = {
        key: (saved.get(key), value)
        for key, value in given.items()
        if key in saved and saved[key] != value
    }
    if different:
        details = ", ".join(
            f"{key}: saved {old!r}, given {new!r}" for key, (old, new) in sorted(different.items())
        )
        raise IncompatibleCheckpointError(
            f"{where} holds a run with another config ({details}). Nothing was overwritten. Use "
            "a new --workdir, or the saved values to resume."
        )


def restore(
    manager: ocp.CheckpointManager,
    target: Any,
    *,
    identity: dict,
    on_unreadable: Callable[[int, str], None] | None = None,
) -> tuple[Any, int | None]:
    """(state, step) from the latest checkpoint that restores, or (target, None) if none exists.

    Checks each checkpoint's stored identity against ``identity`` (IncompatibleCheckpointError,
    never a fallback). A checkpoint that fails to restore (a file missing or truncated) is
    reported in one line through ``on_unreadable(step, why)`` and the previous one is tried;
    CheckpointError when none restores.
    """
    abstract = jax.tree.map(ocp.utils.to_shape_dtype_struct, target)
    failures = []
    for step in sorted(manager.all_steps(), reverse=True):
        try:
            saved = stored_identity(manager, step)
            if saved is not None:
                check_identity(saved, identity, f"The checkpoint {directory_of(manager)}/{step}")
            item = _state_item(manager, step)
            restored = manager.restore(
                step, args=ocp.args.Composite(**{item: ocp.args.StandardRestore(abstract)})
            )
            return restored[item], step
        except IncompatibleCheckpointError:
            raise
        except Exception as error:  # noqa: BLE001 - orbax/tensorstore raise many types
            why = cli.describe(error)
            failures.append(f"step {step}: {why}")
            if on_unreadable is not None:
                on_unreadable(step, why)
    if failures:
        raise CheckpointError(
            f"No checkpoint in {directory_of(manager)} restores ({'; '.join(failures)}). "
            "Nothing was changed. Start again in a new --workdir, or restore the files."
        )
    return target, None


def directory_of(manager: ocp.CheckpointManager) -> str:
    return str(manager.directory)


def set_aside(workdir: epath.PathLike, step: int) -> epath.Path:
    """Moves an unreadable checkpoint out of orbax's directory (nothing is deleted), so that a
    resumed run can save that step again. Process 0 only; returns where it went."""
    destination = epath.Path(workdir) / UNREADABLE / str(step)
    if jax.process_index() == 0:
        destination.parent.mkdir(parents=True, exist_ok=True)
        if destination.exists():
            destination.rmtree()
        (directory(workdir) / str(step)).rename(destination)
    return destination


# ---------------------------------------------------------------------------------------------
# Reading a run for evaluation: steps, variables, never writing anything.


def steps(workdir: epath.PathLike) -> list[int]:
    """The steps of the complete checkpoints in ``workdir`` (sorted; [] if none)."""
    if not directory(workdir).exists():
        return []
    manager = _reader(workdir)
    try:
        return sorted(int(step) for step in manager.all_steps())
    finally:
        manager.close()


def read_variables(workdir: epath.PathLike, step: int, part: str | None = "backbone") -> dict:
    """{"params", "batch_stats"} at checkpoint ``step`` as numpy: of the backbone
    (``part="backbone"``), the projector, or the whole model (``part=None``).

    Only those subtrees are read, whatever else the state held (optimiser, probe, fields of
    older versions), and whatever devices it was saved from. CheckpointError if unreadable.
    """
    manager = _reader(workdir, partial=True)
    where = f"{directory(workdir)}/{step}"
    try:
        item = _state_item(manager, step)
        metadata = manager.item_metadata(step)[item]
        try:
            wanted = {
                key: (metadata[key] if part is None else {part: metadata[key][part]})
                for key in ("params", "batch_stats")
            }
        except (KeyError, TypeError):
            raise CheckpointError(
                f"The checkpoint {where} holds no params/{part} and batch_stats/{part}: it is "
                "not a bt_jax pretraining checkpoint."
            ) from None
        restore_args = jax.tree.map(lambda _: ocp.RestoreArgs(restore_type=np.ndarray), wanted)
        restored = manager.restore(
            step,
            args=ocp.args.Composite(
                **{
                    item: ocp.args.PyTreeRestore(
                        item=wanted, restore_args=restore_args, partial_restore=True
                    )
                }
            ),
        )[item]
    except CheckpointError:
        raise
    except Exception as error:  # noqa: BLE001 - orbax/tensorstore raise many types
        raise CheckpointError(
            f"The checkpoint {where} cannot be read: {cli.describe(error)}"
        ) from None
    finally:
        manager.close()
    restored = plain(restored)
    if part is None:
        return restored
    return {key: restored[key][part] for key in ("params", "batch_stats")}


def plain(tree: Any) -> Any:
    """Nested dicts all the way down (FrozenDicts and orbax mappings included)."""
    if hasattr(tree, "items"):
        return {key: plain(value) for key, value in tree.items()}
    return tree


def check_finite(variables: Any, where: str) -> None:
    """CheckpointError naming the first non-finite array: a diverged run cannot be evaluated."""
    flat = flax.traverse_util.flatten_dict(plain(variables), sep="/")
    bad = [
        key
        for key, value in flat.items()
        if np.issubdtype(np.asarray(value).dtype, np.floating) and not np.all(np.isfinite(value))
    ]
    if bad:
        raise CheckpointError(
            f"{where} holds non-finite values ({len(bad)} arrays, e.g. {bad[0]}): the run "
            "diverged before it was saved. Evaluate an earlier checkpoint (--step) instead."
        )


# ---------------------------------------------------------------------------------------------
# Exported weights for downstream use.


def _export(path: epath.Path, fields: dict, variables: dict) -> None:
    payload = {"config": json.dumps(fields), "variables": jax.device_get(variables)}
    files.write_bytes(path, flax.serialization.msgpack_serialize(payload))


def export(workdir: epath.PathLike, model_config: Any, variables: dict) -> None:
    """Writes ``backbone.msgpack`` and ``model.msgpack`` (process 0 only).

    variables: {"params", "batch_stats"} of the whole model ({"backbone", "projector"} each).
    """
    if jax.process_index() != 0:
        return
    backbone_fields = {key: model_config[key] for key in BACKBONE_FIELDS}
    _export(
        epath.Path(workdir) / BACKBONE_FILE,
        backbone_fields,
        {key: variables[key]["backbone"] for key in ("params", "batch_stats")},
    )
    _export(
        epath.Path(workdir) / MODEL_FILE,
        {**backbone_fields, "projector": model_config["projector"]},
        variables,
    )


def _read_export(path: epath.PathLike, name: str) -> tuple[dict, dict]:
    path = epath.Path(path)
    if path.is_dir():
        path = path / name
    if not path.exists():
        raise NoCheckpointError(
            f"No exported weights at {path}. They are written at the end of `python -m "
            "bt_jax.train`; pass that file or its workdir."
        )
    try:
        payload = flax.serialization.msgpack_restore(path.read_bytes())
        return json.loads(payload["config"]), plain(payload["variables"])
    except Exception as error:  # noqa: BLE001 - msgpack raises many types for a bad file
        raise CheckpointError(
            f"{path} is not an exported bt_jax model ({cli.describe(error)}). "
            "Export it again with python -m bt_jax.train."
        ) from None


def load_backbone(path: epath.PathLike, **overrides: Any) -> tuple[Any, dict]:
    """A pretrained backbone for downstream use: ``(module, variables)``.

    ``path`` is a ``backbone.msgpack`` (or a workdir containing one). ``overrides`` change module
    fields that do not affect the variables, e.g. ``dtype="bfloat16"`` or ``axis_name="batch"``.

        module, variables = bt_jax.load_backbone("runs/default")
        features = module.apply(variables, images, train=False)   # [B, F]
    """
    fields, variables = _read_export(path, BACKBONE_FILE)
    return models.create(
        fields.pop("name", None) or fields.pop("model"), **fields, **overrides
    ), variables


def load_model(path: epath.PathLike, **overrides: Any) -> tuple[Any, dict]:
    """Backbone + projector of a run: ``(BarlowTwinsModel, variables)``, for continuing
    pretraining or comparing embeddings.

        model, variables = bt_jax.load_model("runs/default")
        representation, embedding = model.apply(variables, images, train=False)
    """
    fields, variables = _read_export(path, MODEL_FILE)
    return models.create_model(**fields, **overrides), variables
