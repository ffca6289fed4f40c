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


def _top1_by_subset(result: Any) -> dict[str, float]:
    """{"": top1} for a flat result, {"1%": top1, "10%": top1} for one with label subsets, {}
    for one without an accuracy (e.g. a skipped baseline)."""
    if not isinstance(result, Mapping):
        return {}
    if "top1" in result:
        return {"": result["top1"]}
    return {k: v["top1"] for k, v in result.items() if isinstance(v, Mapping) and "top1" in v}


def summary_line(results: Mapping[str, Mapping[str, Any]]) -> str:
    """ "linear probe (logreg) top-1 91.2% (random init 62.0%, ...) | kNN top-1 ..." from
    {protocol: {"pretrained": {...}, "random_init": {...}, ...}}; a protocol with label
    subsets ({"pretrained": {"1%": {...}, "10%": {...}}, ...}) gives one part per subset."""
    parts = []
    for protocol, settings in results.items():
        top1 = {setting: _top1_by_subset(result) for setting, result in settings.items()}
        for subset, value in top1.get("pretrained", {}).items():
            others = [
                f"{setting.replace('_', ' ')} {by_subset[subset]:.1%}"
                for setting, by_subset in top1.items()
                if setting != "pretrained" and subset in by_subset
            ]
            name = f"{NAMES.get(protocol, protocol)}{f' {subset}' if subset else ''}"
            text = f"{name} top-1 {value:.1%}"
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
