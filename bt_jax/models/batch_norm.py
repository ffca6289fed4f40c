"""BatchNorm as PyTorch's (and ``flax.linen.BatchNorm``'s variables), for one or several views
stacked along the batch axis.

The official code calls the network once per view, so each view's batch is normalised with its
own statistics and the running averages are updated twice per step (view A's update, then view
B's). Stacking the views into one batch makes every convolution see twice the rows, which runs
faster on the CPU; ``views=2`` keeps the official semantics: the batch [views * n, ...] is
split into its views, each normalised over its own n rows (and, with ``axis_name``, over those of
every device: SyncBatchNorm), and the running averages take one update per view, in order.
"""

from __future__ import annotations

from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
from jax import lax


class BatchNorm(nn.Module):
    """BatchNorm over every axis but the last, with PyTorch's semantics.

    Normalises by the biased batch variance with ``epsilon`` (1e-5), updates running averages as
    ``running = momentum * running + (1 - momentum) * batch`` (``momentum=0.9`` is PyTorch's
    0.1). Variables as ``nn.BatchNorm``: params ``scale``, ``bias`` [C]; batch_stats ``mean``,
    ``var`` [C] (the biased variance; PyTorch stores the unbiased one). Statistics in float32.

    Fields:
      use_running_average: normalise with the running averages (inference) rather than the
        batch's statistics (training, which updates them when ``batch_stats`` is mutable).
      axis_name: mapped axis over which training statistics are averaged (SyncBatchNorm).
      scale_init: ones, or zeros for the last BatchNorm of a residual branch.
    """

    use_running_average: bool = False
    momentum: float = 0.9
    epsilon: float = 1e-5
    dtype: Any = jnp.float32
    axis_name: str | None = None
    scale_init: Any = nn.initializers.ones

    @nn.compact
    def __call__(self, x: jax.Array, views: int = 1) -> jax.Array:
        """x: [views * n, ..., C] -> the same shape in ``dtype``; each view normalised over its
        own n rows (and all but the last axis)."""
        features = x.shape[-1]
        scale = self.param("scale", self.scale_init, (features,), jnp.float32)
        bias = self.param("bias", nn.initializers.zeros, (features,), jnp.float32)
        running_mean = self.variable("batch_stats", "mean", jnp.zeros, (features,), jnp.float32)
        running_var = self.variable("batch_stats", "var", jnp.ones, (features,), jnp.float32)
        if self.use_running_average:
            return _normalize(
                x, running_mean.value, running_var.value, scale, bias, self.epsilon, self.dtype
            )
        if x.shape[0] % views:
            raise ValueError(f"A batch of {x.shape[0]} rows does not split into {views} views.")
        grouped = x.reshape((views, x.shape[0] // views) + x.shape[1:])
        mean, var = _statistics(grouped, None if self.is_initializing() else self.axis_name)
        if not self.is_initializing():
            for view in range(views):  # view after view, as sequential calls update them
                running_mean.value = (
                    self.momentum * running_mean.value + (1 - self.momentum) * mean[view]
                )
                running_var.value = (
                    self.momentum * running_var.value + (1 - self.momentum) * var[view]
                )
        # [views, C] -> [views, 1, ..., 1, C] against the grouped batch.
        expand = (views,) + (1,) * (grouped.ndim - 2) + (features,)
        y = _normalize(
            grouped,
            mean.reshape(expand),
            var.reshape(expand),
            scale,
            bias,
            self.epsilon,
            self.dtype,
        )
        return y.reshape(x.shape)


def _statistics(grouped: jax.Array, axis_name: str | None) -> tuple[jax.Array, jax.Array]:
    """grouped: [views, n, ..., C] -> (mean, biased variance) [views, C] in float32, over every
    axis but the first and last, and over ``axis_name``'s devices (one collective)."""
    x = grouped.astype(jnp.promote_types(grouped.dtype, jnp.float32))
    axes = tuple(range(1, x.ndim - 1))
    # E[x] and E[x^2] in one pass (one fusion) and one pmean; the variance is their difference,
    # clipped at 0 against rounding, as nn.BatchNorm's default.
    moments = jnp.stack([jnp.mean(x, axes), jnp.mean(jnp.square(x), axes)])
    if axis_name is not None:
        moments = lax.pmean(moments, axis_name)
    mean, mean_square = moments[0], moments[1]
    return mean, jnp.maximum(0.0, mean_square - jnp.square(mean))


def _normalize(
    x: jax.Array,
    mean: jax.Array,
    var: jax.Array,
    scale: jax.Array,
    bias: jax.Array,
    epsilon: float,
    dtype: Any,
) -> jax.Array:
    """(x - mean) * scale / sqrt(var + eps) + bias, in float32 (at least), returned in dtype."""
    multiplier = lax.rsqrt(var + epsilon) * scale
    return ((x - mean) * multiplier + bias).astype(dtype)
