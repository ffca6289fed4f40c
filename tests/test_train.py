"""The pretraining step and loop: exactness across devices, determinism, resume, failures."""

import functools
import json
import os
import signal
import subprocess
import sys
import time

import flax.jax_utils
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import PartitionSpec as P

import bt_jax
from bt_jax import checkpoint
from bt_jax import config as config_lib
from bt_jax import optim
from bt_jax import train

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def tiny_config(**overrides):
    """A config that compiles and steps in seconds on the CPU."""
    config = config_lib.get_config()
    config.update(dict(
        batch_size=256, image_size=16, eval_resize=16, width=4, projector="32-32",
        num_epochs=2, warmup_epochs=1, max_steps=4, log_every_steps=2,
        checkpoint_every_steps=2, correlation_image_dims=16))
    config.update(overrides)
    return config


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


def restore_params(workdir, step=None):
    config = checkpoint.read_config(workdir)
    manager = checkpoint.checkpoint_manager(workdir, config)
    model = train.build_model(config)
    tx = optim.create_optimizer(config, steps_per_epoch=5)
    target = jax.jit(functools.partial(train.init_state, config, model, tx, 10))()
    state = checkpoint.restore(manager, target, step)
    manager.close()
    return jax.device_get(state.params), int(state.step)


def assert_bit_identical(a, b):
    for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b)):
        np.testing.assert_array_equal(x, y)


@pytest.fixture(scope="module")
def reference_run(tmp_path_factory):
    """An uninterrupted run of 6 steps over 8 devices, in this process."""
    workdir = str(tmp_path_factory.mktemp("reference"))
    state = train.train_and_evaluate(tiny_config(max_steps=6), workdir)
    return workdir, jax.device_get(state.params)


def test_same_seed_gives_bit_identical_parameters(reference_run, tmp_path):
    _, params = reference_run
    again = train.train_and_evaluate(tiny_config(max_steps=6), str(tmp_path / "again"))
    assert_bit_identical(jax.device_get(again.params), params)
    other = train.train_and_evaluate(tiny_config(max_steps=2, seed=1), str(tmp_path / "other"))
    first_leaf = lambda p: jax.tree.leaves(p)[0]  # noqa: E731
    assert not np.array_equal(first_leaf(jax.device_get(other.params)), first_leaf(params))


def test_run_writes_logs_checkpoints_and_a_loadable_backbone(reference_run):
    workdir, params = reference_run
    lines = open(os.path.join(workdir, "metrics.jsonl")).read().splitlines()
    assert len(lines) >= 3
    record = json.loads(lines[-1])
    for key in ("loss", "invariance", "redundancy", "lr_weights", "lr_biases",
                "images_per_second", "data_wait_seconds"):
        assert np.isfinite(record[key]), key
    assert record["step"] == 6
    for key in ("probe_loss", "probe_train_accuracy"):
        assert 0 <= record[key] < 10, key
    # 1500 digits / 256 = 5 steps an epoch: the epoch's end logged the probe's test accuracy.
    records = [json.loads(line) for line in lines]
    epoch_end = [r for r in records if "probe_test_accuracy" in r]
    assert [r["step"] for r in epoch_end] == [5]
    assert 0.0 <= epoch_end[0]["probe_test_accuracy"] <= 1.0
    assert sorted(os.listdir(os.path.join(workdir, "checkpoints"))) == ["4", "6"]  # keep 2
    assert any(f.startswith("events.out.tfevents") for f in os.listdir(workdir))
    module, variables = bt_jax.load_backbone(workdir)
    assert_bit_identical(variables["params"], params["backbone"])
    features = module.apply(variables, jnp.zeros((2, 16, 16, 3)), train=False)
    assert features.shape == (2, 32)  # 8 * width, width 4


def trainer_command(workdir, **overrides):
    args = [sys.executable, "-m", "bt_jax.train", f"--workdir={workdir}"]
    defaults = config_lib.get_config()
    for key, value in tiny_config(**overrides).items():
        if value != defaults[key]:
            args.append(f"--config.{key}={value}")
    return args


