"""What the command lines do before any work: TensorFlow loaded without Keras, and TensorBoard
events still written."""

import os
import subprocess
import sys
import textwrap

from tensorboard.backend.event_processing import event_accumulator
from tensorboard.util import tensor_util
from train_helpers import subprocess_env

SCRIPT = textwrap.dedent("""
    import sys
    from bt_jax import cli
    cli.skip_keras()  # as python -m bt_jax.train and bt_jax.evaluate do first
    import tensorflow
    from bt_jax import metric_logging
    metric_logging.write_scalars(sys.argv[1], 3, {"loss": 1.5})
    print(sorted(m for m in ("keras", "sklearn", "scipy.stats") if m in sys.modules))
""")


def test_tensorflow_loads_without_keras_and_tensorboard_events_are_still_written(tmp_path):
    env = subprocess_env(1)
    env.pop("TF_USE_LEGACY_KERAS", None)  # the pytest process set it: the script must itself
    result = subprocess.run(
        [sys.executable, "-c", SCRIPT, str(tmp_path)],
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    assert result.stdout.strip() == "[]"  # Keras and what it imports never loaded
    events = event_accumulator.EventAccumulator(os.fspath(tmp_path)).Reload()
    loss = [
        (event.step, float(tensor_util.make_ndarray(event.tensor_proto)))
        for event in events.Tensors("loss")
    ]
    assert loss == [(3, 1.5)]
