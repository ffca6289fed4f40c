"""Benchmark: images per second for forward + backward of backbone + projector, by depth and dtype.

    python experiments/benchmarks/model.py          # the full grid (long on CPU)
    python experiments/benchmarks/model.py --backbones=resnet18,resnet50 --steps=3
    python experiments/benchmarks/model.py --settings=cifar32 --dtypes=float32 --steps=2

Settings: "imagenet224" (224x224, imagenet stem, batch 16) and "cifar32" (32x32, cifar stem,
batch 256), each with the official 8192-8192-8192 projector. One step is value-and-grad with
respect to all parameters of one training-mode call on one view (BatchNorm batch statistics,
running averages updated), on one device; a training step makes two such calls (or one on both
views stacked). --convs picks how convolutions run (``bt_jax.models.conv``; "auto": the
model's default, per-tap matrix products for kernel gradients on the CPU). The loss is a
stand-in (mean square of the embedding) so the model alone is measured; see loss.py for the
Barlow Twins loss. Compilation is timed apart; the rate is the median over --steps timed steps.
"""

from __future__ import annotations

import argparse
import functools
import statistics
import time

import jax
import jax.numpy as jnp
import numpy as np

from bt_jax import models

SETTINGS = {
    # name: (image side, stem, default batch)
    "imagenet224": (224, "imagenet", 16),
    "cifar32": (32, "cifar", 256),
}


def measure(
    backbone: str,
    setting: str,
    dtype: str,
    batch: int,
    width: int,
    projector: str,
    steps: int,
    conv: str = "auto",
) -> tuple[float, float, float]:
    """(images per second, median ms per step, compile seconds)."""
    size, stem, _ = SETTINGS[setting]
    model = models.BarlowTwinsModel(
        models.create(backbone, stem=stem, width=width, dtype=dtype, conv=conv),
        models.Projector(projector, dtype=dtype),
    )
    images = jnp.asarray(
        np.random.default_rng(0).standard_normal((batch, size, size, 3)), jnp.float32
    )
    # "rbg" keys: the default threefry makes initialisation slow to compile on CPU.
    variables = jax.jit(functools.partial(model.init, train=False))(
        jax.random.key(0, impl="rbg"), images[:2]
    )

    def loss_fn(params, batch_stats, x):
        (_, z), updates = model.apply(
            {"params": params, "batch_stats": batch_stats}, x, train=True, mutable=["batch_stats"]
        )
        return jnp.mean(jnp.square(z)), updates["batch_stats"]

    step = jax.jit(jax.value_and_grad(loss_fn, has_aux=True))
    start = time.perf_counter()
    compiled = step.lower(variables["params"], variables["batch_stats"], images).compile()
    compile_s = time.perf_counter() - start
    jax.block_until_ready(
        compiled(variables["params"], variables["batch_stats"], images)
    )  # warm-up
    times = []
    for _ in range(steps):
        start = time.perf_counter()
        jax.block_until_ready(compiled(variables["params"], variables["batch_stats"], images))
        times.append(time.perf_counter() - start)
    median = statistics.median(times)
    return batch / median, 1e3 * median, compile_s


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--backbones", default=",".join(models.BACKBONES), help="comma-separated names"
    )
    parser.add_argument(
        "--settings", default=",".join(SETTINGS), help=f"comma-separated, of {list(SETTINGS)}"
    )
    parser.add_argument("--dtypes", default="float32,bfloat16", help="computation dtypes")
    parser.add_argument(
        "--steps", type=int, default=10, help="timed steps per row (after one warm-up)"
    )
    parser.add_argument(
        "--batch", type=int, default=None, help="override the settings' batch sizes"
    )
    parser.add_argument("--width", type=int, default=64, help="ResNet width (64 standard)")
    parser.add_argument("--projector", default="8192-8192-8192")
    parser.add_argument("--convs", default="auto", help=f"comma-separated, of {models.CONV_FORMS}")
    args = parser.parse_args()
    for c in args.convs.split(","):
        if c not in models.CONV_FORMS:
            parser.error(f"unknown conv form {c!r}; choose from {models.CONV_FORMS}")
    for s in args.settings.split(","):
        if s not in SETTINGS:
            parser.error(f"unknown setting {s!r}; choose from {list(SETTINGS)}")
    for b in args.backbones.split(","):
        if b not in models.BACKBONES:
            parser.error(f"unknown backbone {b!r}; choose from {list(models.BACKBONES)}")
    device = jax.devices()[0]
    print(
        f"# {device.platform}: {device.device_kind}, 1 of {jax.device_count()} device(s); "
        "forward + backward "
        f"of one view, projector {args.projector}, width {args.width}, median of {args.steps} steps"
    )
    header = ["backbone", "setting", "conv", "batch", "dtype", "images/s", "ms/step", "compile s"]
    print("| " + " | ".join(header) + " |")
    print("|" + "---|" * len(header))
    for backbone in args.backbones.split(","):
        for setting in args.settings.split(","):
            batch = args.batch or SETTINGS[setting][2]
            for dtype in args.dtypes.split(","):
                for conv in args.convs.split(","):
                    rate, ms, compile_s = measure(
                        backbone,
                        setting,
                        dtype,
                        batch,
                        args.width,
                        args.projector,
                        args.steps,
                        conv,
                    )
                    row = [
                        backbone,
                        setting,
                        conv,
                        str(batch),
                        dtype,
                        f"{rate:.1f}",
                        f"{ms:.0f}",
                        f"{compile_s:.1f}",
                    ]
                    print("| " + " | ".join(row) + " |", flush=True)


if __name__ == "__main__":
    main()
