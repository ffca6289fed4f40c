"""The pretraining config: groups that mirror the constructors, and the checks run before anything.

Configs are data (big_vision style): each group is passed whole to what it configures,

    models.create_model(**config.model)          # backbone + projector
    optim.lars(**config.optim, global_batch=..., steps_per_epoch=..., num_epochs=...)
    loss.barlow_twins_loss(z_a, z_b, **config.loss)

and a recipe in ``experiments/configs/`` starts from :func:`get_config` and changes only what
differs. A recipe may not add keys: a typo fails loudly instead of being ignored. The embedded
default (scikit-learn's bundled digits, a width-16 ResNet-18) runs on a fresh offline machine.

:func:`validate` checks every key and every cross-key constraint that needs nothing but the
config; :func:`check_run` adds what needs the machine and the data (devices, dataset size). Both
run at the edge, before anything is built, compiled or written.
"""

from __future__ import annotations

import inspect
import json
import math
from typing import Any

import ml_collections
from flax import traverse_util

from bt_jax import errors

PARALLELISM = ("shard_map", "pmap")
DTYPES = ("float32", "bfloat16", "float16")

# Keys that must match between a workdir's run and a resumed one: they change the shapes of the
# state or the meaning of a step. Dotted paths; a group name stands for every key in it.
RESUME_KEYS = (
    "seed",
    "batch_size",
    "num_epochs",
    "model.name",
    "model.stem",
    "model.width",
    "model.zero_init_residual",
    "model.projector",
    "data.dataset",
    "data.data_dir",
    "data.image_size",
    "data.min_crop_scale",
    "data.blur_probabilities",
    "data.solarize_probabilities",
    "optim.warmup_epochs",
    "probe.enabled",
)


class ConfigError(errors.Error, ValueError):
    """A config value that cannot work; the message names the key and what to do."""


def _lars_defaults() -> dict[str, Any]:
    """The official LARS recipe: ``bt_jax.optim.lars``'s keyword defaults, written there only."""
    from bt_jax import optim  # optax: imported on use, the schema itself does not need it

    run_shaped = ("global_batch", "steps_per_epoch", "num_epochs")
    return {
        name: parameter.default
        for name, parameter in inspect.signature(optim.lars).parameters.items()
        if name not in run_shaped
    }


def get_config() -> ml_collections.ConfigDict:
    """The embedded default recipe: digits, ResNet-18 (width 16, cifar stem), minutes on 2 cores."""
    config = ml_collections.ConfigDict()
    config.seed = 0
    config.batch_size = 256  # global batch, over all devices and hosts
    config.num_epochs = 100
    config.max_steps = -1  # stop after this many steps (smoke runs); -1 = all epochs
    # The parallel step: jit(shard_map) over a device mesh, or pmap (bt_jax.parallel).
    config.parallelism = "shard_map"

    # bt_jax.data: the source and the two views.
    config.data = ml_collections.ConfigDict(
        dict(
            dataset="digits",  # digits | idx | folder | any tfds name (cifar10, imagenet2012, ...)
            data_dir="",  # tfds data_dir, IDX directory or image folder; "" = the source's default
            # Training crop side. The digits are 8x8: 16 px keeps the crops meaningful at a quarter
            # of the cost of 32 px (recipes for real data set their own).
            image_size=16,
            eval_resize=16,  # evaluation: resize the short side, then centre-crop image_size
            min_crop_scale=0.08,  # RandomResizedCrop lower area bound
            # Per view (A, B), the official recipe (from BYOL). Sigma ~ U(0.1, 2) px whatever the
            # image size, so small images may want less blur (solo-learn's CIFAR recipes use none).
            blur_probabilities=(1.0, 0.1),
            solarize_probabilities=(0.0, 0.2),
            # Where colour jitter, grayscale, blur and solarize run: "host" (tf.data) or "device"
            # (in the jitted step, BYOL's split); crop, flip and resize always run on the host.
            photometric="host",
        )
    )

    # bt_jax.models.create_model: backbone + projector.
    config.model = ml_collections.ConfigDict(
        dict(
            name="resnet18",
            stem="cifar",  # cifar: 3x3/1 conv, no pool; imagenet: 7x7/2 conv + max-pool
            width=16,  # 64 is the standard ResNet
            zero_init_residual=True,
            projector="512-512-512",
            dtype="float32",  # computation dtype; parameters and the loss stay float32
            # How convolutions run (bt_jax.models.conv): "xla"; "auto" is faster on CPUs at width 64
            # (per-tap kernel gradients), slower at width 16; the same values either way.
            conv="xla",
        )
    )

    # bt_jax.loss.barlow_twins_loss.
    config.loss = ml_collections.ConfigDict(dict(lambd=0.0051, method="auto"))

    # bt_jax.optim.lars: the official LARS recipe (rates are per 256 examples).
    config.optim = ml_collections.ConfigDict(_lars_defaults())

    # The online linear probe (bt_jax.probe): a classifier on stop-gradient representations of
    # view A with its own SGD, test accuracy logged every epoch. Needs labels.
    config.probe = ml_collections.ConfigDict(dict(enabled=True, learning_rate=0.1))

    # Evaluation protocols (bt_jax.evaluate).
    config.eval = ml_collections.ConfigDict(
        dict(
            at_end=True,  # the main job ends with the quick linear probe and kNN
            # ... beside the baselines (bt_jax.evaluate.baselines): three random-init backbones
            # and raw pixels, each evaluated as the trained one (about 4x its cost).
            baselines=True,
            # A labelled dataset for evaluation when pretraining reads unlabelled images;
            # "" = the pretraining dataset. Same image size and transform.
            dataset="",
            data_dir="",
            linear_epochs=100,  # the paper's linear protocol
            linear_learning_rate=0.3,
            linear_weight_decay=1e-6,
            linear_batch_size=256,
            knn_k=200,
            knn_temperature=0.1,
            finetune_epochs=20,  # the paper's semi-supervised protocol
            finetune_backbone_learning_rate=0.002,
            finetune_head_learning_rate=0.5,
            finetune_batch_size=256,
            label_fractions=(0.01, 0.1),
        )
    )

    # Checkpoints (bt_jax.checkpoint) and logs (bt_jax.metric_logging).
    config.checkpoint = ml_collections.ConfigDict(dict(every_steps=200, keep=2))
    config.logging = ml_collections.ConfigDict(
        dict(
            every_steps=10,
            correlation_image_dims=128,  # leading dimensions of C drawn every epoch
        )
    )
    return config


