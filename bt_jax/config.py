"""The pretraining config: every key with its default, and checks that run before anything compiles.

Configs are data: a recipe in ``experiments/configs/`` starts from :func:`get_config` and changes
values; it may not add keys, so a typo fails loudly instead of being ignored. The embedded
default (scikit-learn's bundled digits, a width-16 ResNet-18) runs on a fresh offline machine.
"""

from __future__ import annotations

import jax.numpy as jnp
import ml_collections

# Keys that must match between a workdir's saved config and a resumed run: they change the
# shapes of the state or the meaning of a step.
RESUME_KEYS = (
    "seed", "dataset", "data_dir", "image_size", "min_crop_scale", "blur_probabilities",
    "solarize_probabilities", "batch_size", "num_epochs", "model", "stem", "width",
    "zero_init_residual", "projector", "warmup_epochs",
)

PARALLELISM = ("shard_map", "pmap")
DTYPES = ("float32", "bfloat16", "float16")


def get_config() -> ml_collections.ConfigDict:
    """The embedded default recipe: digits, ResNet-18 (width 16, cifar stem), minutes on 2 cores."""
    config = ml_collections.ConfigDict()
    config.seed = 0

    # Data (bt_jax.data).
    config.dataset = "digits"  # digits | idx | folder | any tfds name (cifar10, imagenet2012, ...)
    config.data_dir = ""  # tfds data_dir, IDX directory or image folder; "" = the source's default
    # Training crop side in pixels. The digits are 8x8: 16 px keeps the crops meaningful at a
    # quarter of the cost of 32 px (recipes for real data set their own).
    config.image_size = 16
    config.min_crop_scale = 0.08  # RandomResizedCrop lower area bound
    # Per view (A, B); the official recipe (from BYOL). Sigma ~ U(0.1, 2) px whatever the image
    # size, so small images may want less blur (solo-learn's CIFAR recipes use none).
    config.blur_probabilities = (1.0, 0.1)
    config.solarize_probabilities = (0.0, 0.2)
    config.eval_resize = 16  # evaluation: resize the short side, then centre-crop image_size
    config.batch_size = 256  # global batch, over all devices and hosts
    config.num_epochs = 100
    config.max_steps = -1  # stop after this many steps (for smoke runs); -1 = all epochs

    # Model (bt_jax.models).
    config.model = "resnet18"
    config.stem = "cifar"  # cifar: 3x3/1 conv, no pool; imagenet: 7x7/2 conv + max-pool
    config.width = 16  # 64 is the standard ResNet
    config.zero_init_residual = True
    config.projector = "512-512-512"
    config.dtype = "float32"  # computation dtype; parameters and the loss stay float32

    # Loss (bt_jax.loss).
    config.lambd = 0.0051
    config.loss_method = "auto"

    # Optimiser (bt_jax.optim): the official LARS recipe.
    config.learning_rate_weights = 0.2  # times global_batch / 256
    config.learning_rate_biases = 0.0048  # times global_batch / 256
    config.weight_decay = 1.5e-6
    config.momentum = 0.9
    config.trust_coefficient = 0.001
    config.warmup_epochs = 10

    # The parallel step: jit(shard_map) over a device mesh, or pmap (bt_jax.train).
    config.parallelism = "shard_map"

    # Online linear probe during pretraining (bt_jax.train): a classifier on stop-gradient
    # representations of view A, its own SGD, accuracy logged every epoch. Needs labels.
    config.online_probe = True
    config.probe_learning_rate = 0.1

    # Evaluation protocols (bt_jax.evaluate).
    config.eval = ml_collections.ConfigDict()
    config.eval.at_end = True  # the main job ends with the quick linear probe and kNN
    config.eval.linear_epochs = 100  # the paper's linear protocol
    config.eval.linear_learning_rate = 0.3
    config.eval.linear_weight_decay = 1e-6
    config.eval.linear_batch_size = 256
    config.eval.knn_k = 200
    config.eval.knn_temperature = 0.1
    config.eval.finetune_epochs = 20  # the paper's semi-supervised protocol
    config.eval.finetune_backbone_learning_rate = 0.002
    config.eval.finetune_head_learning_rate = 0.5
    config.eval.finetune_batch_size = 256
    config.eval.label_fractions = (0.01, 0.1)

    # Checkpoints and logging (bt_jax.train).
    config.checkpoint_every_steps = 200
    config.keep_checkpoints = 2
    config.log_every_steps = 10
    config.correlation_image_dims = 128  # leading dimensions of C drawn every epoch
    return config


class ConfigError(ValueError):
    """A config value that cannot work; the message names the key and what to do."""


def validate(config: ml_collections.ConfigDict, *, device_count: int) -> None:
    """Checks a config against the schema and the machine; raises ConfigError naming the key."""
    # Imported here: these modules pull in TensorFlow / Flax, which the schema itself does not need.
    from bt_jax import models
    from bt_jax.loss import METHODS

    reference = get_config()
    unknown = sorted(set(config.keys()) - set(reference.keys()))
    if unknown:
        raise ConfigError(
            f"Unknown config key(s) {unknown}. Known keys: {sorted(reference.keys())}. "
            "Check the spelling in your config file or --config.KEY flag.")

    def require(ok: bool, key: str, what: str) -> None:
        if not ok:
            raise ConfigError(f"config.{key}={config[key]!r}: {what}")

    for key in ("batch_size", "num_epochs", "image_size", "width", "log_every_steps",
                "checkpoint_every_steps", "keep_checkpoints", "correlation_image_dims"):
        require(isinstance(config[key], int) and config[key] > 0, key, "must be a positive integer.")
    require(config.batch_size % device_count == 0, "batch_size",
            f"the global batch must divide evenly over the {device_count} devices; use a "
            f"multiple of {device_count}.")
    require(0 <= config.warmup_epochs <= config.num_epochs, "warmup_epochs",
            f"must be between 0 and num_epochs ({config.num_epochs}).")
    require(config.max_steps == -1 or config.max_steps > 0, "max_steps",
            "must be -1 (train all epochs) or a positive number of steps.")
    require(config.lambd >= 0, "lambd", "must be >= 0 (the official value is 0.0051).")
    require(config.loss_method in METHODS, "loss_method", f"must be one of {METHODS}.")
    require(config.parallelism in PARALLELISM, "parallelism", f"must be one of {PARALLELISM}.")
    require(config.dtype in DTYPES, "dtype", f"must be one of {DTYPES}.")
    require(0 < config.min_crop_scale <= 1, "min_crop_scale", "must be in (0, 1].")
    for key in ("blur_probabilities", "solarize_probabilities"):
        require(len(config[key]) == 2 and all(0 <= p <= 1 for p in config[key]), key,
                "must be two probabilities, for view A and view B.")
    require(config.model.lower() in models.BACKBONES, "model",
            f"unknown backbone; known: {', '.join(models.BACKBONES)}.")
    require(config.stem in models.STEMS, "stem", f"must be one of {models.STEMS}.")
    try:
        models.parse_spec(config.projector)
    except ValueError as error:
        raise ConfigError(f"config.projector={config.projector!r}: {error}") from None


def compute_dtype(config: ml_collections.ConfigDict):
    return jnp.dtype(config.dtype)
