"""Barlow Twins pretraining (``python -m bt_jax.train``; the loop is ``bt_jax.train.loop``).

    python -m bt_jax.train                                  # the embedded default -> ./runs/default
    python -m bt_jax.train --config=experiments/configs/cifar10_resnet18.py --workdir=runs/c10 \\
        --config.batch_size=512
    python -m bt_jax.train --distributed --workdir=gs://bucket/runs/r1 ...   # on every pod host

Light on purpose: ``python -m bt_jax.train`` imports this package before its ``__main__``,
which installs the signal handlers before JAX and TensorFlow load (a Ctrl-C while they load is
then one line, not a traceback). The loop's names are imported on first use.
"""

from __future__ import annotations

from typing import Any

_LOOP_NAMES = (
    "Run",
    "Stopped",
    "check",
    "prefetch",
    "train_and_evaluate",
    "view_finisher",
    "view_specs",
)


def __getattr__(name: str) -> Any:
    if name in _LOOP_NAMES:
        from bt_jax.train import loop

        return getattr(loop, name)
    raise AttributeError(f"module 'bt_jax.train' has no attribute {name!r}")


__all__ = list(_LOOP_NAMES)
