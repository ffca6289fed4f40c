"""The pretraining command line: ``python -m bt_jax.train [--config=FILE] [--config.KEY=VALUE]``.

Signals are handled from the first line (``bt_jax.interrupts``), before the flags are parsed and
before JAX and TensorFlow load; every error a user can fix is one ``error:`` line
(``bt_jax.cli``); ``--verbose`` shows tracebacks.
"""

from __future__ import annotations

import sys

from bt_jax import cli
from bt_jax import interrupts as interrupts_lib

# First, before anything heavy: a signal while the libraries load or the config file is read
# stops at once, in one line.
INTERRUPTS = interrupts_lib.Interrupts(distributed=False)
cli.collect_less()  # before the heavy imports: bt_jax.cli.GC_THRESHOLDS
cli.skip_keras()

import os

from absl import app, flags, logging
from ml_collections import config_flags

from bt_jax import config as config_lib
from bt_jax import files  # noqa: F401 - configures the storage clients

FLAGS = flags.FLAGS
DEFAULT_CONFIG = os.path.join(os.path.dirname(os.path.dirname(__file__)), "config.py")


def define_flags() -> None:
    config_flags.DEFINE_config_file(
        "config",
        DEFAULT_CONFIG,
        "A config file with get_config() (experiments/configs/*.py); override keys with "
        "--config.GROUP.KEY=VALUE (e.g. --config.model.width=32).",
        lock_config=True,
    )
    flags.DEFINE_string(
        "workdir",
        "runs/default",
        "Where checkpoints and logs go: a local folder or gs://bucket/path.",
    )
    cli.define_pod_flags(
        "Call jax.distributed.initialize() (one process per host); the arguments come from "
        "the cluster environment or the flags below."
    )


def main(argv: list[str]) -> None:
    cli.refuse_arguments(argv)
    logging.get_absl_handler().addFilter(cli.LibraryLogFilter(verbose=FLAGS.verbose))

    def run() -> int:
        # The checks that need neither TensorFlow nor the data: a mistyped value, or a workdir
        # that is a file, in use or saved by another config, is one line in seconds, not after
        # the trainer's imports (the loop checks again, for API users).
        config_lib.validate(FLAGS.config)
        from bt_jax import workdir as workdir_lib  # JAX and orbax, not yet TensorFlow

        workdir_lib.check(FLAGS.workdir, FLAGS.config)
        cli.initialize_distributed_if_asked(INTERRUPTS)
        import jax

        from bt_jax.train import loop  # JAX, Flax, TensorFlow: after the handlers are in place

        cli.freeze_imports()

        logging.info(
            "JAX processes: %d, devices: %d (%d local).",
            jax.process_count(),
            jax.device_count(),
            jax.local_device_count(),
        )
        try:
            loop.train_and_evaluate(FLAGS.config, FLAGS.workdir, INTERRUPTS)
        except loop.Stopped as stop:
            return stop.status
        return 0

    cli.run(run, verbose=FLAGS.verbose or None)


if __name__ == "__main__":
    try:
        define_flags()  # ml_collections already applies the --config.KEY overrides here
    except Exception as error:  # noqa: BLE001 - an unknown key, a broken config file
        cli.bad_flags(error, sys.argv)
    app.run(main, flags_parser=cli.parse_flags)
