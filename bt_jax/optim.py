"""LARS optimiser and learning-rate schedule of the official Barlow Twins recipe.

The official PyTorch code (facebookresearch/barlowtwins, ``main.py``) trains
with LARS (momentum 0.9, trust coefficient 0.001, weight decay 1.5e-6 in the
paper) on two parameter groups:

* ``"weights"`` (every parameter with ``ndim != 1``: conv kernels, dense
  kernels): weight decay and the layer-wise trust ratio, base learning rate 0.2;
* ``"biases_and_bn"`` (``ndim == 1``: BatchNorm scales and shifts, biases):
  no weight decay, no trust ratio, base learning rate 0.0048.

Both base rates are multiplied by ``global_batch / 256`` and by the same
schedule: linear warmup from 0 over 10 epochs, then a cosine decay to 0.001 of
the peak.

Order of operations (why this is not ``optax.lars``)
----------------------------------------------------
The official ``LARS.step`` does, per parameter ``p`` with gradient ``g``::

    dp = g + wd * p                        # ndim != 1 only
    q  = eta * ||p|| / ||dp||              # ndim != 1 only; 1 if either norm is 0
    mu = momentum * mu + q * dp
    p  = p - lr * mu

i.e. the momentum buffer holds *learning-rate-free* directions and the current
learning rate multiplies the whole buffer. ``optax.lars`` instead applies the
learning rate before ``optax.trace``, so its buffer is
``sum_i momentum**(t-i) * lr_i * q_i * dp_i`` rather than
``lr_t * sum_i momentum**(t-i) * q_i * dp_i``. The two coincide only when the
learning rate is constant; during warmup (rate rising from 0) and the cosine
decay they differ. The difference is largest at the start of training: the
official step 0 has ``lr = 0`` but still fills the buffer, which step 1 then
applies, whereas ``optax.lars`` carries nothing over from step 0. Reproducing
the official order keeps the hyper-parameters (especially the tuned learning
rates) transferable.

Old-scale learning rates
------------------------
Older versions of the official code multiplied the loss by ``scale_loss = 0.024``
and used one learning rate for both groups; the current code uses an unscaled
loss and splits the rate into ``learning_rate_weights = 0.2`` and
``learning_rate_biases = 0.0048 = 0.2 * 0.024``. A rate ``lr_old`` tuned on the
old scale (e.g. the per-batch-size table of issue #7: 128: 0.7, 256: 0.4,
512: 0.3, 1024: 0.25, 2048: 0.2, 4096: 0.2, all before the ``batch / 256``
factor, which applies on both scales) maps to
``learning_rate_weights = lr_old`` and ``learning_rate_biases = 0.024 * lr_old``:
the trust ratio makes weight updates insensitive to the loss scale (up to the
relative size of the weight-decay term), while the untrusted 1-D parameters
see gradients 1 / 0.024 larger on the new scale.
"""

from __future__ import annotations

import math
from typing import Any

import jax
import jax.numpy as jnp
import optax

__all__ = [
    "WEIGHTS",
    "BIASES_AND_BN",
    "learning_rate_schedule",
    "is_weight",
    "param_labels",
    "lars",
    "current_learning_rates",
]

# A step count: a Python int or an integer (possibly traced) array.
StepLike = Any

# Labels of the two parameter groups (keys of the ``optax.partition`` state).
WEIGHTS = "weights"
BIASES_AND_BN = "biases_and_bn"


def _check_positive_int(name: str, value: Any, hint: str) -> int:
    # Reject bools explicitly: ``True`` is an int and would silently mean 1.
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ValueError(f"{name} must be a positive integer, got {value!r}; {hint}.")
    return value


def _check_non_negative_float(name: str, value: Any, hint: str) -> float:
    try:
        value_f = float(value)
    except (TypeError, ValueError):
        raise ValueError(f"{name} must be a number, got {value!r}; {hint}.") from None
    if not math.isfinite(value_f) or value_f < 0.0:
        raise ValueError(f"{name} must be finite and >= 0, got {value!r}; {hint}.")
    return value_f


def _check_epochs(num_epochs: Any, warmup_epochs: Any) -> tuple[int, int]:
    num_epochs = _check_positive_int(
        "num_epochs", num_epochs, "pass the total number of training epochs (the paper uses 1000)"
    )
    if isinstance(warmup_epochs, bool) or not isinstance(warmup_epochs, int) or warmup_epochs < 0:
        raise ValueError(
            f"warmup_epochs must be a non-negative integer, got {warmup_epochs!r}; "
            "the official recipe uses 10 (0 disables warmup)."
        )
    if warmup_epochs > num_epochs:
        raise ValueError(
            f"warmup_epochs ({warmup_epochs}) exceeds num_epochs ({num_epochs}); "
            "lower warmup_epochs or train for more epochs."
        )
    return num_epochs, warmup_epochs


