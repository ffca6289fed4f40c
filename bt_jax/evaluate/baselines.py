"""Baselines beside every result: what the same architecture scores without pretraining.

* ``random_init``: the run's own step-0 backbone (``bt_jax.state.init_state`` from the run's
  seed: torchvision's initialisation, zero-init residual as configured), with its initial
  BatchNorm statistics (0 / 1) in inference mode.
* ``random_init_bn``: the same weights with the BatchNorm statistics recomputed on training
  images (a training-mode pass over :data:`RECOMPUTE_BATCHES` batches, no gradient): inference
  then normalises as the network was initialised to, which random features need.
* ``random_fan_in_bn``: the strongest random-features baseline found for these ResNets: every
  conv kernel drawn with Flax's default fan-in initialisation (LeCun normal, variance 1/fan_in),
  every BatchNorm scale 1 (no zero-init residual: each block contributes), statistics
  recomputed as above.
* ``raw_pixels`` (logreg only): the evaluation-transform pixels themselves.

:func:`recompute_batch_stats` is also offered for any checkpoint (``--recompute_bn``).
"""

from __future__ import annotations

import functools
import json
from collections.abc import Callable
from typing import Any

import flax
import jax
import jax.numpy as jnp
import numpy as np
import optax

from bt_jax import data, features, parallel, saved_config
from bt_jax import state as state_lib
from bt_jax.data import photometric
from bt_jax.evaluate.context import Context
from bt_jax.evaluate.logreg import logreg_protocol

RECOMPUTE_BATCHES = 60  # training batches of 256 for BatchNorm statistics
FAN_IN_SALT = 0xFA41
# Raw pixels of a large dataset (ImageNet: 1.28M x 150k floats) cannot be held in memory: the
# baseline is skipped, with a note in the results, above this many bytes of train pixels.
RAW_PIXELS_MAX_BYTES = 4 * 2**30
BASELINES = ("random_init", "random_init_bn", "random_fan_in_bn")


def _init_backbone(config) -> dict:
    model = state_lib.build_model(config, axis_name=None)
    state = state_lib.init_state(config, model, optax.identity())
    return state_lib.variables_of(state)


@functools.lru_cache(maxsize=2)
def _cached_init(fields: str) -> dict:
    config = saved_config.from_saved(json.loads(fields), where="the run's config")
    return jax.device_get(state_lib.run_once(functools.partial(_init_backbone, config)))


def random_init(config) -> dict:
    """The run's step-0 backbone: {"params", "batch_stats"}, numpy (cached per architecture)."""
    fields = {
        "seed": config.seed,
        "model": config.model.to_dict(),
        "data": {"image_size": config.data.image_size},
    }
    return _cached_init(json.dumps(fields, sort_keys=True))


def fan_in_init(config) -> dict:
    """The backbone with LeCun-normal (fan-in) conv kernels and every BatchNorm scale 1."""
    variables = random_init(config)
    flat = flax.traverse_util.flatten_dict(variables["params"])
    key = jax.random.fold_in(jax.random.key(config.seed), FAN_IN_SALT)
    initializer = jax.nn.initializers.lecun_normal()
    # Each kernel keyed by its index in the sorted parameter paths; drawn in one program.
    kernels = {
        path: (i, value.shape)
        for i, (path, value) in enumerate(sorted(flat.items()))
        if path[-1] == "kernel" and np.ndim(value) == 4
    }
    drawn = state_lib.run_once(
        lambda: {
            path: initializer(jax.random.fold_in(key, i), shape)
            for path, (i, shape) in kernels.items()
        }
    )
    for path, value in flat.items():
        if path in kernels:
            flat[path] = np.asarray(drawn[path])
        elif path[-1] == "scale":
            flat[path] = np.ones_like(value)
    return {
        "params": flax.traverse_util.unflatten_dict(flat),
        "batch_stats": variables["batch_stats"],
    }


def recompute_batch_stats(
    context: Context, variables: Any, num_batches: int = RECOMPUTE_BATCHES
) -> dict:
    """``variables`` with every BatchNorm's running statistics replaced by their average over
    ``num_batches`` full training batches (evaluation transform; a training-mode pass over the
    global batch, no gradient). PyTorch's cumulative average (momentum=None), exactly: each pass
    starts from zero statistics, so the update 0.1 * batch statistic is read off directly."""
    mesh = context.mesh
    replicated = parallel.replicated(mesh)

    @functools.partial(jax.jit, out_shardings=replicated)
    def batch_statistics(params, zeros, images):
        _, updates = context.module.apply(
            {"params": params, "batch_stats": zeros},
            photometric.normalize(images),
            train=True,
            mutable=["batch_stats"],
        )
        # Flax: running = momentum * running + (1 - momentum) * batch, momentum 0.9, from 0.
        return jax.tree.map(lambda x: x / 0.1, updates["batch_stats"])

    params = parallel.replicate(variables["params"], mesh)
    zeros = parallel.replicate(jax.tree.map(np.zeros_like, variables["batch_stats"]), mesh)
    batch_size = features.eval_batch_size(mesh.size)
    full_batches = min(num_batches, context.source.num_examples("train") // batch_size)
    total = None
    for count, local in enumerate(context.batches("train")):
        # Full batches only (a padded one would bias the statistics), decided from the sizes so
        # that every process runs the same collectives.
        if count == full_batches:
            break
        images = parallel.global_batch({"image": local["image"]}, mesh)["image"]
        stats = parallel.to_host(batch_statistics(params, zeros, images))
        total = stats if total is None else jax.tree.map(np.add, total, stats)
    if total is None:
        return variables
    return {
        "params": variables["params"],
        "batch_stats": jax.tree.map(lambda x: (x / full_batches).astype(np.float32), total),
    }


def baseline_variables(context: Context) -> dict[str, Callable[[], Any]]:
    """{baseline name: () -> variables}, built on demand."""
    config = context.config
    return {
        "random_init": lambda: random_init(config),
        "random_init_bn": lambda: recompute_batch_stats(context, random_init(config)),
        "random_fan_in_bn": lambda: recompute_batch_stats(context, fan_in_init(config)),
    }


def pixels(context: Context, split: str) -> tuple[np.ndarray, np.ndarray]:
    """Raw pixels (evaluation transform, normalised, flattened): (float32 [N, H*W*3], labels).

    Every process reads the whole split itself: pixels need no device.
    """
    rows, labels = [], []
    for batch in data.eval_batches(
        context.source,
        split=split,
        batch_size=256,
        image_size=context.config.data.image_size,
        resize_size=context.config.data.eval_resize,
    ):
        keep = batch["mask"]
        images = np.asarray(photometric.normalize(jnp.asarray(batch["image"][keep])))
        rows.append(images.reshape(len(images), -1))
        labels.append(batch["label"][keep])
    return np.concatenate(rows).astype(np.float32), np.concatenate(labels).astype(np.int32)


def raw_pixels_logreg(context: Context) -> dict:
    """The logreg protocol on raw pixels (or a note saying why it was skipped)."""
    config = context.config
    size = context.source.num_examples("train") * config.data.image_size**2 * 3 * 4
    if size > RAW_PIXELS_MAX_BYTES:
        return {"skipped": f"the train pixels would take {size / 2**30:.1f} GiB"}
    return logreg_protocol(
        *pixels(context, "train"),
        *pixels(context, "test"),
        num_classes=context.num_classes,
        seed=config.seed,
    )
