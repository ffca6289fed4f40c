"""bt_jax: Barlow Twins (Zbontar et al., ICML 2021) in JAX/Flax.

The public API:

    from bt_jax import barlow_twins_loss          # the pure, multi-device-exact loss
    from bt_jax import load_backbone              # a pretrained backbone for downstream use
    from bt_jax import load_model                 # backbone + projector, to continue pretraining
"""

from bt_jax.errors import Error
from bt_jax.loss import BarlowTwinsTerms
from bt_jax.loss import LossError
from bt_jax.loss import barlow_twins_loss
from bt_jax.loss import barlow_twins_terms
from bt_jax.loss import cross_correlation

__version__ = "0.1.0"


def load_backbone(path: str, **overrides):
    """``(module, variables)`` of a backbone exported by ``python -m bt_jax.train``.

    Imported lazily: the loss alone needs neither Flax models nor checkpoint libraries.
    See :func:`bt_jax.checkpoint.load_backbone`.
    """
    from bt_jax.checkpoint import load_backbone as _load_backbone

    return _load_backbone(path, **overrides)


def load_model(path: str, **overrides):
    """``(BarlowTwinsModel, variables)``, backbone and projector, of a run's ``model.msgpack``.

    Imported lazily, as :func:`load_backbone`. See :func:`bt_jax.checkpoint.load_model`.
    """
    from bt_jax.checkpoint import load_model as _load_model

    return _load_model(path, **overrides)


__all__ = [
    "BarlowTwinsTerms",
    "Error",
    "LossError",
    "barlow_twins_loss",
    "barlow_twins_terms",
    "cross_correlation",
    "load_backbone",
    "load_model",
]
