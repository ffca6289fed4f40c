"""Both views in one call: per-view BatchNorm statistics, the values, gradients and running
averages of two calls, on one device and under shard_map over 8 (sync BatchNorm).

The comparisons run in float64: the two are equal in exact arithmetic, and float32 rounding
(reductions in another order) would otherwise blur a wrong statistic with noise.
"""

import functools

import chex
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import PartitionSpec as P
from test_conv import assert_close
from test_train_step import fake_batches, step_function
from train_helpers import step_0_state, tiny_config

from bt_jax import loss as loss_lib
from bt_jax import models, parallel
from bt_jax import state as state_lib
from bt_jax import step as step_lib


def normal(seed, shape, dtype=jnp.float32):
    return jnp.asarray(np.random.default_rng(seed).standard_normal(shape), dtype)


@pytest.fixture
def float64():
    with jax.enable_x64(True):
        yield


@pytest.mark.parametrize("train", [True, False])
def test_batch_norm_equals_flax_batch_norm(train):
    x = normal(0, (6, 5, 5, 4)) * 3.0 + 1.0
    ours = models.BatchNorm(use_running_average=not train)
    flax_bn = nn.BatchNorm(use_running_average=not train, momentum=0.9, epsilon=1e-5)
    variables = flax_bn.init(jax.random.key(0), x)
    variables = {
        "params": {"scale": normal(1, (4,)), "bias": normal(2, (4,))},
        "batch_stats": {"mean": normal(3, (4,)), "var": normal(4, (4,)) ** 2 + 0.5},
    }
    chex.assert_trees_all_equal_shapes_and_dtypes(
        ours.init(jax.random.key(0), x), flax_bn.init(jax.random.key(0), x)
    )

    def run(module):
        def loss(params):
            y, updates = module.apply({**variables, "params": params}, x, mutable=["batch_stats"])
            return jnp.sum(jnp.sin(y)), (y, updates)

        return jax.grad(loss, has_aux=True)(variables["params"])

    assert_close(run(ours), run(flax_bn))


def test_batch_norm_views_equal_sequential_calls_not_pooled(float64):
    # views=2 on [a; b]: each view normalised with its own statistics, the running averages
    # updated with view A's, then view B's, as flax's BatchNorm called on a, then on b.
    a, b = normal(0, (4, 3, 3, 5), jnp.float64), normal(1, (4, 3, 3, 5), jnp.float64) * 2 + 1
    ours = models.BatchNorm()
    flax_bn = nn.BatchNorm(use_running_average=False, momentum=0.9, epsilon=1e-5)
    variables = flax_bn.init(jax.random.key(0), a)
    variables = {
        "params": {"scale": normal(2, (5,), jnp.float64), "bias": normal(3, (5,), jnp.float64)},
        "batch_stats": variables["batch_stats"],
    }

    def stacked(params):
        y, updates = ours.apply(
            {**variables, "params": params},
            jnp.concatenate([a, b]),
            views=2,
            mutable=["batch_stats"],
        )
        return jnp.sum(jnp.sin(y)), (y, updates)

    def sequential(params):
        y_a, updates = flax_bn.apply({**variables, "params": params}, a, mutable=["batch_stats"])
        y_b, updates = flax_bn.apply({"params": params, **updates}, b, mutable=["batch_stats"])
        y = jnp.concatenate([y_a, y_b])
        return jnp.sum(jnp.sin(y)), (y, updates)

    got = jax.grad(stacked, has_aux=True)(variables["params"])
    assert_close(got, jax.grad(sequential, has_aux=True)(variables["params"]))
    pooled, _ = flax_bn.apply(variables, jnp.concatenate([a, b]), mutable=["batch_stats"])
    assert float(jnp.max(jnp.abs(pooled - got[1][0]))) > 0.1


def two_views(seed=0, n=6, size=16):
    return (
        normal(seed, (n, size, size, 3), jnp.float64),
        normal(seed + 1, (n, size, size, 3), jnp.float64) * 2.0 + 0.5,
    )


def small_model(axis_name=None):
    """One BasicBlock per stage (an identity shortcut in stage 1, a downsampling one after): all
    of ResNet-18's layer kinds, at half its compile time."""
    backbone = models.ResNet(
        stage_sizes=(1, 1, 1, 1),
        stem="cifar",
        width=4,
        zero_init_residual=True,
        dtype="float64",
        axis_name=axis_name,
    )
    return models.BarlowTwinsModel(
        backbone, models.Projector("16-16", dtype="float64", axis_name=axis_name)
    )


