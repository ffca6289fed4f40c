"""The benchmarks run where TensorFlow is not installed (an accelerator machine lent for
measurements has JAX, Flax, optax, chex and orbax, but no TF, tfds, ml_collections or CLU)."""

import os
import subprocess
import sys

import jax.numpy as jnp
import numpy as np
import pytest

from bt_jax.data import photometric

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
BENCHMARKS = os.path.join(REPO, "experiments", "benchmarks")
ABSENT = ("tensorflow", "tensorflow_datasets", "ml_collections", "clu")

# Runs a benchmark script as __main__ with the packages above made unimportable (None in
# sys.modules: any `import tensorflow`, however indirect, raises ImportError).
RUNNER = """
import runpy, sys
for name in {absent!r}:
    sys.modules[name] = None
sys.argv = {argv!r}
runpy.run_path(sys.argv[0], run_name="__main__")
for name in {absent!r}:
    assert sys.modules[name] is None, name
"""


def run_without_tensorflow(script: str, *args: str) -> str:
    argv = [os.path.join(BENCHMARKS, script), *args]
    env = {**os.environ, "PYTHONPATH": REPO}
    env["XLA_FLAGS"] = env.get("XLA_FLAGS", "").replace(
        "--xla_force_host_platform_device_count=8", ""
    )  # one device, as a plain run
    result = subprocess.run(
        [sys.executable, "-c", RUNNER.format(absent=ABSENT, argv=argv)],
        cwd=REPO,
        env=env,
        capture_output=True,
        text=True,
        timeout=900,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    return result.stdout


@pytest.mark.slow
def test_train_step_benchmark_runs_without_tensorflow():
    out = run_without_tensorflow(
        "train_step.py",
        "--batch=8",
        "--width=4",
        "--projector=16-16",
        "--image-size=16",
        "--repeats=1",
        "--steps=bt_jax,minimal",
    )
    rows = [
        line
        for line in out.splitlines()
        if line.startswith("| bt_jax") or line.startswith("| minimal")
    ]
    assert len(rows) == 2, out


@pytest.mark.slow
def test_step_profile_runs_without_tensorflow():
    """The same tiny steps as above (their programs come from the compilation cache), profiled."""
    out = run_without_tensorflow(
        "step_profile.py",
        "--batch=8",
        "--width=4",
        "--projector=16-16",
        "--image-size=16",
        "--rounds=1",
        "--steps=bt_jax,minimal",
    )
    rows = {line.split("|")[1].strip(): line for line in out.splitlines() if line.startswith("| ")}
    for kind in ("conv forward", "matmul", "all thunks", "step wall time"):
        assert kind in rows, out
    # Both steps ran convolutions that the trace timed and the program named.
    conv_seconds = [float(cell) for cell in rows["conv forward"].split("|")[2:4]]
    assert all(seconds > 0 for seconds in conv_seconds), out


def test_model_and_loss_benchmarks_run_without_tensorflow():
    out = run_without_tensorflow(
        "model.py",
        "--backbones=resnet18",
        "--settings=cifar32",
        "--dtypes=float32",
        "--steps=1",
        "--batch=4",
        "--width=4",
        "--projector=16-16",
    )
    assert "| resnet18 | cifar32 | auto | 4 | float32 |" in out, out
    out = run_without_tensorflow("loss.py", "--batches", "8", "--dims", "16", "--repeats", "1")
    assert "| 8 | 16 |" in out, out


def test_the_benchmark_finishes_views_as_the_trainer():
    sys.path.insert(0, BENCHMARKS)
    try:
        import train_step
    finally:
        sys.path.remove(BENCHMARKS)
    rng = np.random.default_rng(0)
    batch = {
        key: jnp.asarray(rng.integers(0, 256, (4, 8, 8, 3), dtype=np.uint8))
        for key in ("view_a", "view_b")
    }
    want = photometric.finish_views(batch, seed=0, views=None, photometric="host")
    got = train_step.finish_views(batch)
    for key in ("view_a", "view_b"):
        np.testing.assert_array_equal(got[key], want[key])


def test_checkpoint_save_benchmark_times_both_writers():
    result = subprocess.run(
        [
            sys.executable,
            os.path.join(BENCHMARKS, "checkpoint_save.py"),
            "--rounds=1",
            "--sizes=tiny",
        ],
        cwd=REPO,
        env={**os.environ, "PYTHONPATH": REPO},
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    rows = [line.split("|") for line in result.stdout.splitlines() if line.startswith("| tiny |")]
    assert [row[5].strip() for row in rows] == ["orbax default", "bt_jax"], result.stdout
    for row in rows:
        assert float(row[6]) >= 0 and float(row[7]) >= 0
