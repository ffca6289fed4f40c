"""Test set-up: 8 simulated CPU devices, set before any JAX operation."""

import os

import chex

# chex rewrites XLA_FLAGS (replacing a device count already there, which appending would not)
# and refuses if a backend already started; subprocess tests inherit the variable or set theirs.
chex.set_n_cpu_devices(8)
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
os.environ.setdefault("JAX_PLATFORMS", "cpu")
# Many tests compile the same small programs, in this process and in the subprocesses they
# start (which inherit the environment): a persistent compilation cache compiles each once.
# In this checkout's .pytest_cache: a clean clone (CI) starts cold, as the timings in the README.
# Subprocess tests run on 8 devices, as this process does, so that a subprocess and an in-process
# run of the same config are one program, compiled once.
os.environ.setdefault(
    "JAX_COMPILATION_CACHE_DIR",
    os.path.join(os.path.dirname(os.path.dirname(__file__)), ".pytest_cache", "jax_compilation"),
)
os.environ.setdefault("JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS", "0")

import jax  # noqa: E402

# chex imported jax above, after which jax reads no more environment variables: the cache as
# config for this process (the variables above are for the subprocesses).
jax.config.update("jax_compilation_cache_dir", os.environ["JAX_COMPILATION_CACHE_DIR"])
jax.config.update(
    "jax_persistent_cache_min_compile_time_secs",
    float(os.environ["JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS"]),
)

from bt_jax import cli  # noqa: E402

# TensorFlow as the command lines load it: without Keras (bt_jax.cli.skip_keras).
cli.skip_keras()
# Hide the host's CPUs from TensorFlow's view of devices: tf.data only.
try:  # pragma: no cover - depends on install
    import tensorflow as tf

    tf.config.set_visible_devices([], "GPU")
except Exception:  # noqa: BLE001
    pass

assert jax.device_count() == 8, (
    "tests expect 8 simulated CPU devices; jax was imported before conftest"
)

# The trainer's garbage-collection settings (bt_jax.cli.collect_less) in the pytest processes:
# their heaps grow to a million objects over a file's tests, and every full collection scanned
# them all (12 s of a 78 s run of three step-and-model files, 3.4 s with these settings).
cli.collect_less()
cli.freeze_imports()

# A real GCS emulator for the tests that ask for it (started on first use, once per process).
from gcs_emulator import gcs_dir, gcs_emulator  # noqa: E402,F401

# The files in order of their measured time (``pytest --durations=0``), heaviest first, and
# ``--no-loadscope-reorder`` in setup.cfg: xdist then hands them out longest first, so the
# two-process pod tests do not start last while the other worker idles.
HEAVIEST_FIRST = (
    "test_pod_lifecycle.py",
    "test_faults.py",
    "test_train_run.py",
    "test_object_storage.py",
    "test_evaluate.py",
    "test_data.py",
    "test_stacked_views.py",
    "test_benchmarks.py",
    "test_train_step.py",
    "test_models.py",
    "test_install.py",
    "test_loss.py",
    "test_photometric.py",
    "test_convert.py",
)


def pytest_collection_modifyitems(items):
    def rank(item):
        name = item.path.name
        return HEAVIEST_FIRST.index(name) if name in HEAVIEST_FIRST else len(HEAVIEST_FIRST)

    items.sort(key=rank)  # stable: each file keeps its own order
