"""The evaluation command line.

python -m bt_jax.evaluate --workdir=runs/default --protocol=knn
python -m bt_jax.evaluate --workdir=runs/default --protocol=logreg --step=400 --baselines=false
python -m bt_jax.evaluate --workdir=runs/default --protocol=knn --all_checkpoints
python -m bt_jax.evaluate --workdir=gs://bucket/runs/r1 --protocol=linear --distributed
"""

from __future__ import annotations

import sys

from bt_jax import cli
from bt_jax import interrupts as interrupts_lib

# First, before anything heavy: a signal while the libraries load stops at once, in one line.
INTERRUPTS = interrupts_lib.Interrupts(distributed=False)
INTERRUPTS.enter(interrupts_lib.EVALUATION, "nothing was written")
cli.collect_less()  # before the heavy imports: bt_jax.cli.GC_THRESHOLDS
cli.skip_keras()

import json

from absl import app, flags, logging
from ml_collections import config_flags

from bt_jax import config as config_lib
from bt_jax import files  # noqa: F401 - configures the storage clients

FLAGS = flags.FLAGS
PROTOCOL_NAMES = ("linear", "logreg", "knn", "finetune")


def define_flags() -> None:
    flags.DEFINE_string("workdir", None, "The pretraining run to evaluate (its --workdir).")
    flags.DEFINE_enum("protocol", "knn", PROTOCOL_NAMES, "The protocol.")
    flags.DEFINE_integer("step", None, "Checkpoint step to evaluate (default: the latest).")
    flags.DEFINE_bool(
        "baselines",
        True,
        "Also evaluate the baselines (random-init backbones; raw pixels for logreg).",
    )
    flags.DEFINE_bool(
        "all_checkpoints",
        False,
        "Evaluate every retained checkpoint (eval_checkpoints.json, TensorBoard curves).",
    )
    flags.DEFINE_bool(
        "recompute_bn",
        False,
        "Re-estimate the backbone's BatchNorm statistics on training images before evaluating.",
    )
    cli.define_pod_flags(
        "Call jax.distributed.initialize() (every host of a pod runs this command; the work "
        "is split over all their devices)."
    )
    # Today's defaults stand in for the run's config only to parse --config.GROUP.KEY=VALUE
    # overrides, which are applied over the run's config.json.
    config_flags.DEFINE_config_dict(
        "config",
        config_lib.get_config(),
        "Override the run's config: --config.eval.KEY=VALUE.",
        lock_config=True,
    )


def parse_flags(argv: list[str]) -> list[str]:
    rest = cli.parse_flags(argv)
    if FLAGS.workdir is None:
        sys.stderr.write("error: --workdir is required: the pretraining run to evaluate.\n")
        sys.exit(2)
    return rest


def overrides() -> dict:
    """{"eval.knn_k": 20, ...}: the --config.* flags given on the command line."""
    return {
        name.split(".", 1)[1]: FLAGS[name].value
        for name in FLAGS
        if name.startswith("config.") and FLAGS[name].present
    }


def main(argv: list[str]) -> None:
    cli.refuse_arguments(argv)
    logging.get_absl_handler().addFilter(cli.LibraryLogFilter(verbose=FLAGS.verbose))

    def run() -> int:
        cli.initialize_distributed_if_asked(INTERRUPTS)
        import jax

        from bt_jax import evaluate

        cli.freeze_imports()

        if FLAGS.all_checkpoints:
            records = evaluate.evaluate_checkpoints(
                FLAGS.workdir, [FLAGS.protocol], baselines=FLAGS.baselines, overrides=overrides()
            )
            if jax.process_index() == 0:
                for record in records:
                    print(f"step {record['step']}: {evaluate.summary_line(record['results'])}")
            return 0
        record = evaluate.evaluate(
            FLAGS.workdir,
            FLAGS.protocol,
            step=FLAGS.step,
            baselines=FLAGS.baselines,
            overrides=overrides(),
            recompute_bn=FLAGS.recompute_bn,
        )
        if jax.process_index() == 0:
            where = "backbone.msgpack" if record["step"] is None else f"step {record['step']}"
            print(f"{FLAGS.protocol} ({where}): {json.dumps(record['results'])}")
            print(evaluate.summary_line({FLAGS.protocol: record["results"]}))
            print(f"written to {evaluate.results_path(FLAGS.workdir, FLAGS.protocol)}")
        return 0

    cli.run(run, verbose=FLAGS.verbose or None)


if __name__ == "__main__":
    try:
        define_flags()  # ml_collections already applies the --config.KEY overrides here
    except Exception as error:  # noqa: BLE001 - an unknown key
        cli.bad_flags(error, sys.argv)
    app.run(main, flags_parser=parse_flags)