def init_variables(model, image_size=16):
    init_model = model.clone(
        backbone=model.backbone.clone(axis_name=None),
        projector=model.projector.clone(axis_name=None),
    )
    # One program (eager init would compile one random-normal program per kernel shape).
    variables = state_lib.run_once(
        lambda: init_model.init(
            jax.random.key(0), jnp.zeros((2, image_size, image_size, 3)), train=False
        )
    )
    # Nonzero last BatchNorm scales (zero_init_residual starts them at 0, hiding the branches).
    params = jax.tree_util.tree_map_with_path(
        lambda path, p: p + 0.5 if path[-1].key == "scale" else p, variables["params"]
    )
    return {"params": params, "batch_stats": variables["batch_stats"]}


def loss_grads_and_stats(model, variables, view_a, view_b, one_call: bool, axis_name=None):
    """(loss, gradients, new batch_stats, representation of A) of the Barlow Twins loss."""

    def loss_fn(params):
        if one_call:
            n = view_a.shape[0]
            (r, z), updates = model.apply(
                {**variables, "params": params},
                jnp.concatenate([view_a, view_b]),
                views=2,
                mutable=["batch_stats"],
            )
            r_a, z_a, z_b = r[:n], z[:n], z[n:]
        else:
            (r_a, z_a), updates = model.apply(
                {**variables, "params": params}, view_a, mutable=["batch_stats"]
            )
            (_, z_b), updates = model.apply(
                {"params": params, **updates}, view_b, mutable=["batch_stats"]
            )
        loss = loss_lib.barlow_twins_loss(z_a, z_b, axis_name=axis_name)
        return loss, (updates["batch_stats"], r_a)

    (loss, (stats, r_a)), grads = jax.value_and_grad(loss_fn, has_aux=True)(variables["params"])
    if axis_name is not None:
        grads = jax.lax.pmean(grads, axis_name)
    return loss, grads, stats, r_a


def test_views_argument_splits_the_batch_evenly():
    x = normal(0, (5, 4, 4, 3))
    bn = models.BatchNorm()
    with pytest.raises(ValueError, match="does not split into 2 views"):
        bn.apply(bn.init(jax.random.key(0), x), x, views=2, mutable=["batch_stats"])


@pytest.mark.slow
def test_one_call_equals_two_calls_on_one_device_and_under_shard_map(float64):
    model = small_model()
    variables = init_variables(model)
    view_a, view_b = two_views(n=16)  # 2 per device under shard_map
    run = jax.jit(functools.partial(loss_grads_and_stats, model), static_argnums=(3,))
    one = run(variables, view_a, view_b, True)
    assert_close(one, run(variables, view_a, view_b, False))

    # Over 8 devices with sync BatchNorm: each view's statistics over its rows on every device,
    # the one-device values on the global batch (which two calls also give: test_models).
    mesh = parallel.device_mesh(jax.devices())
    per_device = functools.partial(
        loss_grads_and_stats,
        small_model(axis_name=parallel.AXIS),
        one_call=True,
        axis_name=parallel.AXIS,
    )
    mapped = jax.shard_map(
        lambda v, a, b: per_device(v, a, b)[:3],
        mesh=mesh,
        in_specs=(P(), P(parallel.AXIS), P(parallel.AXIS)),
        out_specs=P(),
    )
    assert_close(jax.jit(mapped)(variables, view_a, view_b), one[:3])


@pytest.mark.slow
def test_the_step_in_one_call_equals_two_calls(float64):
    # No warmup: a nonzero learning rate at step 0, so the parameters move by the gradients.
    config = tiny_config(batch_size=16, optim__warmup_epochs=0)
    mesh = parallel.device_mesh(jax.devices())
    model = small_model(axis_name=parallel.AXIS)
    tx = state_lib.build_optimizer(config, steps_per_epoch=10)
    batch = parallel.global_batch(fake_batches(config, 1)[0], mesh)
    results = []
    for one_call in (False, True):
        state = step_0_state(config, model, tx, mesh)
        step_fn = parallel.map_step(
            functools.partial(step_function(config, model, tx), views_in_one_call=one_call), mesh
        )
        new_state, metrics = step_fn(state, batch, jax.random.key(0))
        results.append(
            parallel.to_host(
                (
                    new_state.params,
                    new_state.batch_stats,
                    new_state.opt_state,
                    new_state.probe_params,
                    metrics,
                )
            )
        )
    assert_close(results[1], results[0])
    assert step_lib.train_step.__kwdefaults__["views_in_one_call"] is True
