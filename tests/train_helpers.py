"""Shared by the trainer tests: tiny configs, subprocess environments, restoring a run."""

import functools
import os
import sys

import jax
import numpy as np

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
