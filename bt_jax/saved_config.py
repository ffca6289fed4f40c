"""Saved configs (``config.json``, a checkpoint's record) back into today's schema: JSON in
either layout, the grouped one or the flat one of runs written before the groups existed."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import ml_collections
from flax import traverse_util

from bt_jax import config as config_lib

# Where each key of the old flat config went.
LEGACY_KEYS = {
    "dataset": "data.dataset",
    "data_dir": "data.data_dir",
    "image_size": "data.image_size",
    "eval_resize": "data.eval_resize",
    "min_crop_scale": "data.min_crop_scale",
    "blur_probabilities": "data.blur_probabilities",
    "solarize_probabilities": "data.solarize_probabilities",
    "model": "model.name",
    "stem": "model.stem",
    "width": "model.width",
    "zero_init_residual": "model.zero_init_residual",
    "projector": "model.projector",
    "dtype": "model.dtype",
    "lambd": "loss.lambd",
    "loss_method": "loss.method",
    "learning_rate_weights": "optim.learning_rate_weights",
    "learning_rate_biases": "optim.learning_rate_biases",
    "weight_decay": "optim.weight_decay",
    "momentum": "optim.momentum",
    "trust_coefficient": "optim.trust_coefficient",
    "warmup_epochs": "optim.warmup_epochs",
    "online_probe": "probe.enabled",
    "probe_learning_rate": "probe.learning_rate",
    "checkpoint_every_steps": "checkpoint.every_steps",
    "keep_checkpoints": "checkpoint.keep",
    "log_every_steps": "logging.every_steps",
    "correlation_image_dims": "logging.correlation_image_dims",
}


def is_legacy(saved: Mapping[str, Any]) -> bool:
    """Whether a saved config dict is in the flat layout (``"model": "resnet18"``)."""
    return isinstance(saved.get("model"), str)


def from_legacy(saved: Mapping[str, Any]) -> dict[str, Any]:
    """A flat-layout saved config as the grouped layout (nested dicts)."""
    grouped: dict[str, Any] = {}
    for key, value in saved.items():
        dotted = LEGACY_KEYS.get(key, key)
        node = grouped
        *parents, leaf = dotted.split(".")
        for part in parents:
            node = node.setdefault(part, {})
        if isinstance(value, Mapping) and isinstance(node.get(leaf), dict):
            node[leaf].update(value)
        else:
            node[leaf] = value
    return grouped


def from_saved(saved: Mapping[str, Any], *, where: str) -> ml_collections.ConfigDict:
    """A saved config (either layout) over today's defaults.

    Keys the run has and today's schema does not (removed since) are errors naming them; keys
    the run lacks (added since) keep today's defaults.
    """
    saved = from_legacy(saved) if is_legacy(saved) else saved
    config = config_lib.get_config()
    defaults = config_lib.flat_items(config)
    for key, value in traverse_util.flatten_dict(dict(saved), sep=".").items():
        if key not in defaults:
            raise config_lib.ConfigError(
                f"{where} has config.{key}, which this version of bt_jax does not know. Use "
                "the bt_jax version that wrote the run, or remove the key from the file."
            )
        try:
            config_lib.set_dotted(config, key, value)
        except (TypeError, ValueError) as error:
            raise config_lib.ConfigError(
                f"{where}: config.{key}={value!r} does not fit the schema ({error})."
            ) from None
    return config
