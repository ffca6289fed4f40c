"""TensorFlow for tf.data only: every bt_jax module that needs TF imports it from here.

Hides accelerators from TF before it initialises them, since JAX owns them (TF would otherwise
reserve GPU memory). Import this module lazily: the train step must not need TensorFlow.
"""

import tensorflow as tf

try:
    tf.config.set_visible_devices([], "GPU")
except RuntimeError:  # TF already initialised its devices (imported and used elsewhere first)
    pass

__all__ = ["tf"]
