"""Results of a pretraining run as figures and one JSON summary, for the README.

    python experiments/report.py --workdir=runs/fashion_mnist --out=experiments/results/fashion_mnist

Writes into --out:
  loss.png         the loss and its two terms (invariance; lambd x redundancy) over training
  correlation.png  the leading block of C on one training batch, at initialisation and at the end
  accuracy.png     logistic-regression probe and kNN top-1 at every retained checkpoint, with
                   the random-init baseline (epoch 0 is the random-init backbone itself)
  summary.json     the numbers behind the figures, wall time included
The checkpoint evaluations come from bt_jax.evaluate.evaluate_checkpoints (eval_checkpoints.json
in the workdir, reused when it is already there; --reevaluate recomputes it).
"""

from __future__ import annotations

import argparse
import functools
import json
import os

import jax
import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402

from bt_jax import data  # noqa: E402
from bt_jax import evaluate  # noqa: E402
from bt_jax import loss as loss_lib  # noqa: E402
from bt_jax import train  # noqa: E402

CORRELATION_DIMS = 64


def read_metrics(workdir: str) -> list[dict]:
    with open(os.path.join(workdir, "metrics.jsonl")) as f:
        records = [json.loads(line) for line in f]
    # A resumed run appends; keep the last record of each step.
    by_step = {}
    for record in records:
        by_step.setdefault(record["step"], {}).update(record)
    return [by_step[step] for step in sorted(by_step)]


def plot_loss(records: list[dict], lambd: float, steps_per_epoch: int, path: str) -> None:
    rows = [r for r in records if "loss" in r]
    epochs = np.array([r["step"] for r in rows]) / steps_per_epoch
    fig, ax = plt.subplots(figsize=(6, 4))
    ax.plot(epochs, [r["loss"] for r in rows], label="loss")
    ax.plot(epochs, [r["invariance"] for r in rows], label="invariance  sum (1 - C_ii)^2")
    ax.plot(epochs, [lambd * r["redundancy"] for r in rows],
            label=f"{lambd} x redundancy  sum C_ij^2")
    ax.set_yscale("log")
    ax.set_xlabel("epoch")
    ax.legend()
    ax.set_title("Barlow Twins loss")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def correlation_matrix(config, variables: dict, batch: dict) -> np.ndarray:
    """The leading block of C for one batch, training-mode BatchNorm (as the loss sees it)."""
    model = train.build_model(config, axis_name=None)

    @jax.jit
    def block(variables, view_a, view_b):
        (_, z_a), _ = model.apply(variables, view_a, train=True, mutable=["batch_stats"])
        (_, z_b), _ = model.apply(variables, view_b, train=True, mutable=["batch_stats"])
        return loss_lib.cross_correlation(z_a[:, :CORRELATION_DIMS], z_b[:, :CORRELATION_DIMS])

    return np.asarray(block(variables, batch["view_a"], batch["view_b"]))


def plot_correlations(start: np.ndarray, end: np.ndarray, path: str) -> None:
    fig, axes = plt.subplots(1, 2, figsize=(8, 4))
    for ax, matrix, title in zip(axes, (start, end), ("initialisation", "end of training")):
        image = ax.imshow(matrix, vmin=-1, vmax=1, cmap="RdBu_r")
        ax.set_title(f"C[:{CORRELATION_DIMS}, :{CORRELATION_DIMS}], {title}")
        ax.set_xticks([])
        ax.set_yticks([])
    fig.colorbar(image, ax=axes, shrink=0.8)
    fig.savefig(path, dpi=120)
    plt.close(fig)