def learning_rate_schedule(
    base_learning_rate: float,
    *,
    global_batch: int,
    steps_per_epoch: int,
    num_epochs: int,
    warmup_epochs: int = 10,
    final_fraction: float = 0.001,
) -> optax.Schedule:
    """Official Barlow Twins schedule: linear warmup then cosine decay.

    With ``peak = base_learning_rate * global_batch / 256``,
    ``W = warmup_epochs * steps_per_epoch`` and
    ``T = num_epochs * steps_per_epoch - W`` (as ``adjust_learning_rate`` of the
    official ``main.py``)::

        step <  W:  lr = peak * step / W
        step >= W:  t = step - W; q = 0.5 * (1 + cos(pi * t / T))
                    lr = peak * (q + final_fraction * (1 - q))

    So ``lr(0) = 0``, ``lr(W) = peak`` and ``lr(W + T) = peak * final_fraction``.
    ``t`` is clamped to ``[0, T]``: past the end of training the rate stays at
    its final value instead of following the cosine back up (the official code
    never steps that far, so this changes nothing within a run).

    Args:
      base_learning_rate: rate per 256 examples (0.2 for weights, 0.0048 for
        biases and BatchNorm parameters in the official recipe).
      global_batch: batch size summed over all devices.
      steps_per_epoch: optimiser steps per epoch.
      num_epochs: total training epochs.
      warmup_epochs: epochs of linear warmup from 0.
      final_fraction: final rate as a fraction of the peak.

    Returns:
      A pure, jit-able function ``step -> float32 learning rate``.
    """
    base_learning_rate = _check_non_negative_float(
        "base_learning_rate", base_learning_rate, "use e.g. 0.2 for weights or 0.0048 for biases/BN"
    )
    global_batch = _check_positive_int(
        "global_batch", global_batch, "pass the batch size summed over all devices"
    )
    steps_per_epoch = _check_positive_int(
        "steps_per_epoch", steps_per_epoch, "the dataset must give at least one batch per epoch"
    )
    num_epochs, warmup_epochs = _check_epochs(num_epochs, warmup_epochs)
    final_fraction = _check_non_negative_float(
        "final_fraction", final_fraction, "the official value is 0.001"
    )
    if final_fraction > 1.0:
        raise ValueError(
            f"final_fraction must be in [0, 1], got {final_fraction!r}; "
            "the official value is 0.001."
        )

    peak = base_learning_rate * global_batch / 256.0
    warmup_steps = warmup_epochs * steps_per_epoch
    decay_steps = num_epochs * steps_per_epoch - warmup_steps
    # Guard the divisions only: with W = 0 the warmup branch is never selected;
    # with T = 0 (warmup_epochs == num_epochs) steps >= W get the final rate.
    warmup_denominator = float(max(warmup_steps, 1))
    decay_denominator = float(max(decay_steps, 1))

    def schedule(step: StepLike) -> jax.Array:
        step = jnp.maximum(jnp.asarray(step, dtype=jnp.float32), 0.0)
        warmup_lr = peak * step / warmup_denominator
        t = jnp.clip(step - warmup_steps, 0.0, float(decay_steps))
        # 0.5 * (1 + cos(pi t / T)) == sin(pi (T - t) / (2 T))**2. The sin form
        # avoids float32 cancellation in 1 + cos near the end of training, where
        # q is comparable to final_fraction (1e-5 relative error otherwise).
        q = jnp.square(jnp.sin(0.5 * jnp.pi * (decay_steps - t) / decay_denominator))
        decay_lr = peak * (q + final_fraction * (1.0 - q))
        return jnp.where(step < warmup_steps, warmup_lr, decay_lr).astype(jnp.float32)

    return schedule


def is_weight(path: Any, leaf: Any) -> bool:
    """Whether a parameter belongs to the ``"weights"`` group (``ndim != 1``).

    Mirrors the official grouping ``p.ndim != 1``: kernels (2-D dense, 4-D
    conv) get weight decay and the trust ratio; 1-D BatchNorm scales/shifts and
    biases get neither. ``path`` is unused but makes the function usable with
    ``jax.tree_util.tree_map_with_path``. Works on arrays and on
    ``jax.ShapeDtypeStruct`` (only the static rank is read).
    """
    del path
    return len(jnp.shape(leaf)) != 1


def param_labels(params: Any) -> Any:
    """Tree of group labels (``WEIGHTS`` / ``BIASES_AND_BN``) matching ``params``.

    Static (depends only on ranks), so it can be used inside ``jit``.
    """
    return jax.tree_util.tree_map_with_path(
        lambda path, leaf: WEIGHTS if is_weight(path, leaf) else BIASES_AND_BN, params
    )


