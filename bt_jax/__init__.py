"""bt_jax: Barlow Twins (Zbontar et al., ICML 2021) in JAX/Flax."""

from bt_jax.loss import BarlowTwinsTerms
from bt_jax.loss import barlow_twins_loss
from bt_jax.loss import barlow_twins_terms
from bt_jax.loss import cross_correlation

__version__ = "0.1.0"

__all__ = [
    "BarlowTwinsTerms",
    "barlow_twins_loss",
    "barlow_twins_terms",
    "cross_correlation",
]
