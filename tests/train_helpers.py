"""Shared by the trainer tests: tiny configs, command lines, subprocess environments, restoring."""

import functools
import os
import socket
import sys

import jax
import numpy as np

from bt_jax import checkpoint, parallel
from bt_jax import config as config_lib
from bt_jax import state as state_lib
from bt_jax import workdir as workdir_lib

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TINY = {
    "batch_size": 256,
    "num_epochs": 2,
    "max_steps": 4,
    "data.image_size": 16,
    "data.eval_resize": 16,
    "model.width": 4,
    "model.projector": "32-32",
    "optim.warmup_epochs": 1,
    "logging.every_steps": 2,
    "checkpoint.every_steps": 2,
    "logging.correlation_image_dims": 16,
}


def tiny_config(**overrides):
    """A config that compiles and steps in seconds on the CPU; overrides by dotted key with
    "__" for the dot (``model__width=8``) or as a plain top-level key."""
    config = config_lib.get_config()
    for key, value in {**TINY, **{k.replace("__", "."): v for k, v in overrides.items()}}.items():
        config_lib.set_dotted(config, key, value)
    return config


def steps_per_epoch(config) -> int:
    """The trainer's steps per epoch for ``config`` (digits: 1500 training images). Tests that
    build a step themselves use it: their program is then the trainer's, compiled once for both
    (the learning-rate schedule is compiled into the step)."""
    from bt_jax import data

    return data.steps_per_epoch(data.load_source(config.data.dataset), config.batch_size)


def trainer_command(workdir, **overrides):
    """``python -m bt_jax.train`` with the tiny config's values as --config.KEY flags."""
    args = [sys.executable, "-m", "bt_jax.train", f"--workdir={workdir}"]
    defaults = config_lib.flat_items(config_lib.get_config())
    for key, value in config_lib.flat_items(tiny_config(**overrides)).items():
        if value != defaults[key]:
            if isinstance(value, (tuple, list)):
                value = ",".join(str(v) for v in value)
            args.append(f"--config.{key}={value}")
    return args


def step_0_state(config, model, tx, mesh):
    """The trainer's step-0 state (a probe of 10 classes), replicated over ``mesh``."""
    return state_lib.run_once(
        functools.partial(state_lib.init_state, config, model, tx, 10),
        out_shardings=parallel.replicated(mesh),
    )


def restore_state(workdir):
    """(TrainState, step) of a run's latest checkpoint, on this process's devices."""
    config = workdir_lib.read_config(workdir)
    model = state_lib.build_model(config)
    tx = state_lib.build_optimizer(config, steps_per_epoch=5)
    target = step_0_state(config, model, tx, parallel.device_mesh())
    manager = checkpoint.open_manager(workdir, keep=100)
    try:
        state, restored = checkpoint.restore(
            manager, target, identity=config_lib.resume_identity(config)
        )
    finally:
        manager.close()
    return state, restored


def restore_params(workdir):
    state, step = restore_state(workdir)
    return jax.device_get(state.params), int(step)


def assert_bit_identical(a, b):
    for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b)):
        np.testing.assert_array_equal(x, y)


def subprocess_env(device_count=8, **extra):
    env = dict(os.environ)
    env["XLA_FLAGS"] = f"--xla_force_host_platform_device_count={device_count}"
    env["JAX_PLATFORMS"] = "cpu"
    env["TF_CPP_MIN_LOG_LEVEL"] = "2"
    # This checkout's bt_jax, whatever the working directory and whatever else is installed.
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(REPO), env.get("PYTHONPATH")]))
    env.update(extra)
    return env


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]