def lars(
    *,
    global_batch: int,
    steps_per_epoch: int,
    num_epochs: int,
    learning_rate_weights: float = 0.2,
    learning_rate_biases: float = 0.0048,
    weight_decay: float = 1.5e-6,
    momentum: float = 0.9,
    trust_coefficient: float = 0.001,
    warmup_epochs: int = 10,
) -> optax.GradientTransformation:
    """LARS in the official Barlow Twins order, with its two parameter groups.

    Per group (see the module docstring for why the order matters)::

        weights:        add_decayed_weights(wd) -> scale_by_trust_ratio(eta)
                        -> trace(momentum) -> scale_by_learning_rate(schedule_w)
        biases_and_bn:  trace(momentum) -> scale_by_learning_rate(schedule_b)

    ``optax.scale_by_trust_ratio`` computes ``eta * ||p|| / ||dp||`` with the
    norms of the parameter and of the incoming (already weight-decayed) update,
    and uses 1 when either norm is 0, as the official ``torch.where`` does.
    ``optax.trace(nesterov=False)`` is ``mu = momentum * mu + dp``, the
    official buffer; ``scale_by_learning_rate`` multiplies by ``-lr(count)``
    with ``count`` starting at 0, matching ``adjust_learning_rate(step)`` being
    called before each ``optimizer.step()``. Every parameter has its own
    momentum buffer, inside its group's state.

    Returns:
      A jit-able ``optax.GradientTransformation``; apply its updates with
      ``optax.apply_updates``.
    """
    weight_decay = _check_non_negative_float(
        "weight_decay", weight_decay, "the paper uses 1.5e-6 (0 disables it)"
    )
    trust_coefficient = _check_non_negative_float(
        "trust_coefficient", trust_coefficient, "the official value is 0.001"
    )
    if trust_coefficient == 0.0:
        raise ValueError(
            "trust_coefficient must be > 0, got 0.0: it would zero every weight update; "
            "the official value is 0.001."
        )
    try:
        momentum_f = float(momentum)
    except (TypeError, ValueError):
        raise ValueError(
            f"momentum must be a number in [0, 1), got {momentum!r}; the official value is 0.9."
        ) from None
    if not 0.0 <= momentum_f < 1.0:
        raise ValueError(
            f"momentum must be in [0, 1), got {momentum!r}; the official value is 0.9 "
            "(1 or more makes the momentum buffer grow without bound)."
        )
    # The schedules validate batch, steps, epochs and the two base rates.
    schedule_weights = learning_rate_schedule(
        learning_rate_weights,
        global_batch=global_batch,
        steps_per_epoch=steps_per_epoch,
        num_epochs=num_epochs,
        warmup_epochs=warmup_epochs,
    )
    schedule_biases = learning_rate_schedule(
        learning_rate_biases,
        global_batch=global_batch,
        steps_per_epoch=steps_per_epoch,
        num_epochs=num_epochs,
        warmup_epochs=warmup_epochs,
    )

    # No masks are needed inside the groups: the partition already restricts
    # weight decay and the trust ratio to ndim != 1, exactly the official filter.
    weights_tx = optax.chain(
        optax.add_decayed_weights(weight_decay),
        optax.scale_by_trust_ratio(trust_coefficient=trust_coefficient),
        optax.trace(decay=momentum_f, nesterov=False),
        optax.scale_by_learning_rate(schedule_weights),
    )
    biases_tx = optax.chain(
        optax.trace(decay=momentum_f, nesterov=False),
        optax.scale_by_learning_rate(schedule_biases),
    )
    return optax.partition({WEIGHTS: weights_tx, BIASES_AND_BN: biases_tx}, param_labels)


def current_learning_rates(
    *,
    global_batch: int,
    steps_per_epoch: int,
    num_epochs: int,
    step: StepLike,
    learning_rate_weights: float = 0.2,
    learning_rate_biases: float = 0.0048,
    warmup_epochs: int = 10,
    **unused_lars_options: Any,
) -> dict[str, Any]:
    """Learning rates applied at optimiser step ``step``, for logging.

    Takes the arguments of :func:`lars` (``**config.optim`` and the run's sizes); ``step`` is
    the number of updates already applied (the optimiser's internal count). Returns
    ``{"lr_weights": ..., "lr_biases": ...}``: Python floats for a concrete ``step``, float32
    scalars under ``jit``.
    """
    del unused_lars_options
    sizes = dict(
        global_batch=global_batch,
        steps_per_epoch=steps_per_epoch,
        num_epochs=num_epochs,
        warmup_epochs=warmup_epochs,
    )
    rates = {
        "lr_weights": learning_rate_schedule(learning_rate_weights, **sizes)(step),
        "lr_biases": learning_rate_schedule(learning_rate_biases, **sizes)(step),
    }
    if isinstance(step, jax.core.Tracer):
        return rates
    return {name: float(value) for name, value in rates.items()}
