"""The core install: `pip install bt_jax` (no extras) into a fresh virtual environment gives the
loss, the models and the weight converter, and importing them loads no TensorFlow."""

import subprocess
import sys
import textwrap

import pytest
from gcs_emulator import environment_without_emulator
from train_helpers import REPO

pytestmark = pytest.mark.slow

SCRIPT = textwrap.dedent("""
    import sys
    import jax, jax.numpy as jnp
    from bt_jax import barlow_twins_loss
    from bt_jax import models
    from bt_jax import convert
    z = jax.random.normal(jax.random.key(0), (2, 16, 32))
    loss = barlow_twins_loss(z[0], z[1])
    backbone = models.create("resnet18", stem="cifar", width=4)
    variables = backbone.init(jax.random.key(1), jnp.zeros((2, 16, 16, 3)), train=False)
    features = backbone.apply(variables, jnp.zeros((2, 16, 16, 3)), train=False)
    state_dict = convert.flax_to_torchvision(jax.device_get(variables))
    assert features.shape == (2, 32) and bool(jnp.isfinite(loss)) and len(state_dict) == 120
    heavy = sorted(m for m in ("tensorflow", "tensorflow_datasets", "clu", "ml_collections",
                               "sklearn") if m in sys.modules)
    assert not heavy, heavy
    print("ok", float(loss))
""")


def test_the_core_installs_alone_and_imports_no_tensorflow(tmp_path):
    venv = tmp_path / "venv"
    subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True)
    python = str(venv / "bin" / "python")
    # The real network: a GCS emulator started earlier in this process routes HTTPS elsewhere.
    # --no-compile: byte-compiling every installed package is a third of the test's CPU time,
    # and imports work without it.
    install = subprocess.run(
        [python, "-m", "pip", "install", "-q", "--no-compile", REPO],
        capture_output=True,
        text=True,
        timeout=900,
        env=environment_without_emulator(),
    )
    assert install.returncode == 0, install.stderr[-3000:]
    listed = subprocess.run([python, "-m", "pip", "list"], capture_output=True, text=True).stdout
    for package in ("tensorflow", "tensorflow-datasets", "clu", "ml-collections", "scikit-learn"):
        assert f"\n{package} " not in listed.lower(), package
    result = subprocess.run(
        [python, "-c", SCRIPT], capture_output=True, text=True, timeout=600, cwd=tmp_path
    )
    assert result.returncode == 0, result.stderr[-3000:]
    assert result.stdout.startswith("ok")
