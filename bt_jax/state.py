"""The model, the optimiser and the training state, built from the config.

Pure construction (and :func:`run_once`, which compiles a program that runs once, such as the
initialisation): nothing here touches files. The trainer places the state
(``bt_jax.parallel``), the evaluation rebuilds the run's step-0 backbone as its random-init
baseline from the same :func:`init_state`.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import TYPE_CHECKING, Any

import flax
import jax
import jax.numpy as jnp
import optax

from bt_jax import models, optim, probe
from bt_jax.parallel import AXIS

if TYPE_CHECKING:  # the step imports TrainState; it must run where ml_collections is not installed
    import ml_collections


@flax.struct.dataclass
class TrainState:
    step: jax.Array  # int32 [], updates applied
    params: Any  # {"backbone": ..., "projector": ...}
    batch_stats: Any  # BatchNorm running statistics, same layout
    opt_state: Any  # LARS (bt_jax.optim)
    probe_params: Any  # the online probe ({"kernel": [F, C], "bias": [C]}; {} without labels)
    probe_opt_state: Any

    @classmethod
    def create(
        cls,
        variables: dict,
        tx: optax.GradientTransformation,
        probe_params: Any,
        probe_tx: optax.GradientTransformation,
    ) -> TrainState:
        """Step 0 from the model's ``{"params", "batch_stats"}`` and the probe's parameters."""
        return cls(
            step=jnp.zeros((), jnp.int32),
            params=variables["params"],
            batch_stats=variables["batch_stats"],
            opt_state=tx.init(variables["params"]),
            probe_params=probe_params,
            probe_opt_state=probe_tx.init(probe_params),
        )


def build_model(
    config: ml_collections.ConfigDict, axis_name: str | None = AXIS
) -> models.BarlowTwinsModel:
    """Backbone + projector; with ``axis_name`` every BatchNorm uses global-batch statistics
    (the official SyncBatchNorm)."""
    return models.create_model(**config.model, axis_name=axis_name)


def build_optimizer(
    config: ml_collections.ConfigDict, steps_per_epoch: int
) -> optax.GradientTransformation:
    """The official LARS recipe of ``config.optim`` over this run's schedule."""
    return optim.lars(
        **config.optim,
        global_batch=config.batch_size,
        steps_per_epoch=steps_per_epoch,
        num_epochs=config.num_epochs,
    )


def learning_rates(
    config: ml_collections.ConfigDict, steps_per_epoch: int, step: Any
) -> dict[str, Any]:
    """{"lr_weights", "lr_biases"} applied at optimiser step ``step`` (for logging)."""
    return optim.current_learning_rates(
        **config.optim,
        global_batch=config.batch_size,
        steps_per_epoch=steps_per_epoch,
        num_epochs=config.num_epochs,
        step=step,
    )


def init_state(
    config: ml_collections.ConfigDict,
    model: models.BarlowTwinsModel,
    tx: optax.GradientTransformation,
    num_classes: int | None = None,
) -> TrainState:
    """The step-0 state from ``config.seed``; pure, so ``jit`` places it wherever asked.

    num_classes: the online probe's classes; None (no labels, or ``probe.enabled=False``)
    trains no probe.
    """
    init_model = model.clone(
        backbone=model.backbone.clone(axis_name=None),
        projector=model.projector.clone(axis_name=None),
    )
    image_size = config.data.image_size
    images = jnp.zeros((2, image_size, image_size, 3), jnp.float32)
    variables = init_model.init(jax.random.key(config.seed), images, train=False)
    probe_params = probe.init_params(model.backbone.num_features, num_classes)
    return TrainState.create(variables, tx, probe_params, probe.optimizer(config.probe))


# An initialisation is ~100 threefry normal draws that run once: XLA's CPU backend compiles the
# ResNet-18 state in ~8 s at its default optimisation level and ~2.6 s at level 1, with the same
# bits (tests/test_evaluate.py checks it; level 0 differs by an ulp). Accelerators keep theirs.
CPU_INIT_COMPILER_OPTIONS = {"xla_backend_optimization_level": 1}


def run_once(fn: Callable[[], Any], out_shardings: Any = None) -> Any:
    """``jax.jit(fn, out_shardings=...)()``, compiled for a program that runs once."""
    lowered = jax.jit(fn, out_shardings=out_shardings).lower()
    options = CPU_INIT_COMPILER_OPTIONS if jax.default_backend() == "cpu" else None
    return lowered.compile(options)()


def variables_of(state: TrainState, part: str | None = "backbone") -> dict:
    """{"params", "batch_stats"} of the backbone, the projector, or (``part=None``) the model."""
    if part is None:
        return {"params": state.params, "batch_stats": state.batch_stats}
    return {"params": state.params[part], "batch_stats": state.batch_stats[part]}


@jax.jit
def all_finite(tree: Any) -> jax.Array:
    """Whether every floating-point value in ``tree`` is finite: bool []."""
    leaves = [x for x in jax.tree.leaves(tree) if jnp.issubdtype(jnp.result_type(x), jnp.inexact)]
    return jnp.all(jnp.stack([jnp.all(jnp.isfinite(x)) for x in leaves]))
