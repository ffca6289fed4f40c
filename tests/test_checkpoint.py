"""bt_jax.checkpoint's writer: small replicated arrays written whole (no per-device slicing
programs at a save), and checkpoints written by orbax's standard handler (bt_jax before it)
still restore."""

import logging

import jax
import jax.numpy as jnp
import numpy as np
import orbax.checkpoint as ocp
from train_helpers import assert_bit_identical

from bt_jax import checkpoint, parallel

IDENTITY = {"batch_size": 32}


def replicated_state(small_shape, large_shape):
    mesh = parallel.device_mesh()
    state = {
        "small": jnp.arange(np.prod(small_shape), dtype=jnp.float32).reshape(small_shape),
        "large": jnp.ones(large_shape, jnp.float32),
        "step": jnp.zeros((), jnp.int32),
    }
    return parallel.replicate(state, mesh)


def test_small_arrays_are_written_whole_and_large_ones_by_every_replica(tmp_path, caplog):
    # Shapes no other test uses: nothing of theirs is compiled in this process yet. 8 devices:
    # the large array's slice per replica is 1.25 MiB, over the 1 MiB bound.
    small_shape, large_shape = (8, 5, 7), (8, 5 * 2**16 + 1)
    assert jax.device_count() == 8
    state = replicated_state(small_shape, large_shape)
    manager = checkpoint.open_manager(tmp_path, keep=2)
    jax.config.update("jax_log_compiles", True)
    try:
        with caplog.at_level(logging.DEBUG):
            checkpoint.save(manager, 1, state, IDENTITY)
            manager.wait_until_finished()
    finally:
        jax.config.update("jax_log_compiles", False)
    compiled = [r.getMessage() for r in caplog.records if r.getMessage().startswith("Compiling")]
    assert not [m for m in compiled if "float32[8,5,7]" in m], compiled
    assert [m for m in compiled if "slice" in m and "float32[8," in m], compiled
    restored, step = checkpoint.restore(manager, state, identity=IDENTITY)
    manager.close()
    assert step == 1
    assert_bit_identical(restored, state)


def test_a_checkpoint_written_by_orbax_standard_handler_restores(tmp_path):
    state = replicated_state((4, 3), (2, 6))
    # As bt_jax wrote checkpoints before its own writer: StandardSave, the default registry.
    registry = ocp.handlers.DefaultCheckpointHandlerRegistry()
    registry.add(checkpoint.STATE, ocp.args.StandardSave, ocp.StandardCheckpointHandler)
    registry.add(checkpoint.RUN, ocp.args.JsonSave, ocp.JsonCheckpointHandler)
    with ocp.CheckpointManager(
        checkpoint.directory(tmp_path), handler_registry=registry
    ) as old_manager:
        old_manager.save(
            3,
            args=ocp.args.Composite(
                **{
                    checkpoint.STATE: ocp.args.StandardSave(state),
                    checkpoint.RUN: ocp.args.JsonSave(IDENTITY),
                }
            ),
        )
    manager = checkpoint.open_manager(tmp_path, keep=2)
    target = jax.tree.map(jnp.zeros_like, state)
    restored, step = checkpoint.restore(manager, target, identity=IDENTITY)
    assert step == 3
    assert_bit_identical(restored, state)
    # ... and the run goes on in the same directory with the new writer.
    checkpoint.save(manager, 4, restored, IDENTITY)
    manager.wait_until_finished()
    assert manager.all_steps() == [3, 4]
    manager.close()
