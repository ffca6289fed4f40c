"""The pretraining step: exactness across devices and mappings, failures, config errors."""

import functools
import os
import subprocess
import sys

import flax.jax_utils
import jax
import numpy as np
import pytest
from jax.sharding import PartitionSpec as P

from bt_jax import config as config_lib
from bt_jax import optim
from bt_jax import train
from train_helpers import REPO, restore_params, subprocess_env
from train_helpers import tiny_config


def fake_batches(config, num_steps, seed=0):
    rng = np.random.default_rng(seed)
    shape = (config.batch_size, config.image_size, config.image_size, 3)
    # Labels, some unknown (-1), so the online probe trains in the same step.
    return [{"view_a": rng.normal(size=shape).astype(np.float32),
             "view_b": rng.normal(size=shape).astype(np.float32),
             "label": rng.integers(-1, 10, size=config.batch_size).astype(np.int32)}
            for _ in range(num_steps)]


def run_steps(config, batches, parallelism, devices):
    """Runs train_step over `devices` with the given mapping; returns the final params."""
    model = train.build_model(config)
    tx = optim.create_optimizer(config, steps_per_epoch=10)
    step = functools.partial(train.train_step, model=model, tx=tx, lambd=config.lambd,
                             loss_method=config.loss_method,
                             probe_tx=train.probe_optimizer(config))
    state = jax.jit(functools.partial(train.init_state, config, model, tx, 10))()
    key = jax.random.key(0)
    if parallelism == "shard_map":
        mesh = jax.make_mesh((len(devices),), (train.AXIS,), devices=devices,
                             axis_types=(jax.sharding.AxisType.Auto,))
        step_fn = train.shard_map_step(step, mesh, donate=False)
        state = jax.device_put(state, jax.sharding.NamedSharding(mesh, P()))
        for batch in batches:
            state, metrics = step_fn(state, batch, key)
        return jax.device_get((state.params, state.probe_params)), jax.device_get(metrics)
    step_fn = jax.pmap(step, axis_name=train.AXIS, in_axes=(0, 0, None), devices=devices)
    state = flax.jax_utils.replicate(state, devices)
    for batch in batches:
        local = jax.tree.map(lambda x: x.reshape((len(devices), -1) + x.shape[1:]), batch)
        state, metrics = step_fn(state, local, key)
    return jax.device_get(jax.tree.map(lambda x: x[0], (state.params, state.probe_params))), \
        jax.device_get(jax.tree.map(lambda x: x[0], metrics))


def assert_trees_close(got, want, rtol=1e-5):
    assert jax.tree.structure(got) == jax.tree.structure(want)
    for (path, g), w in zip(jax.tree_util.tree_leaves_with_path(got), jax.tree.leaves(want)):
        scale = float(np.max(np.abs(w))) or 1.0
        np.testing.assert_allclose(g, w, rtol=rtol, atol=rtol * scale, err_msg=str(path))


def test_eight_devices_equal_one_device_and_pmap_equals_shard_map():
    config = tiny_config()
    batches = fake_batches(config, 3)
    devices = jax.devices()
    one, one_metrics = run_steps(config, batches, "shard_map", devices[:1])
    eight, eight_metrics = run_steps(config, batches, "shard_map", devices)
    pmapped, pmap_metrics = run_steps(config, batches, "pmap", devices)
    # The update is exactly the single-device update on the global batch (sync BN, all-gathered
    # loss, pmean of gradients), up to float32 summation order.
    assert_trees_close(eight, one)
    assert_trees_close(eight_metrics, one_metrics)
    assert_trees_close(pmapped, eight)
    assert_trees_close(pmap_metrics, eight_metrics)
    assert set(eight_metrics) == {"loss", "invariance", "redundancy", "probe_loss",
                                  "probe_train_accuracy"}
    # The parameters did move: the comparison is not between initial states.
    initial = jax.device_get(jax.jit(functools.partial(
        train.init_state, config, train.build_model(config),
        optim.create_optimizer(config, steps_per_epoch=10)))().params)
    moved = [float(np.max(np.abs(a - b))) for a, b in
             zip(jax.tree.leaves(eight[0]), jax.tree.leaves(initial))]
    assert max(moved) > 1e-4


def test_non_finite_loss_stops_and_keeps_the_last_good_checkpoint(tmp_path):
    workdir = str(tmp_path / "nan")
    # An absurd learning rate blows the parameters up within a few steps.
    config = tiny_config(max_steps=20, num_epochs=4, warmup_epochs=0, checkpoint_every_steps=1,
                         log_every_steps=1, learning_rate_weights=1e30,
                         learning_rate_biases=1e30)
    with pytest.raises(train.NonFiniteLossError, match=r"step \d+") as error:
        train.train_and_evaluate(config, workdir)
    message = str(error.value)
    params, step = restore_params(workdir)
    assert f"checkpoint (step {step})" in message
    assert all(np.all(np.isfinite(x)) for x in jax.tree.leaves(params))


@pytest.mark.parametrize("overrides, match", [
    ({"batch_size": 36}, "batch_size=36.*8 devices"),
    ({"model": "resnet7"}, "model='resnet7'.*resnet18"),
    ({"projector": "512-x"}, "projector"),
    ({"loss_method": "fast"}, "loss_method"),
    ({"warmup_epochs": 5}, "warmup_epochs"),
])
def test_config_errors_name_the_key(overrides, match, tmp_path):
    with pytest.raises(config_lib.ConfigError, match=match):
        train.train_and_evaluate(tiny_config(**overrides), str(tmp_path))
    assert not os.path.exists(os.path.join(tmp_path, "checkpoints"))


def test_unknown_key_and_unknown_dataset(tmp_path):
    config = tiny_config()
    config.batchsize = 64  # A typo of batch_size: must not be silently ignored.
    with pytest.raises(config_lib.ConfigError, match="batchsize"):
        train.train_and_evaluate(config, str(tmp_path))
    with pytest.raises(ValueError, match="no_such_dataset"):
        train.train_and_evaluate(tiny_config(dataset="no_such_dataset"), str(tmp_path))


def test_cli_reports_config_errors_without_a_traceback(tmp_path):
    result = subprocess.run(
        [sys.executable, "-m", "bt_jax.train", f"--workdir={tmp_path}", "--config.batch_size=36"],
        cwd=REPO, env=subprocess_env(8), capture_output=True, text=True, timeout=120)
    assert result.returncode != 0
    assert "config.batch_size=36" in result.stderr
    assert "Traceback" not in result.stderr
