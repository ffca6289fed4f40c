"""Benchmark: images per second and peak memory of the full pretraining step on this machine.

    python experiments/benchmarks/train_step.py                        # both settings
    python experiments/benchmarks/train_step.py --settings=cifar32 --batch=64 --steps=3

The step is bt_jax.train.train_step (two views, sync BatchNorm, the loss over the all-gathered
batch, pmean, LARS, the online probe) under jit(shard_map) over every local device, on random
images. "Images" counts examples of the global batch (each seen in two views). Peak memory is
XLA's accounting of the compiled step (arguments + outputs + temporaries, per device).
"""

from __future__ import annotations

import argparse
import functools
import time

import jax
import numpy as np
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

from bt_jax import config as config_lib
from bt_jax import optim
from bt_jax import train

SETTINGS = {
    # name: (model, stem, image size, default global batch)
    "cifar32": ("resnet18", "cifar", 32, 256),
    "imagenet224": ("resnet50", "imagenet", 224, 64),
}


def measure(setting: str, *, batch: int | None, steps: int, width: int, projector: str,
            dtype: str) -> dict:
    model_name, stem, size, default_batch = SETTINGS[setting]
    config = config_lib.get_config()
    config.update(dict(model=model_name, stem=stem, image_size=size, width=width,
                       projector=projector, batch_size=batch or default_batch, dtype=dtype,
                       num_epochs=10, warmup_epochs=1))
    config_lib.validate(config, device_count=jax.device_count())
    model = train.build_model(config)
    tx = optim.create_optimizer(config, steps_per_epoch=100)
    mesh = train.device_mesh()
    state = jax.jit(functools.partial(train.init_state, config, model, tx, 10),
                    out_shardings=NamedSharding(mesh, P()))()
    step = train.shard_map_step(functools.partial(
        train.train_step, model=model, tx=tx, lambd=config.lambd, loss_method="auto",
        probe_tx=train.probe_optimizer(config)), mesh)
    rng = np.random.default_rng(0)
    shape = (config.batch_size, size, size, 3)
    batch_sharding = NamedSharding(mesh, P(train.AXIS))
    batch_data = {
        "view_a": jax.device_put(rng.normal(size=shape).astype(np.float32), batch_sharding),
        "view_b": jax.device_put(rng.normal(size=shape).astype(np.float32), batch_sharding),
        "label": jax.device_put(rng.integers(0, 10, config.batch_size).astype(np.int32),
                                batch_sharding),
    }
    key = jax.random.key(0)
    start = time.perf_counter()
    compiled = step.lower(state, batch_data, key).compile()
    compile_seconds = time.perf_counter() - start
    memory = compiled.memory_analysis()
    peak = float("nan") if memory is None else (
        memory.argument_size_in_bytes + memory.output_size_in_bytes
        + memory.temp_size_in_bytes) / 2**20
    state, metrics = compiled(state, batch_data, key)  # Warm-up.
    jax.block_until_ready(metrics)
    start = time.perf_counter()
    for _ in range(steps):
        state, metrics = compiled(state, batch_data, key)
    jax.block_until_ready(metrics)
    seconds = (time.perf_counter() - start) / steps
    return {"setting": setting, "model": model_name, "batch": config.batch_size,
            "dtype": dtype, "ms_per_step": 1e3 * seconds,
            "images_per_second": config.batch_size / seconds, "peak_mib": peak,
            "compile_seconds": compile_seconds}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--settings", default="cifar32,imagenet224")
    parser.add_argument("--batch", type=int, default=None, help="global batch (default per setting)")
    parser.add_argument("--steps", type=int, default=3)
    parser.add_argument("--width", type=int, default=64)
    parser.add_argument("--projector", default="8192-8192-8192")
    parser.add_argument("--dtypes", default="float32,bfloat16")
    args = parser.parse_args()
    device = jax.devices()[0]
    print(f"# {device.platform}: {device.device_kind} x {jax.device_count()}; width "
          f"{args.width}, projector {args.projector}; mean of {args.steps} timed steps after one warm-up")
    columns = ["setting", "model", "batch", "dtype", "ms_per_step", "images_per_second",
               "peak_mib", "compile_seconds"]
    print("| " + " | ".join(columns) + " |")
    print("|" + "---|" * len(columns))
    for setting in args.settings.split(","):
        for dtype in args.dtypes.split(","):
            row = measure(setting, batch=args.batch, steps=args.steps, width=args.width,
                          projector=args.projector, dtype=dtype)
            print("| " + " | ".join(f"{row[c]:.1f}" if isinstance(row[c], float) else str(row[c])
                                    for c in columns) + " |", flush=True)


if __name__ == "__main__":
    main()
