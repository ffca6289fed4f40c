"""Benchmark: value-and-grad time and peak memory of the Barlow Twins loss, by method.

    python experiments/benchmarks/loss.py                  # the full grid (minutes on 2 cores)
    python experiments/benchmarks/loss.py --batches 256 --dims 2048,8192 --repeats 3

Methods: bt_jax's "dense", "gram" and "auto", and "official", a transcription of the official
PyTorch formulation (standardise, form all of C, then reduce its diagonal and off-diagonal).
Timings are medians over repeats, measured side by side in one process; peak memory is XLA's
own accounting of the compiled program (arguments + outputs + temporaries), so it is the same
on any backend and needs no device memory statistics.
"""

from __future__ import annotations

import argparse
import statistics
import time

import jax
import jax.numpy as jnp
import numpy as np

import bt_jax

LAMBD = 0.0051


def official_formulation(z1: jax.Array, z2: jax.Array) -> jax.Array:
    """The official main.py: BatchNorm1d(affine=False), c = bn(z1).T @ bn(z2) / N, reductions."""

    def bn(z):
        mean = z.mean(0)
        return (z - mean) / jnp.sqrt(jnp.mean(jnp.square(z - mean), 0) + 1e-5)

    n, d = z1.shape
    c = jnp.matmul(bn(z1).T, bn(z2), precision=jax.lax.Precision.HIGHEST) / n
    on_diag = jnp.sum(jnp.square(jnp.diagonal(c) - 1.0))
    # off_diagonal(c): the flatten()[:-1].view(d - 1, d + 1)[:, 1:] trick of the official code.
    off_diag = c.reshape(-1)[:-1].reshape(d - 1, d + 1)[:, 1:]
    return on_diag + LAMBD * jnp.sum(jnp.square(off_diag))


def loss_fn(method: str):
    if method == "official":
        return official_formulation
    return lambda z1, z2: bt_jax.barlow_twins_loss(z1, z2, lambd=LAMBD, method=method)


def measure(method: str, n: int, d: int, repeats: int) -> tuple[float, float]:
    """(median milliseconds of one value-and-grad, peak MiB) for [n, d] embeddings."""
    rng = np.random.default_rng(0)
    z1 = jnp.asarray(rng.normal(size=(n, d)), jnp.float32)
    z2 = jnp.asarray(rng.normal(size=(n, d)), jnp.float32)
    step = jax.jit(jax.value_and_grad(loss_fn(method), argnums=(0, 1)))
    compiled = step.lower(z1, z2).compile()
    memory = compiled.memory_analysis()
    peak_mib = float("nan")
    if memory is not None:
        peak_mib = (
            memory.argument_size_in_bytes + memory.output_size_in_bytes + memory.temp_size_in_bytes
        ) / 2**20
    jax.block_until_ready(compiled(z1, z2))  # Warm-up.
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        jax.block_until_ready(compiled(z1, z2))
        times.append(time.perf_counter() - start)
    return 1e3 * statistics.median(times), peak_mib


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--batches", default="256,1024,2048", help="comma-separated N")
    parser.add_argument("--dims", default="2048,8192,16384", help="comma-separated D")
    parser.add_argument("--methods", default="dense,gram,auto,official")
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()
    methods = args.methods.split(",")
    device = jax.devices()[0]
    print(
        f"# {device.platform}: {device.device_kind}, {jax.device_count()} device(s); "
        f"value_and_grad in ms (median of {args.repeats}), peak MiB from XLA"
    )
    header = ["N", "D", "auto picks"] + [f"{m} ms" for m in methods] + [f"{m} MiB" for m in methods]
    header += ["official/auto"]
    print("| " + " | ".join(header) + " |")
    print("|" + "---|" * len(header))
    for n in map(int, args.batches.split(",")):
        for d in map(int, args.dims.split(",")):
            results = {m: measure(m, n, d, args.repeats) for m in methods}
            row = [str(n), str(d), bt_jax.loss.choose_method(n, d)]
            row += [f"{results[m][0]:.1f}" for m in methods]
            row += [f"{results[m][1]:.0f}" for m in methods]
            ratio = (
                results["official"][0] / results["auto"][0]
                if {"official", "auto"} <= results.keys()
                else float("nan")
            )
            row.append(f"{ratio:.1f}x")
            print("| " + " | ".join(row) + " |", flush=True)


if __name__ == "__main__":
    main()
