"""Test set-up: 8 simulated CPU devices, set before any JAX operation."""

import os
import tempfile

import chex

# chex rewrites XLA_FLAGS (replacing a device count already there, which appending would not)
# and refuses if a backend already started; subprocess tests inherit the variable or set theirs.
chex.set_n_cpu_devices(8)
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
os.environ.setdefault("JAX_PLATFORMS", "cpu")
# Many tests compile the same small programs, in this process and in the subprocesses they
# start (which inherit the environment): a persistent compilation cache compiles each once.
os.environ.setdefault(
    "JAX_COMPILATION_CACHE_DIR",
    os.path.join(tempfile.gettempdir(), "bt_jax_test_compilation_cache"),
)
os.environ.setdefault("JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS", "0")

import jax  # noqa: E402

# Hide the host's CPUs from TensorFlow's view of devices: tf.data only.
try:  # pragma: no cover - depends on install
    import tensorflow as tf

    tf.config.set_visible_devices([], "GPU")
except Exception:  # noqa: BLE001
    pass

assert jax.device_count() == 8, (
    "tests expect 8 simulated CPU devices; jax was imported before conftest"
)

# A real GCS emulator for the tests that ask for it (started on first use, once per process).
from gcs_emulator import gcs_dir, gcs_emulator  # noqa: E402,F401
