"""Results of a pretraining run as figures and one JSON summary, for the README.

    python experiments/report.py --workdir=runs/fashion_mnist \\
        --out=experiments/results/fashion_mnist

Writes into --out:
  loss.png         the loss and its two terms (invariance; lambd x redundancy) over training
  correlation.png  the leading block of C on one training batch, at initialisation and at the end
  accuracy.png     logistic-regression probe and kNN top-1 at every retained checkpoint, with
                   the random-features baselines as horizontal lines
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

from bt_jax import (
    checkpoint,  # noqa: E402
    data,  # noqa: E402
    evaluate,  # noqa: E402
    parallel,  # noqa: E402
)
from bt_jax import state as state_lib  # noqa: E402
from bt_jax import step as step_lib  # noqa: E402
from bt_jax.metric_logging import read_metrics  # noqa: E402
from bt_jax.train import view_finisher, view_specs  # noqa: E402

CORRELATION_DIMS = 64


def plot_loss(records: list[dict], lambd: float, steps_per_epoch: int, path: str) -> None:
    rows = [r for r in records if "loss" in r]
    epochs = np.array([r["step"] for r in rows]) / steps_per_epoch
    fig, ax = plt.subplots(figsize=(6, 4))
    ax.plot(epochs, [r["loss"] for r in rows], label="loss")
    ax.plot(epochs, [r["invariance"] for r in rows], label="invariance  sum (1 - C_ii)^2")
    ax.plot(
        epochs, [lambd * r["redundancy"] for r in rows], label=f"{lambd} x redundancy  sum C_ij^2"
    )
    ax.set_yscale("log")
    ax.set_xlabel("epoch")
    ax.legend()
    ax.set_title("Barlow Twins loss")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def correlation_matrix(config, variables: dict, batch: dict) -> np.ndarray:
    """The leading block of C for one batch, training-mode BatchNorm (as the loss sees it): the
    trainer's own per-epoch picture (bt_jax.step.correlation_block) on one device."""
    mesh = parallel.device_mesh(jax.devices()[:1])
    finish_views = view_finisher(config)
    block = parallel.map_step(
        functools.partial(
            step_lib.correlation_block,
            model=state_lib.build_model(config),
            size=CORRELATION_DIMS,
            finish_views=finish_views,
        ),
        mesh,
        donate=False,
    )
    state = state_lib.TrainState(
        step=0,
        params=variables["params"],
        batch_stats=variables["batch_stats"],
        opt_state=None,
        probe_params={},
        probe_opt_state=None,
    )
    _, matrix = block(state, parallel.global_batch(batch, mesh), jax.random.key(0))
    return parallel.to_host(matrix)


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
    styles = {"random_init": ":", "random_init_bn": "--", "random_fan_in_bn": "-."}
    for protocol, name, color in (
        ("logreg", "linear probe (logreg)", "C0"),
        ("knn", "kNN (k=200)", "C1"),
    ):
        epochs = [r["step"] / steps_per_epoch for r in curve]
        values = [r["results"][protocol]["pretrained"]["top1"] for r in curve]
        ax.plot(epochs, np.array(values) * 100, "o-", color=color, label=name)
        for baseline, style in styles.items():
            if baseline in curve[0]["results"][protocol]:
                value = curve[0]["results"][protocol][baseline]["top1"]
                ax.axhline(
                    value * 100,
                    color=color,
                    linestyle=style,
                    label=f"{name}, {baseline.replace('_', ' ')}",
                )
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
    parser.add_argument(
        "--epochs", default="", help="comma-separated epochs to evaluate (default every checkpoint)"
    )
    args = parser.parse_args()
    os.makedirs(args.out, exist_ok=True)
    config = evaluate.load_run_config(args.workdir)
    source = data.load_source(config.data.dataset, config.data.data_dir or None)
    steps_per_epoch = data.steps_per_epoch(source, config.batch_size)

    records = read_metrics(args.workdir)
    plot_loss(records, config.loss.lambd, steps_per_epoch, os.path.join(args.out, "loss.png"))

    curve_path = os.path.join(args.workdir, "eval_checkpoints.json")
    if args.reevaluate or not os.path.exists(curve_path):
        steps = [int(e) * steps_per_epoch for e in args.epochs.split(",") if e] or None
        evaluate.evaluate_checkpoints(args.workdir, steps=steps)
    with open(curve_path) as f:
        curve = json.load(f)["checkpoints"]
    plot_accuracy(curve, steps_per_epoch, os.path.join(args.out, "accuracy.png"))

    batch = next(
        data.pretrain_batches(
            source,
            global_batch=config.batch_size,
            image_size=config.data.image_size,
            seed=config.seed,
            min_crop_scale=config.data.min_crop_scale,
            views=view_specs(config.data),
            photometric=config.data.photometric,
            process_index=0,
            process_count=1,
        )
    )
    model = state_lib.build_model(config, axis_name=None)
    initial = state_lib.run_once(
        functools.partial(
            state_lib.init_state, config, model, state_lib.build_optimizer(config, steps_per_epoch)
        )
    )
    start = correlation_matrix(config, state_lib.variables_of(initial, part=None), batch)
    last_step = curve[-1]["step"]
    end = correlation_matrix(
        config, checkpoint.read_variables(args.workdir, last_step, None), batch
    )
    plot_correlations(start, end, os.path.join(args.out, "correlation.png"))

    off_diagonal = ~np.eye(CORRELATION_DIMS, dtype=bool)
    final = curve[-1]["results"]
    summary = {
        "workdir": args.workdir,
        "dataset": config.data.dataset,
        "model": config.model.name,
        "width": config.model.width,
        "projector": config.model.projector,
        "batch_size": config.batch_size,
        "epochs": last_step / steps_per_epoch,
        "steps": last_step,
        # From the config written at the start to the last checkpoint (includes any downtime
        # of a resumed run).
        "wall_seconds": round(
            os.path.getmtime(os.path.join(args.workdir, "checkpoints", str(last_step)))
            - os.path.getmtime(os.path.join(args.workdir, "config_history"))
        ),
        "linear_top1": final["logreg"]["pretrained"]["top1"],
        "linear_top1_random_init": final["logreg"]["random_init"]["top1"],
        "linear_top1_raw_pixels": final["logreg"].get("raw_pixels", {}).get("top1"),
        **{
            f"linear_top1_{name}": final["logreg"][name]["top1"]
            for name in ("random_init_bn", "random_fan_in_bn")
            if name in final["logreg"]
        },
        "knn_top1": final["knn"]["pretrained"]["top1"],
        "knn_top1_random_init": final["knn"]["random_init"]["top1"],
        **{
            f"knn_top1_{name}": final["knn"][name]["top1"]
            for name in ("random_init_bn", "random_fan_in_bn")
            if name in final["knn"]
        },
        "correlation_mean_abs_diagonal": {
            "start": float(np.abs(np.diag(start)).mean()),
            "end": float(np.abs(np.diag(end)).mean()),
        },
        "correlation_mean_abs_off_diagonal": {
            "start": float(np.abs(start[off_diagonal]).mean()),
            "end": float(np.abs(end[off_diagonal]).mean()),
        },
        "curve": [
            {
                "epoch": r["step"] / steps_per_epoch,
                "linear_top1": r["results"]["logreg"]["pretrained"]["top1"],
                "knn_top1": r["results"]["knn"]["pretrained"]["top1"],
            }
            for r in curve
        ],
    }
    with open(os.path.join(args.out, "summary.json"), "w") as f:
        json.dump(summary, f, indent=2)
    print(json.dumps({k: v for k, v in summary.items() if k != "curve"}, indent=2))


if __name__ == "__main__":
    main()
