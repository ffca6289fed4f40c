"""The embedded default recipe: `python -m bt_jax.train` with no flags runs this into
./runs/default.

Scikit-learn's bundled digits (no download), a width-16 ResNet-18 with the cifar stem, the official
LARS recipe; minutes on 2 CPU cores. The schema and defaults live in `bt_jax/config.py`.
"""

from bt_jax.config import get_config  # noqa: F401
