"""A short trainer run as it ships against its start-up settings undone one at a time.

    PYTHONPATH=. python experiments/benchmarks/start_up.py --rounds=3

Each round runs ``python -m bt_jax.train`` on the digits (4 steps, width 4, 16 px, no end-of-run
evaluation) four ways, alternating, in fresh workdirs: as it ships (``bt_jax.cli.collect_less``,
``freeze_imports`` and ``skip_keras``, the digits read without scikit-learn), with TensorFlow
loading Keras as it does by default (``TF_USE_LEGACY_KERAS=0``), with Python's default garbage
collection thresholds and no freeze, and with scikit-learn imported as the digits loader did.
All load their programs from one JAX compilation cache filled by a first run, so compilation is
not measured. Prints the medians of wall time and CPU time (user + system, the
child processes' own accounting) and the CPU time against the run as it ships.
"""

from __future__ import annotations

import argparse
import os
import resource
import statistics
import subprocess
import sys
import tempfile
import time

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
FLAGS = [
    "--config.max_steps=4",
    "--config.model.width=4",
    "--config.model.projector=32-32",
    "--config.data.image_size=16",
    "--config.data.eval_resize=16",
    "--config.eval.at_end=false",
    "--config.logging.every_steps=2",
    "--config.checkpoint.every_steps=2",
]
# The trainer with Python's defaults: bt_jax.cli's settings undone before its __main__ runs.
DEFAULT_GC = (
    "import gc, runpy, sys; from bt_jax import cli; "
    "cli.GC_THRESHOLDS = gc.get_threshold(); cli.freeze_imports = lambda: None; "
    "sys.argv[0] = 'bt_jax.train'; runpy.run_module('bt_jax.train', run_name='__main__')"
)
# The trainer importing scikit-learn for the digits, as bt_jax's loader did before it read the
# digits' file itself.
SKLEARN_DIGITS = (
    "import runpy, sys; from bt_jax import cli; cli.collect_less(); import sklearn.datasets; "
    "sys.argv[0] = 'bt_jax.train'; runpy.run_module('bt_jax.train', run_name='__main__')"
)
SHIPPED = "bt_jax as it ships"
VARIANTS = {  # name: (command, environment variables)
    SHIPPED: ([sys.executable, "-m", "bt_jax.train"], {}),
    "TensorFlow loads Keras": (
        [sys.executable, "-m", "bt_jax.train"],
        {"TF_USE_LEGACY_KERAS": "0"},
    ),
    "Python's garbage collection (700, 10, 10)": ([sys.executable, "-c", DEFAULT_GC], {}),
    "scikit-learn imported for the digits": ([sys.executable, "-c", SKLEARN_DIGITS], {}),
}


def run_once(variant: tuple[list[str], dict], env: dict) -> tuple[float, float]:
    """(wall s, CPU s) of one trainer run in a fresh workdir."""
    command, extra_env = variant
    env = {**env, **extra_env}
    with tempfile.TemporaryDirectory() as workdir:
        before = resource.getrusage(resource.RUSAGE_CHILDREN)
        start = time.perf_counter()
        subprocess.run(
            [*command, f"--workdir={workdir}/run", *FLAGS],
            env=env,
            check=True,
            capture_output=True,
        )
        wall = time.perf_counter() - start
        after = resource.getrusage(resource.RUSAGE_CHILDREN)
    cpu = (after.ru_utime - before.ru_utime) + (after.ru_stime - before.ru_stime)
    return wall, cpu


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--rounds", type=int, default=3)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as cache:
        env = dict(
            os.environ,
            JAX_PLATFORMS="cpu",
            TF_CPP_MIN_LOG_LEVEL="2",
            JAX_COMPILATION_CACHE_DIR=cache,
            JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS="0",
            PYTHONPATH=os.pathsep.join(filter(None, [REPO, os.environ.get("PYTHONPATH")])),
        )
        run_once(next(iter(VARIANTS.values())), env)  # fills the compilation cache
        times = {name: [] for name in VARIANTS}
        for _ in range(args.rounds):
            for name, variant in VARIANTS.items():
                times[name].append(run_once(variant, env))
    baseline = statistics.median(cpu for _, cpu in times[SHIPPED])
    print("| trainer | wall s (median) | CPU s (median) | CPU vs as it ships |")
    print("| --- | --- | --- | --- |")
    for name, runs in times.items():
        wall = statistics.median(w for w, _ in runs)
        cpu = statistics.median(c for _, c in runs)
        print(f"| {name} | {wall:.1f} | {cpu:.1f} | {cpu / baseline:.2f} |")


if __name__ == "__main__":
    main()
