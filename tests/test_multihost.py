"""Two real JAX processes on 127.0.0.1 (2 CPU devices each, collectives through gloo) end with
the parameters of one process with 4 devices."""

import functools
import os
import socket
import subprocess
import sys

import jax
import numpy as np

from bt_jax import checkpoint
from bt_jax import optim
from bt_jax import train

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
FLAGS = ["--config.batch_size=32", "--config.image_size=16", "--config.width=4",
         "--config.projector=32-32", "--config.num_epochs=2", "--config.warmup_epochs=1",
         "--config.max_steps=3", "--config.checkpoint_every_steps=3"]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start(workdir, devices, extra=()):
    env = dict(os.environ, JAX_PLATFORMS="cpu", TF_CPP_MIN_LOG_LEVEL="2",
               XLA_FLAGS=f"--xla_force_host_platform_device_count={devices}")
    return subprocess.Popen(
        [sys.executable, "-m", "bt_jax.train", f"--workdir={workdir}", *FLAGS, *extra],
        cwd=REPO, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)


def final_params(workdir):
    config = checkpoint.read_config(workdir)
    manager = checkpoint.checkpoint_manager(workdir, config)
    model = train.build_model(config)
    target = jax.jit(functools.partial(train.init_state, config, model,
                                       optim.create_optimizer(config, steps_per_epoch=5),
                                       10))()  # digits: 10 classes for the online probe
    state = checkpoint.restore(manager, target)
    manager.close()
    return int(state.step), jax.device_get(state.params)


def test_two_processes_equal_one_process_with_the_same_devices(tmp_path):
    port = free_port()
    multi, single = str(tmp_path / "two_processes"), str(tmp_path / "one_process")
    processes = [
        start(multi, 2, [f"--coordinator_address=127.0.0.1:{port}", "--num_processes=2",
                         f"--process_id={i}"]) for i in range(2)]
    processes.append(start(single, 4))
    for process in processes:
        _, stderr = process.communicate(timeout=480)
        assert process.returncode == 0, stderr[-3000:]
    step_multi, params_multi = final_params(multi)
    step_single, params_single = final_params(single)
    assert step_multi == step_single == 3
    for a, b in zip(jax.tree.leaves(params_multi), jax.tree.leaves(params_single)):
        # Same global batch, same update; only the order of cross-process float sums differs.
        np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-5 * float(np.max(np.abs(b))))
    # Only process 0 wrote the logs.
    assert os.path.exists(os.path.join(multi, "metrics.jsonl"))