def plot_accuracy(curve: list[dict], steps_per_epoch: int, path: str) -> None:
    fig, ax = plt.subplots(figsize=(6, 4))
    for protocol, name, color in (("logreg", "linear probe (logreg)", "C0"),
                                  ("knn", "kNN (k=200)", "C1")):
        epochs = [0] + [r["step"] / steps_per_epoch for r in curve]
        baseline = curve[0]["results"][protocol]["random_init"]["top1"]
        values = [baseline] + [r["results"][protocol]["pretrained"]["top1"] for r in curve]
        ax.plot(epochs, np.array(values) * 100, "o-", color=color, label=name)
        ax.axhline(baseline * 100, color=color, linestyle=":", label=f"{name}, random init")
    ax.set_xlabel("epoch")
    ax.set_ylabel("test top-1 (%)")
    ax.legend()
    ax.set_title("Probe accuracy over pretraining")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--workdir", required=True)
    parser.add_argument("--out", required=True)
    parser.add_argument("--reevaluate", action="store_true")
    parser.add_argument("--epochs", default="",
                        help="comma-separated epochs to evaluate (default every checkpoint)")
    args = parser.parse_args()
    os.makedirs(args.out, exist_ok=True)
    config = evaluate.load_run_config(args.workdir)
    source = data.load_source(config.dataset, config.data_dir or None)
    steps_per_epoch = data.steps_per_epoch(source, config.batch_size)

    records = read_metrics(args.workdir)
    plot_loss(records, config.lambd, steps_per_epoch, os.path.join(args.out, "loss.png"))

    curve_path = os.path.join(args.workdir, "eval_checkpoints.json")
    if args.reevaluate or not os.path.exists(curve_path):
        steps = [int(e) * steps_per_epoch for e in args.epochs.split(",") if e] or None
        evaluate.evaluate_checkpoints(args.workdir, steps=steps)
    with open(curve_path) as f:
        curve = json.load(f)["checkpoints"]
    plot_accuracy(curve, steps_per_epoch, os.path.join(args.out, "accuracy.png"))

    batch = next(data.pretrain_batches(
        source, global_batch=config.batch_size, image_size=config.image_size, seed=config.seed,
        min_crop_scale=config.min_crop_scale, views=train.view_specs(config), process_index=0,
        process_count=1, local_device_count=1))
    batch = {key: value[0] for key, value in batch.items()}
    model = train.build_model(config, axis_name=None)
    initial = jax.jit(functools.partial(train.init_state, config, model,
                                        train.optim.create_optimizer(config, steps_per_epoch)))()
    start = correlation_matrix(config, {"params": initial.params,
                                        "batch_stats": initial.batch_stats}, batch)
    last_step = curve[-1]["step"]
    end = correlation_matrix(config, evaluate.restore_variables(args.workdir, last_step, None),
                             batch)
    plot_correlations(start, end, os.path.join(args.out, "correlation.png"))

    off_diagonal = ~np.eye(CORRELATION_DIMS, dtype=bool)
    final = curve[-1]["results"]
    summary = {
        "workdir": args.workdir, "dataset": config.dataset, "model": config.model,
        "width": config.width, "projector": config.projector, "batch_size": config.batch_size,
        "epochs": last_step / steps_per_epoch, "steps": last_step,
        # From the config written at the start to the last checkpoint (includes any downtime
        # of a resumed run).
        "wall_seconds": round(os.path.getmtime(os.path.join(
            args.workdir, "checkpoints", str(last_step))) - os.path.getmtime(
                os.path.join(args.workdir, "config.json"))),
        "linear_top1": final["logreg"]["pretrained"]["top1"],
        "linear_top1_random_init": final["logreg"]["random_init"]["top1"],
        "linear_top1_raw_pixels": final["logreg"].get("raw_pixels", {}).get("top1"),
        "knn_top1": final["knn"]["pretrained"]["top1"],
        "knn_top1_random_init": final["knn"]["random_init"]["top1"],
        "correlation_mean_abs_diagonal": {"start": float(np.abs(np.diag(start)).mean()),
                                          "end": float(np.abs(np.diag(end)).mean())},
        "correlation_mean_abs_off_diagonal": {
            "start": float(np.abs(start[off_diagonal]).mean()),
            "end": float(np.abs(end[off_diagonal]).mean())},
        "curve": [{"epoch": r["step"] / steps_per_epoch,
                   "linear_top1": r["results"]["logreg"]["pretrained"]["top1"],
                   "knn_top1": r["results"]["knn"]["pretrained"]["top1"]} for r in curve],
    }
    with open(os.path.join(args.out, "summary.json"), "w") as f:
        json.dump(summary, f, indent=2)
    print(json.dumps({k: v for k, v in summary.items() if k != "curve"}, indent=2))


if __name__ == "__main__":
    main()
