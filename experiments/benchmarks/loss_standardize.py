"""Benchmark: what the magnitude-safe standardisation costs, against the plain one.

    python experiments/benchmarks/loss_standardize.py
    python experiments/benchmarks/loss_standardize.py --shapes 256x8192,2048x2048 --repeats 7

bt_jax's standardisation divides each column by a power of two near its largest |value| before
squaring (so that embeddings of any magnitude neither overflow nor vanish) and shifts it by its
first example; "plain" is the official BatchNorm1d(affine=False) formula, which overflows above
~1.8e19 in float32. Both feed the same dense or gram evaluation (the method "auto" picks), and
each row times value-and-grad of the whole loss, and of the standardisation alone, alternating
the two variants in one process. On a machine shared with other jobs the best of the repeats is
the least disturbed one: the table gives it, and the ratio of medians beside it; "MiB" is XLA's
count of bytes the compiled value-and-grad accesses, the same on every run.
"""

from __future__ import annotations

import argparse
import statistics
import time

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax

from bt_jax import loss as loss_lib

LAMBD = 0.0051
EPS = 1e-5


def plain_standardize(z: jax.Array, eps: float) -> jax.Array:
    """The official formula: (z - mean) / sqrt(biased variance + eps), z: [N, D]."""
    centred = z - jnp.mean(z, axis=0)
    return centred * lax.rsqrt(jnp.mean(jnp.square(centred), axis=0) + eps)


STANDARDIZE = {"plain": plain_standardize, "bt_jax": loss_lib._standardize}


def whole_loss(standardize, method: str):
    partial = loss_lib._dense_partial if method == "dense" else loss_lib._gram_partial

    def loss(z_a, z_b):
        za, zb = standardize(z_a, EPS), standardize(z_b, EPS)
        invariance, redundancy = partial(za, zb, 1, 0, z_a.shape[0], lax.Precision.HIGHEST)
        return invariance + LAMBD * redundancy

    return loss


def standardization_only(standardize):
    return lambda z_a, z_b: jnp.sum(standardize(z_a, EPS) * standardize(z_b, EPS))


def compiled(fn, z_a, z_b):
    step = jax.jit(jax.value_and_grad(fn, argnums=(0, 1))).lower(z_a, z_b).compile()
    jax.block_until_ready(step(z_a, z_b))  # Warm-up.
    return step


def mebibytes_accessed(step) -> float:
    cost = step.cost_analysis()
    return cost.get("bytes accessed", float("nan")) / 2**20 if cost else float("nan")


def alternate(steps: dict, z_a, z_b, repeats: int) -> dict:
    """Milliseconds of each step, the steps taking turns: {name: (best, median)}."""
    times = {name: [] for name in steps}
    for _ in range(repeats):
        for name, step in steps.items():
            start = time.perf_counter()
            jax.block_until_ready(step(z_a, z_b))
            times[name].append(time.perf_counter() - start)
    return {name: (1e3 * min(t), 1e3 * statistics.median(t)) for name, t in times.items()}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--shapes", default="256x2048,256x8192,1024x2048,2048x2048", help="comma-separated NxD"
    )
    parser.add_argument("--repeats", type=int, default=15)
    args = parser.parse_args()
    device = jax.devices()[0]
    print(
        f"# {device.platform}: {device.device_kind}; value_and_grad in ms, best of "
        f"{args.repeats} alternating (ratio of medians in brackets)"
    )
    print(
        "| N | D | method | loss, plain ms | loss, bt_jax ms | bt_jax/plain | loss, plain MiB | "
        "loss, bt_jax MiB | standardise only, plain ms | standardise only, bt_jax ms | "
        "bt_jax/plain |"
    )
    print("|---|---|---|---|---|---|---|---|---|---|---|")
    for shape in args.shapes.split(","):
        n, d = (int(x) for x in shape.split("x"))
        method = loss_lib.choose_method(n, d)
        rng = np.random.default_rng(0)
        z_a = jnp.asarray(rng.normal(size=(n, d)), jnp.float32)
        z_b = jnp.asarray(rng.normal(size=(n, d)), jnp.float32)
        steps = {}
        for name, standardize in STANDARDIZE.items():
            steps[f"loss {name}"] = compiled(whole_loss(standardize, method), z_a, z_b)
            steps[f"only {name}"] = compiled(standardization_only(standardize), z_a, z_b)
        ms = alternate(steps, z_a, z_b, args.repeats)
        cells = [str(n), str(d), method]
        for part in ("loss", "only"):
            plain, ours = ms[f"{part} plain"], ms[f"{part} bt_jax"]
            cells += [
                f"{plain[0]:.1f}",
                f"{ours[0]:.1f}",
                f"{ours[0] / plain[0]:.2f}x ({ours[1] / plain[1]:.2f}x)",
            ]
            if part == "loss":
                cells += [
                    f"{mebibytes_accessed(steps[f'loss {name}']):.0f}"
                    for name in ("plain", "bt_jax")
                ]
        print("| " + " | ".join(cells) + " |", flush=True)


if __name__ == "__main__":
    main()
