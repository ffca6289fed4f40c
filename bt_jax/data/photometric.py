"""The device side of the views: uint8 from the host, normalised (and, with
``photometric="device"``, colour-jittered, grayscaled, blurred, solarised) in the jitted step.

(Interim: host mode only; the device-side photometric ops land with the data rework.)
"""

from __future__ import annotations

from typing import Mapping

import jax
import jax.numpy as jnp

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


def normalize(images: jax.Array) -> jax.Array:
    """uint8 [..., 3] -> float32, scaled to [0, 1] and ImageNet-normalised."""
    x = jnp.asarray(images, jnp.float32) / 255.0
    return (x - jnp.asarray(IMAGENET_MEAN)) / jnp.asarray(IMAGENET_STD)


def finish_views(batch: Mapping[str, jax.Array], *, seed: int, views, photometric: str) -> dict:
    """{"view_a", "view_b": float32 [n, H, W, 3]} from the batch's uint8 views."""
    del seed, views
    if photometric != "host":
        raise NotImplementedError("photometric='device' is not implemented yet")
    return {key: normalize(batch[key]) for key in ("view_a", "view_b")}