def subprocess_env(device_count=8):
    env = dict(os.environ)
    env["XLA_FLAGS"] = f"--xla_force_host_platform_device_count={device_count}"
    env["JAX_PLATFORMS"] = "cpu"
    env["TF_CPP_MIN_LOG_LEVEL"] = "2"
    return env


def test_sigkill_and_resume_is_bit_identical(reference_run, tmp_path):
    reference_dir, reference_params = reference_run
    workdir = str(tmp_path / "killed")
    command = trainer_command(workdir, max_steps=6, checkpoint_every_steps=1)
    process = subprocess.Popen(command, cwd=REPO, env=subprocess_env(),
                               stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    checkpoints = os.path.join(workdir, "checkpoints")
    deadline = time.time() + 300
    while time.time() < deadline and process.poll() is None:
        if os.path.isdir(os.path.join(checkpoints, "3")):
            break
        time.sleep(0.05)
    assert process.poll() is None, process.stderr.read().decode()[-3000:]
    process.send_signal(signal.SIGKILL)
    process.wait()
    killed_at = max(int(d) for d in os.listdir(checkpoints) if d.isdigit())
    assert 3 <= killed_at < 6
    result = subprocess.run(command, cwd=REPO, env=subprocess_env(), capture_output=True,
                            text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    params, step = restore_params(workdir)
    assert step == 6
    assert_bit_identical(params, reference_params)
    # The resumed run appended to the same log.
    steps = [json.loads(line)["step"] for line in open(os.path.join(workdir, "metrics.jsonl"))]
    assert steps[-1] == 6


def test_sigterm_saves_and_exits_cleanly(tmp_path):
    workdir = str(tmp_path / "preempted")
    command = trainer_command(workdir, max_steps=1000, num_epochs=200,
                              checkpoint_every_steps=1000)
    process = subprocess.Popen(command, cwd=REPO, env=subprocess_env(1),
                               stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    metrics = os.path.join(workdir, "metrics.jsonl")
    deadline = time.time() + 300
    while time.time() < deadline and process.poll() is None:
        if os.path.exists(metrics) and os.path.getsize(metrics) > 0:
            break
        time.sleep(0.05)
    process.send_signal(signal.SIGTERM)
    _, stderr = process.communicate(timeout=120)
    assert process.returncode == 0, stderr[-3000:]
    saved = [int(d) for d in os.listdir(os.path.join(workdir, "checkpoints")) if d.isdigit()]
    assert len(saved) == 1 and 2 <= saved[0] < 1000
    assert "Stopped by a signal" in stderr


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


def test_resuming_with_an_incompatible_config_is_refused(reference_run):
    workdir, _ = reference_run
    before = sorted(os.listdir(os.path.join(workdir, "checkpoints")))
    with pytest.raises(checkpoint.IncompatibleCheckpointError, match="width: saved 4, given 8"):
        train.train_and_evaluate(tiny_config(max_steps=8, width=8), workdir)
    assert sorted(os.listdir(os.path.join(workdir, "checkpoints"))) == before


def test_cli_reports_config_errors_without_a_traceback(tmp_path):
    result = subprocess.run(
        [sys.executable, "-m", "bt_jax.train", f"--workdir={tmp_path}", "--config.batch_size=36"],
        cwd=REPO, env=subprocess_env(8), capture_output=True, text=True, timeout=120)
    assert result.returncode != 0
    assert "config.batch_size=36" in result.stderr
    assert "Traceback" not in result.stderr


def test_the_default_recipe_runs_end_to_end_with_no_flags(tmp_path):
    """`python -m bt_jax.train` as a new user types it (here stopped after 2 steps)."""
    result = subprocess.run([sys.executable, "-m", "bt_jax.train", "--config.max_steps=2"],
                            cwd=tmp_path, env=subprocess_env(1), capture_output=True, text=True,
                            timeout=400)
    assert result.returncode == 0, result.stderr[-3000:]
    workdir = tmp_path / "runs" / "default"
    assert (workdir / "checkpoints" / "2").is_dir()
    assert (workdir / "backbone.msgpack").exists()
    saved = json.loads((workdir / "config.json").read_text())
    assert saved["dataset"] == "digits" and saved["model"] == "resnet18"