# ---------------------------------------------------------------------------------------------
# Checks.


def flat_items(config: ml_collections.ConfigDict) -> dict[str, Any]:
    """Every leaf of the config by its dotted key, e.g. ``{"model.width": 16, ...}``."""
    return traverse_util.flatten_dict(config.to_dict(), sep=".")


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _is_number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def validate(config: ml_collections.ConfigDict) -> None:
    """Checks every key and cross-key constraint; raises ConfigError naming the key.

    Needs nothing but the config: no devices, no data. See :func:`check_run` for those.
    """
    # Imported here: the schema itself needs none of them (the evaluation CLI reads configs).
    from bt_jax import loss, models, optim
    from bt_jax.data import views

    unknown = sorted(set(flat_items(config)) - set(flat_items(get_config())))
    if unknown:
        raise ConfigError(
            f"Unknown config key(s) {unknown}. Check the spelling in your config file or "
            "--config.KEY flag; `python -m bt_jax.train --helpfull` lists every key."
        )
    values = flat_items(config)

    def require(ok: bool, key: str, what: str) -> None:
        if not ok:
            raise ConfigError(f"config.{key}={values[key]!r}: {what}")

    for key in (
        "batch_size",
        "num_epochs",
        "data.image_size",
        "data.eval_resize",
        "model.width",
        "checkpoint.every_steps",
        "checkpoint.keep",
        "logging.every_steps",
        "logging.correlation_image_dims",
        "eval.linear_epochs",
        "eval.linear_batch_size",
        "eval.knn_k",
        "eval.finetune_epochs",
        "eval.finetune_batch_size",
    ):
        require(_is_int(values[key]) and values[key] > 0, key, "must be a positive integer.")
    require(
        _is_int(values["seed"]) and values["seed"] >= 0, "seed", "must be a non-negative integer."
    )
    require(
        _is_int(values["max_steps"]) and (values["max_steps"] == -1 or values["max_steps"] > 0),
        "max_steps",
        "must be -1 (train all epochs) or a positive number of steps.",
    )
    # Finite and > 0: a rate of 0 trains nothing, silently.
    for key in (
        "optim.learning_rate_weights",
        "optim.learning_rate_biases",
        "probe.learning_rate",
        "eval.linear_learning_rate",
        "eval.knn_temperature",
        "eval.finetune_backbone_learning_rate",
        "eval.finetune_head_learning_rate",
    ):
        require(
            _is_number(values[key]) and math.isfinite(values[key]) and values[key] > 0,
            key,
            "must be a finite number > 0.",
        )
    for key in ("loss.lambd", "eval.linear_weight_decay"):
        require(
            _is_number(values[key]) and math.isfinite(values[key]) and values[key] >= 0,
            key,
            "must be a finite number >= 0"
            + (" (the official value is 0.0051)." if key == "loss.lambd" else "."),
        )
    require(values["loss.method"] in loss.METHODS, "loss.method", f"must be one of {loss.METHODS}.")
    require(values["parallelism"] in PARALLELISM, "parallelism", f"must be one of {PARALLELISM}.")
    require(values["model.dtype"] in DTYPES, "model.dtype", f"must be one of {DTYPES}.")
    require(
        values["model.conv"] in models.CONV_FORMS,
        "model.conv",
        f"must be one of {models.CONV_FORMS}.",
    )
    require(
        str(values["model.name"]).lower() in models.BACKBONES,
        "model.name",
        f"unknown backbone; known: {', '.join(models.BACKBONES)}.",
    )
    require(values["model.stem"] in models.STEMS, "model.stem", f"must be one of {models.STEMS}.")
    require(
        values["data.photometric"] in views.PHOTOMETRIC_MODES,
        "data.photometric",
        f"must be one of {views.PHOTOMETRIC_MODES}.",
    )
    require(
        _is_number(values["data.min_crop_scale"]) and 0 < values["data.min_crop_scale"] <= 1,
        "data.min_crop_scale",
        "must be in (0, 1].",
    )
    require(
        values["data.image_size"] >= views.MIN_IMAGE_SIZE,
        "data.image_size",
        f"must be at least {views.MIN_IMAGE_SIZE} px (the blur kernel's reflect padding needs it); "
        "small images are upsampled by the crop's resize.",
    )
    require(
        values["data.eval_resize"] >= values["data.image_size"],
        "data.eval_resize",
        f"must be >= data.image_size ({values['data.image_size']}): evaluation resizes the "
        "short side to it, then centre-crops image_size.",
    )
    for key in ("data.blur_probabilities", "data.solarize_probabilities"):
        probabilities = values[key]
        require(
            isinstance(probabilities, (tuple, list))
            and len(probabilities) == 2
            and all(_is_number(p) and 0 <= p <= 1 for p in probabilities),
            key,
            "must be two probabilities in [0, 1], for view A and view B.",
        )
    fractions = values["eval.label_fractions"]
    require(
        isinstance(fractions, (tuple, list))
        and len(fractions) > 0
        and all(_is_number(f) and 0 < f <= 1 for f in fractions),
        "eval.label_fractions",
        "must be a non-empty list of fractions in (0, 1], e.g. (0.01, 0.1).",
    )
    require(
        bool(values["eval.dataset"]) or not values["eval.data_dir"],
        "eval.data_dir",
        "is set but eval.dataset is not: name the labelled dataset it holds "
        "(--config.eval.dataset=folder, idx or a tfds name).",
    )
    try:
        models.parse_spec(values["model.projector"])
    except ValueError as error:
        raise ConfigError(
            f"config.model.projector={values['model.projector']!r}: {error}"
        ) from None
    try:  # The optimiser's own checks (momentum, weight decay, trust coefficient, ...).
        optim.lars(
            **config.optim,
            global_batch=config.batch_size,
            steps_per_epoch=1,
            num_epochs=config.num_epochs,
        )
    except ValueError as error:
        raise ConfigError(f"config.optim: {error}") from None


