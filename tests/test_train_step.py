"""The pretraining step: exact across devices and mappings, boundary checks, the C picture."""

import functools

import chex
import jax
import numpy as np
import pytest
from train_helpers import step_0_state, steps_per_epoch, tiny_config

from bt_jax import parallel, probe
from bt_jax import state as state_lib
from bt_jax import step as step_lib
from bt_jax.data import photometric


def fake_batches(config, num_steps, seed=0):
    """uint8 views as the pipeline gives them, labels with some unknown (-1) for the probe."""
    rng = np.random.default_rng(seed)
    size, n = config.data.image_size, config.batch_size
    return [
        {
            "view_a": rng.integers(0, 256, (n, size, size, 3), dtype=np.uint8),
            "view_b": rng.integers(0, 256, (n, size, size, 3), dtype=np.uint8),
            "label": rng.integers(-1, 10, n).astype(np.int32),
            "index": np.arange(n, dtype=np.int32),
            "epoch": np.zeros(n, np.int32),
        }
        for _ in range(num_steps)
    ]


def finish_views(config):
    return functools.partial(
        photometric.finish_views, seed=config.seed, views=None, photometric="host"
    )


def step_function(config, model, tx):
    return functools.partial(
        step_lib.train_step,
        model=model,
        tx=tx,
        probe_tx=probe.optimizer(config.probe),
        loss_options=dict(config.loss),
        finish_views=finish_views(config),
    )


def run_steps(config, batches, parallelism, devices):
    """Steps over ``devices`` with the given mapping; (params, probe params), last metrics."""
    mesh = parallel.device_mesh(devices)
    model = state_lib.build_model(config)
    tx = state_lib.build_optimizer(config, steps_per_epoch(config))
    state = step_0_state(config, model, tx, mesh)
    step_fn = parallel.map_step(step_function(config, model, tx), mesh, parallelism)
    key = jax.random.key(0)
    for batch in batches:
        state, metrics = step_fn(state, parallel.global_batch(batch, mesh), key)
    return parallel.to_host((state.params, state.probe_params)), parallel.to_host(metrics)


def test_eight_devices_equal_one_device_and_pmap_equals_shard_map():
    config = tiny_config()
    batches = fake_batches(config, 3)
    devices = jax.devices()
    one, one_metrics = run_steps(config, batches, "shard_map", devices[:1])
    eight, eight_metrics = run_steps(config, batches, "shard_map", devices)
    pmapped, pmap_metrics = run_steps(config, batches, "pmap", devices)
    # The update is exactly the single-device update on the global batch (sync BN, all-gathered
    # loss, pmean of gradients), up to float32 summation order.
    chex.assert_trees_all_close(eight, one, rtol=1e-5, atol=1e-6)
    chex.assert_trees_all_close(eight_metrics, one_metrics, rtol=1e-5, atol=1e-6)
    chex.assert_trees_all_close(pmapped, eight, rtol=1e-5, atol=1e-6)
    chex.assert_trees_all_close(pmap_metrics, eight_metrics, rtol=1e-5, atol=1e-6)
    assert set(eight_metrics) == {
        "loss",
        "invariance",
        "redundancy",
        "probe_loss",
        "probe_train_accuracy",
    }
    # The parameters did move: the comparison is not between initial states.
    initial = jax.device_get(
        state_lib.run_once(
            functools.partial(
                state_lib.init_state,
                config,
                state_lib.build_model(config),
                state_lib.build_optimizer(config, steps_per_epoch(config)),
            )
        ).params
    )
    moved = [
        float(np.max(np.abs(a - b)))
        for a, b in zip(jax.tree.leaves(eight[0]), jax.tree.leaves(initial))
    ]
    assert max(moved) > 1e-4


def test_a_batch_with_the_wrong_layout_fails_at_the_step_boundary_by_name():
    config = tiny_config(batch_size=8)
    batch = fake_batches(config, 1)[0]
    batch["view_b"] = batch["view_b"][:, :8]  # a crop of another size
    with pytest.raises(AssertionError, match="equal_shape"):
        run_steps(config, [batch], "shard_map", jax.devices()[:1])
    batch = fake_batches(config, 1)[0]
    batch["label"] = batch["label"][:, None]  # [n, 1] labels
    with pytest.raises(AssertionError, match="shape"):
        run_steps(config, [batch], "shard_map", jax.devices()[:1])


def test_correlation_block_is_replicated_and_is_c():
    config = tiny_config(batch_size=32)
    mesh = parallel.device_mesh()
    model = state_lib.build_model(config)
    tx = state_lib.build_optimizer(config, steps_per_epoch(config))
    state = step_0_state(config, model, tx, mesh)
    batch = fake_batches(config, 1)[0]
    batch["view_b"] = batch["view_a"]  # identical views: C's diagonal is 1
    correlation = parallel.map_step(
        functools.partial(
            step_lib.correlation_block, model=model, size=8, finish_views=finish_views(config)
        ),
        mesh,
        donate=False,
    )
    _, block = correlation(state, parallel.global_batch(batch, mesh), jax.random.key(0))
    block = parallel.to_host(block)
    assert block.shape == (8, 8)
    np.testing.assert_allclose(np.diag(block), 1.0, atol=1e-3)
    assert np.all(np.abs(block) <= 1 + 1e-5)
