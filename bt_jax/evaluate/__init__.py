"""Evaluation protocols for a pretrained backbone, each beside the same numbers for baselines.

    python -m bt_jax.evaluate --workdir=runs/default --protocol=knn
    python -m bt_jax.evaluate --workdir=runs/default --protocol=linear \\
        --config.eval.linear_epochs=10

Protocols (``config.eval.*`` sets their hyperparameters; the defaults are the published ones),
one module each, registered by name: ``linear`` (the paper's), ``logreg`` (the fast linear
probe), ``knn`` (k = 200, T = 0.1), ``finetune`` (1% and 10% labels). Baselines
(``bt_jax.evaluate.baselines``): the run's random-init backbone, the same with recomputed
BatchNorm statistics, a fan-in-initialised random network, and raw pixels.

Light on purpose (names imported on first use): ``python -m bt_jax.evaluate`` imports this
package before its ``__main__``, which installs the signal handlers first.
"""

from __future__ import annotations

import importlib
from typing import Any

_NAMES = {
    "evaluate": "run",
    "evaluate_checkpoints": "run",
    "at_end": "run",
    "labelled_source": "run",
    "load_run_config": "run",
    "load_variables": "run",
    "with_baselines": "run",
    "make_context": "run",
    "ArchitectureMismatchError": "run",
    "EvaluationError": "context",
    "UnlabelledSourceError": "context",
    "Context": "context",
    "QUICK": "context",
    "topk_accuracy": "context",
    "summary_line": "results",
    "results_path": "results",
    "knn_scores": "knn",
    "knn_protocol": "knn",
    "logreg_protocol": "logreg",
    "label_subset": "finetune",
}
_PROTOCOL_MODULES = ("knn", "logreg", "linear", "finetune")


def protocols() -> dict:
    """{name: protocol function}, every protocol module imported (they register on import)."""
    for module in _PROTOCOL_MODULES:
        importlib.import_module(f"bt_jax.evaluate.{module}")
    from bt_jax.evaluate.context import PROTOCOLS

    return PROTOCOLS


def __getattr__(name: str) -> Any:
    if name in _NAMES:
        protocols()
        return getattr(importlib.import_module(f"bt_jax.evaluate.{_NAMES[name]}"), name)
    raise AttributeError(f"module 'bt_jax.evaluate' has no attribute {name!r}")


__all__ = sorted(_NAMES) + ["protocols"]