def check_run(config: ml_collections.ConfigDict, *, device_count: int, num_train: int) -> None:
    """The checks that need the machine and the data: ConfigError naming the key."""
    batch = config.batch_size
    if batch % device_count:
        lower = max(device_count, batch // device_count * device_count)
        raise ConfigError(
            f"config.batch_size={batch}: the global batch must divide evenly over the "
            f"{device_count} devices; use a multiple of {device_count}, e.g. {lower}."
        )
    if batch > num_train:
        raise ConfigError(
            f"config.batch_size={batch}: larger than the {num_train} training examples of "
            f"{config.data.dataset!r}, so an epoch has no full batch; use at most {num_train}."
        )


def set_dotted(config: ml_collections.ConfigDict, key: str, value: Any) -> None:
    """``config[a][b] = value`` for ``key="a.b"``; lists become tuples where the schema has one."""
    *parents, leaf = key.split(".")
    node = config
    for part in parents:
        node = node[part]
    if isinstance(node[leaf], tuple) and isinstance(value, list):
        value = tuple(value)
    node[leaf] = value


def to_json(config: ml_collections.ConfigDict) -> str:
    return json.dumps(config.to_dict(), indent=2, sort_keys=True)


def resume_identity(config: ml_collections.ConfigDict) -> dict[str, Any]:
    """The values of :data:`RESUME_KEYS`, as JSON holds them (tuples become lists)."""
    values = flat_items(config)
    return json.loads(json.dumps({key: values[key] for key in RESUME_KEYS}))
