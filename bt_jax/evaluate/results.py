"""Evaluation results: the one-line summary, TensorBoard scalar names, and the files written."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import flax
import jax
from etils import epath

from bt_jax import files, metric_logging

NAMES = {
    "logreg": "linear probe (logreg)",
    "knn": "kNN",
    "linear": "linear",
    "finetune": "fine-tune",
}


def summary_line(results: Mapping[str, Mapping[str, Any]]) -> str:
    """ "linear probe (logreg) top-1 91.2% (random init 62.0%, ...) | kNN top-1 ..." from
    {protocol: {"pretrained": {...}, "random_init": {...}, ...}}; a protocol with label
    subsets ({"pretrained": {"1%": {...}, "10%": {...}}, ...}) gives one part per subset."""
    parts = []
    for protocol, settings in results.items():
        pretrained = settings.get("pretrained", {})
        subsets = {"": None} if "top1" in pretrained else dict.fromkeys(pretrained)
        for subset in subsets:

            def top1(value, subset=subset):
                value = value.get(subset) if subset else value
                return value.get("top1") if isinstance(value, Mapping) else None

            if top1(pretrained) is None:
                continue
            name = f"{NAMES.get(protocol, protocol)}{f' {subset}' if subset else ''}"
            others = [
                f"{setting.replace('_', ' ')} {top1(value):.1%}"
                for setting, value in settings.items()
                if setting != "pretrained"
                and isinstance(value, Mapping)
                and top1(value) is not None
            ]
            text = f"{name} top-1 {top1(pretrained):.1%}"
            parts.append(text + (f" ({', '.join(others)})" if others else ""))
    return " | ".join(parts)


def scalars(protocol: str, results: Mapping[str, Mapping[str, Any]]) -> dict[str, float]:
    """eval/<protocol>[_<subset>]_top<k>[_<setting>] for every accuracy in results."""
    values = {}
    for setting, result in results.items():
        suffix = "" if setting == "pretrained" else f"_{setting}"
        flat = flax.traverse_util.flatten_dict(dict(result), sep="_")
        for key, value in flat.items():
            if key.split("_")[-1].startswith("top") and isinstance(value, float):
                values[f"eval/{protocol}_{key.replace('%', 'pct')}{suffix}"] = value
    return values


def results_path(workdir: epath.PathLike, protocol: str) -> epath.Path:
    return epath.Path(workdir) / f"eval_{protocol}.json"


def write(
    workdir: epath.PathLike,
    name: str,
    record: dict,
    step: int | None,
    tensorboard: Mapping[str, float],
) -> None:
    """``WORKDIR/eval_<name>.json`` and the scalars in TensorBoard (process 0 only)."""
    if jax.process_index() != 0:
        return
    files.write_json(results_path(workdir, name), record)
    if tensorboard:
        metric_logging.write_scalars(workdir, 0 if step is None else step, tensorboard)
