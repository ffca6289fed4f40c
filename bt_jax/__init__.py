"""bt_jax: Barlow Twins (Zbontar et al., ICML 2021) in JAX/Flax.

The public API:

    from bt_jax import barlow_twins_loss          # the pure, multi-device-exact loss
    from bt_jax import load_backbone              # a pretrained backbone for downstream use
    from bt_jax import load_model                 # backbone + projector, to continue pretraining

Names load on first use (PEP 562): ``python -m bt_jax.train`` imports this package before its
``__main__`` installs the signal handlers, so importing it must not load JAX (a Ctrl-C while
JAX loads is then one line, not a traceback), and the loss alone needs neither Flax models nor
checkpoint libraries.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

__version__ = "0.1.0"

# name -> module that defines it.
_PUBLIC = {
    "BarlowTwinsTerms": "bt_jax.loss",
    "LossError": "bt_jax.loss",
    "barlow_twins_loss": "bt_jax.loss",
    "barlow_twins_terms": "bt_jax.loss",
    "cross_correlation": "bt_jax.loss",
    "Error": "bt_jax.errors",
    "load_backbone": "bt_jax.checkpoint",
    "load_model": "bt_jax.checkpoint",
}

if TYPE_CHECKING:  # for type checkers and IDEs; at run time the names load on first use
    from bt_jax.checkpoint import load_backbone, load_model
    from bt_jax.errors import Error
    from bt_jax.loss import (
        BarlowTwinsTerms,
        LossError,
        barlow_twins_loss,
        barlow_twins_terms,
        cross_correlation,
    )


def __getattr__(name: str) -> Any:
    if name in _PUBLIC:
        value = getattr(importlib.import_module(_PUBLIC[name]), name)
        globals()[name] = value
        return value
    raise AttributeError(f"module 'bt_jax' has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(_PUBLIC))


__all__ = sorted(_PUBLIC)
