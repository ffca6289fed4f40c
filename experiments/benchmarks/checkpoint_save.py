"""How long a checkpoint save holds the training loop: bt_jax's writer against orbax's default.

    PYTHONPATH=. python experiments/benchmarks/checkpoint_save.py --rounds=3

Each measurement is a fresh process (nothing compiled yet, no compilation cache) on 8 simulated
CPU devices that builds a replicated step-0 TrainState and saves it three times through
``bt_jax.checkpoint``, timing each ``save`` call in the caller: the time the devices wait
before the next step (the files are written in the background). "orbax default" is orbax's
standard handler as bt_jax used it before (every replicated array split over the replicas, one
eager slicing program per array shape and device, compiled at the first save); "bt_jax" writes
arrays under ``checkpoint.REPLICA_PARALLEL_MIN_BYTES`` per replica whole. The writers
alternate within each round; the table has the medians.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
SIZES = {  # name: config overrides (dotted keys); ResNet-18, cifar stem
    "tiny": {"model.width": 4, "model.projector": "32-32"},
    "resnet18": {"model.width": 64, "model.projector": "2048-2048-2048"},
}
WRITERS = ("orbax default", "bt_jax")

# One measurement, in a fresh process: prints {"arrays", "mib", "seconds": [per save]}.
MEASURE = """
import json, sys, tempfile, time
import jax, orbax.checkpoint as ocp
from bt_jax import checkpoint, parallel, config as config_lib, state as state_lib
overrides, writer = json.loads(sys.argv[1]), sys.argv[2]
if writer == "orbax default":  # the standard handler for the state, as before bt_jax's writer
    checkpoint._state_writer = ocp.StandardCheckpointHandler
    ocp.args.PyTreeSave = ocp.args.StandardSave
config = config_lib.get_config()
for key, value in overrides.items():
    config_lib.set_dotted(config, key, value)
mesh = parallel.device_mesh()
model = state_lib.build_model(config)
tx = state_lib.build_optimizer(config, 5)
state = state_lib.run_once(
    lambda: state_lib.init_state(config, model, tx, 10), out_shardings=parallel.replicated(mesh)
)
jax.block_until_ready(state)
leaves = jax.tree.leaves(state)
seconds = []
with tempfile.TemporaryDirectory() as workdir:
    manager = checkpoint.open_manager(workdir, keep=5)
    for step in range(1, 4):
        start = time.perf_counter()
        checkpoint.save(manager, step, state, {"step": step})
        seconds.append(time.perf_counter() - start)
        manager.wait_until_finished()
    manager.close()
print(json.dumps({"arrays": len(leaves), "mib": sum(x.nbytes for x in leaves) / 2**20,
                  "seconds": seconds}))
"""


def measure(overrides: dict, writer: str) -> dict:
    env = {
        **os.environ,
        "XLA_FLAGS": "--xla_force_host_platform_device_count=8",
        "JAX_PLATFORMS": "cpu",
        "JAX_ENABLE_COMPILATION_CACHE": "false",
        "TF_CPP_MIN_LOG_LEVEL": "2",
        "PYTHONPATH": os.pathsep.join(filter(None, [REPO, os.environ.get("PYTHONPATH")])),
    }
    result = subprocess.run(
        [sys.executable, "-c", MEASURE, json.dumps(overrides), writer],
        env=env,
        capture_output=True,
        text=True,
        check=False,
    )
    if result.returncode != 0:
        raise SystemExit(f"error: the measurement failed:\n{result.stderr[-3000:]}")
    return json.loads(result.stdout.strip().splitlines()[-1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--sizes", default=",".join(SIZES), help="comma-separated SIZES names")
    args = parser.parse_args()
    sizes = [name for name in SIZES if name in args.sizes.split(",")]
    if args.rounds < 1 or not sizes:
        parser.error(f"--rounds must be >= 1 and --sizes among {list(SIZES)}")
    results: dict[tuple[str, str], list[dict]] = {}
    for _ in range(args.rounds):
        for size in sizes:
            for writer in WRITERS:
                results.setdefault((size, writer), []).append(measure(SIZES[size], writer))
    print("| state | width, projector | arrays | MiB | writer | first save s | later saves s |")
    print("| --- | --- | --- | --- | --- | --- | --- |")
    for (size, writer), runs in results.items():
        first = statistics.median(r["seconds"][0] for r in runs)
        later = statistics.median(s for r in runs for s in r["seconds"][1:])
        print(
            f"| {size} | {SIZES[size]['model.width']}, {SIZES[size]['model.projector']} | "
            f"{runs[0]['arrays']} | {runs[0]['mib']:.1f} | {writer} | "
            f"{first:.2f} | {later:.2f} |"
        )


if __name__ == "__main__":
    main()
