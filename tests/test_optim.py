"""Tests for bt_jax.optim against a NumPy transcription of the official LARS."""

from __future__ import annotations

import math
from collections.abc import Callable

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax
import pytest

from bt_jax import optim

# Small schedule so a handful of steps spans warmup and the cosine phase:
# warmup steps 0-1 (lr 0, peak/2), cosine from step 2, last step index 7.
BATCH = 512
STEPS_PER_EPOCH = 2
NUM_EPOCHS = 4
WARMUP_EPOCHS = 1
WD = 1.5e-6
ETA = 0.001
MOMENTUM = 0.9
LR_W = 0.2
LR_B = 0.0048


def official_lr(
    step: int,
    base: float,
    *,
    batch: int = BATCH,
    spe: int = STEPS_PER_EPOCH,
    epochs: int = NUM_EPOCHS,
    warmup_epochs: int = WARMUP_EPOCHS,
) -> float:
    """Transcription of ``adjust_learning_rate`` of the official main.py (float64)."""
    max_steps = epochs * spe
    warmup_steps = warmup_epochs * spe
    base_lr = batch / 256
    if step < warmup_steps:
        lr = base_lr * step / warmup_steps
    else:
        step -= warmup_steps
        max_steps -= warmup_steps
        q = 0.5 * (1 + math.cos(math.pi * step / max_steps))
        end_lr = base_lr * 0.001
        lr = base_lr * q + end_lr * (1 - q)
    return lr * base


def official_lars_step(
    params: dict,
    grads: dict,
    mus: dict,
    lr_w: float,
    lr_b: float,
    wd: float = WD,
    eta: float = ETA,
    momentum: float = MOMENTUM,
) -> None:
    """In-place float64 transcription of the official ``LARS.step`` (two groups)."""
    for name, p in params.items():
        dp = grads[name]
        if p.ndim != 1:  # weight_decay_filter / lars_adaptation_filter exclude ndim == 1
            dp = dp + wd * p
            param_norm = np.linalg.norm(p)
            update_norm = np.linalg.norm(dp)
            q = eta * param_norm / update_norm if (param_norm > 0 and update_norm > 0) else 1.0
            dp = dp * q
        mus[name] = momentum * mus[name] + dp
        lr = lr_w if p.ndim != 1 else lr_b
        params[name] = p - lr * mus[name]


def make_params(rng: np.random.Generator) -> dict[str, np.ndarray]:
    return {
        "dense_kernel": rng.normal(size=(6, 4)),
        "conv_kernel": rng.normal(size=(3, 3, 2, 5)) * 0.3,
        "bn_scale": 1.0 + 0.1 * rng.normal(size=(5,)),
        "bn_bias": 0.1 * rng.normal(size=(5,)),
        "zero_kernel": np.zeros((3, 4)),  # ||p|| = 0 at first: trust ratio 1
        "dead_kernel": np.zeros((2, 3)),  # ||p|| = ||dp|| = 0 always: no NaN
    }


def make_grads(rng: np.random.Generator, params: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    grads = {k: rng.normal(size=v.shape) for k, v in params.items()}
    grads["dead_kernel"] = np.zeros_like(params["dead_kernel"])
    return grads


def run_optax(tx: optax.GradientTransformation, params0: dict, grad_seq: list[dict]) -> list[dict]:
    """Applies ``tx`` under jit for each gradient; returns the params after each step."""
    params = jax.tree.map(jnp.asarray, params0)
    state = tx.init(params)

    @jax.jit
    def step(params, state, grads):
        updates, state = tx.update(grads, state, params)
        return optax.apply_updates(params, updates), state

    out = []
    for grads in grad_seq:
        params, state = step(params, state, jax.tree.map(jnp.asarray, grads))
        out.append(jax.tree.map(np.asarray, params))
    return out


def run_official(
    params0: dict, grad_seq: list[dict], lr_w: Callable[[int], float], lr_b: Callable[[int], float]
) -> list[dict]:
    params = {k: v.copy() for k, v in params0.items()}
    mus = {k: np.zeros_like(v) for k, v in params0.items()}
    out = []
    for step, grads in enumerate(grad_seq):
        official_lars_step(params, grads, mus, lr_w(step), lr_b(step))
        out.append({k: v.copy() for k, v in params.items()})
    return out


def assert_displacements_close(got: dict, want: dict, start: dict, rtol: float) -> None:
    # Compare p_t - p_0 rather than p_t: the updates are tiny next to the params
    # (eta = 1e-3), so comparing params would hide errors in the updates.
    for name in want:
        d_want = want[name] - start[name]
        d_got = got[name] - start[name]
        scale = np.max(np.abs(d_want))
        assert np.all(np.isfinite(d_got)), name
        if scale == 0.0:
            np.testing.assert_array_equal(d_got, 0.0, err_msg=name)
        else:
            np.testing.assert_allclose(d_got, d_want, rtol=rtol, atol=rtol * scale, err_msg=name)


def default_lars() -> optax.GradientTransformation:
    return optim.lars(
        global_batch=BATCH,
        steps_per_epoch=STEPS_PER_EPOCH,
        num_epochs=NUM_EPOCHS,
        warmup_epochs=WARMUP_EPOCHS,
        weight_decay=WD,
    )


def test_matches_official_lars_step_through_warmup_and_cosine():
    rng = np.random.default_rng(0)
    params0 = make_params(rng)
    num_steps = 6  # steps 0-1 warmup, 2-5 cosine
    grad_seq = [make_grads(rng, params0) for _ in range(num_steps)]
    want = run_official(
        params0, grad_seq, lambda s: official_lr(s, LR_W), lambda s: official_lr(s, LR_B)
    )

    with jax.enable_x64(True):
        got = run_optax(default_lars(), params0, grad_seq)

    for step in range(num_steps):
        assert_displacements_close(got[step], want[step], params0, rtol=1e-6)
    # The norm-0 cases really were exercised: the zero kernel moved, the dead one did not.
    assert np.any(want[-1]["zero_kernel"] != 0.0)
    np.testing.assert_array_equal(got[-1]["dead_kernel"], 0.0)


def test_float32_close_to_official():
    rng = np.random.default_rng(1)
    params0 = make_params(rng)
    grad_seq = [make_grads(rng, params0) for _ in range(5)]
    want = run_official(
        params0, grad_seq, lambda s: official_lr(s, LR_W), lambda s: official_lr(s, LR_B)
    )
    got = run_optax(
        default_lars(),
        {k: v.astype(np.float32) for k, v in params0.items()},
        [{k: v.astype(np.float32) for k, v in g.items()} for g in grad_seq],
    )
    for name in want[-1]:
        assert got[-1][name].dtype == np.float32
    assert_displacements_close(got[-1], want[-1], params0, rtol=2e-4)


def test_optax_lars_differs_from_official_when_lr_changes():
    rng = np.random.default_rng(2)
    params0 = {
        "dense_kernel": rng.normal(size=(6, 4)),
        "conv_kernel": rng.normal(size=(3, 3, 2, 5)),
    }
    grad_seq = [{k: rng.normal(size=v.shape) for k, v in params0.items()} for _ in range(5)]
    schedule = optim.learning_rate_schedule(
        LR_W,
        global_batch=BATCH,
        steps_per_epoch=STEPS_PER_EPOCH,
        num_epochs=NUM_EPOCHS,
        warmup_epochs=WARMUP_EPOCHS,
    )
    optax_lars = lambda lr: optax.lars(
        learning_rate=lr,
        weight_decay=WD,
        trust_coefficient=ETA,  # noqa: E731
        momentum=MOMENTUM,
    )

    with jax.enable_x64(True):
        # Sanity: at a constant rate the two orders agree, so the test below
        # isolates the order of momentum and learning rate.
        constant = run_optax(optax_lars(0.3), params0, grad_seq)
        scheduled_optax = run_optax(optax_lars(schedule), params0, grad_seq)
        scheduled_ours = run_optax(default_lars(), params0, grad_seq)
    want_constant = run_official(params0, grad_seq, lambda s: 0.3, lambda s: 0.3)
    assert_displacements_close(constant[-1], want_constant[-1], params0, rtol=1e-6)

    want = run_official(params0, grad_seq, lambda s: official_lr(s, LR_W), lambda s: 0.0)
    assert_displacements_close(scheduled_ours[-1], want[-1], params0, rtol=1e-6)
    for name in params0:
        d_optax = scheduled_optax[-1][name] - params0[name]
        d_want = want[-1][name] - params0[name]
        rel = np.linalg.norm(d_optax - d_want) / np.linalg.norm(d_want)
        assert rel > 0.05, (name, rel)


def test_schedule_values():
    spe, epochs, warmup = 10, 20, 5
    peak = LR_W * BATCH / 256
    schedule = optim.learning_rate_schedule(
        LR_W, global_batch=BATCH, steps_per_epoch=spe, num_epochs=epochs, warmup_epochs=warmup
    )
    total, warmup_steps = epochs * spe, warmup * spe
    lrs = np.asarray(jax.jit(jax.vmap(schedule))(jnp.arange(total + 1)))
    assert lrs.dtype == np.float32
    assert lrs[0] == 0.0
    np.testing.assert_allclose(lrs[warmup_steps], peak, rtol=1e-6)
    np.testing.assert_allclose(lrs[total], peak * 0.001, rtol=1e-5)
    assert np.all(np.diff(lrs[: warmup_steps + 1]) > 0)  # warmup rises linearly
    np.testing.assert_allclose(np.diff(lrs[: warmup_steps + 1]), peak / warmup_steps, rtol=1e-5)
    assert np.all(np.diff(lrs[warmup_steps:]) < 0)  # strictly decaying afterwards
    for step in (0, 7, warmup_steps - 1, warmup_steps, warmup_steps + 1, 123, total - 1, total):
        want = official_lr(step, LR_W, spe=spe, epochs=epochs, warmup_epochs=warmup)
        np.testing.assert_allclose(
            float(schedule(step)), want, rtol=1e-6, atol=1e-9, err_msg=str(step)
        )
    # Past the end the rate stays at its final value instead of rising again.
    np.testing.assert_allclose(float(schedule(total + 50)), peak * 0.001, rtol=1e-5)
    # No warmup: starts at the peak.
    no_warmup = optim.learning_rate_schedule(
        LR_W, global_batch=BATCH, steps_per_epoch=spe, num_epochs=epochs, warmup_epochs=0
    )
    np.testing.assert_allclose(float(no_warmup(0)), peak, rtol=1e-6)


def test_one_dimensional_params_get_no_weight_decay_and_no_trust_ratio():
    params = {
        "kernel": jnp.ones((4, 3)),
        "bn_scale": jnp.full((3,), 5.0),
        "bias": jnp.full((3,), -2.0),
    }
    assert optim.param_labels(params) == {
        "kernel": optim.WEIGHTS,
        "bn_scale": optim.BIASES_AND_BN,
        "bias": optim.BIASES_AND_BN,
    }
    assert optim.is_weight(None, jnp.zeros((2, 2, 2, 2))) and optim.is_weight(None, jnp.zeros(()))
    assert not optim.is_weight(None, jnp.zeros((7,)))

    tx = optim.lars(
        global_batch=256, steps_per_epoch=1, num_epochs=10, warmup_epochs=0, weight_decay=0.5
    )  # large decay: would show if applied
    step = jax.jit(tx.update)
    grads = {
        "kernel": jnp.full((4, 3), 0.1),
        "bn_scale": jnp.array([0.1, -0.2, 0.3]),
        "bias": jnp.zeros((3,)),
    }
    updates, _ = step(grads, tx.init(params), params)
    lr_b = 0.0048  # peak at step 0 without warmup, batch 256
    # Plain SGD-with-momentum update: no trust ratio (eta would shrink it by ~1e3)
    # and no decay (the zero-gradient bias would otherwise move).
    np.testing.assert_allclose(updates["bn_scale"], -lr_b * grads["bn_scale"], rtol=1e-6)
    np.testing.assert_array_equal(updates["bias"], 0.0)
    # Weights do get both: dp = g + wd * p, scaled to eta * ||p|| / ||dp||.
    dp = grads["kernel"] + 0.5 * params["kernel"]
    q = 0.001 * jnp.linalg.norm(params["kernel"]) / jnp.linalg.norm(dp)
    np.testing.assert_allclose(updates["kernel"], -0.2 * q * dp, rtol=1e-6)


def test_config_group_builds_the_optimizer_and_its_logged_rates():
    """optim.lars(**config.optim, ...) is the official step; current_learning_rates takes the
    same arguments and gives the schedule's values, eagerly and under jit."""
    optim_config = ml_collections.ConfigDict(
        dict(
            learning_rate_weights=LR_W,
            learning_rate_biases=LR_B,
            weight_decay=WD,
            momentum=MOMENTUM,
            trust_coefficient=ETA,
            warmup_epochs=WARMUP_EPOCHS,
        )
    )
    sizes = dict(global_batch=BATCH, steps_per_epoch=STEPS_PER_EPOCH, num_epochs=NUM_EPOCHS)
    rng = np.random.default_rng(3)
    params0 = make_params(rng)
    grad_seq = [make_grads(rng, params0) for _ in range(3)]
    with jax.enable_x64(True):
        got = run_optax(optim.lars(**optim_config, **sizes), params0, grad_seq)
        want = run_optax(default_lars(), params0, grad_seq)
    for name in params0:
        np.testing.assert_array_equal(got[-1][name], want[-1][name])

    for step in (0, 1, 3, 8):
        rates = optim.current_learning_rates(**optim_config, **sizes, step=step)
        assert set(rates) == {"lr_weights", "lr_biases"}
        assert isinstance(rates["lr_weights"], float)
        np.testing.assert_allclose(rates["lr_weights"], official_lr(step, LR_W), rtol=1e-6)
        np.testing.assert_allclose(rates["lr_biases"], official_lr(step, LR_B), rtol=1e-6)
    traced = jax.jit(lambda s: optim.current_learning_rates(**optim_config, **sizes, step=s))(
        jnp.int32(3)
    )
    np.testing.assert_allclose(traced["lr_biases"], official_lr(3, LR_B), rtol=1e-6)


def test_config_optim_defaults_are_the_lars_signature():
    """The official recipe is written once: config.optim reads lars's keyword defaults."""
    from bt_jax import config as config_lib

    config = config_lib.get_config()
    assert dict(config.optim) == dict(
        learning_rate_weights=0.2,
        learning_rate_biases=0.0048,
        weight_decay=1.5e-6,
        momentum=0.9,
        trust_coefficient=0.001,
        warmup_epochs=10,
    )


GOOD = dict(global_batch=256, steps_per_epoch=10, num_epochs=20)


@pytest.mark.parametrize(
    "overrides, match",
    [
        (dict(global_batch=0), "global_batch"),
        (dict(global_batch=-256), "global_batch"),
        (dict(global_batch=2.5), "global_batch"),
        (dict(steps_per_epoch=0), "steps_per_epoch"),
        (dict(num_epochs=0), "num_epochs"),
        (dict(warmup_epochs=30), "warmup_epochs"),
        (dict(warmup_epochs=-1), "warmup_epochs"),
        (dict(weight_decay=-1e-6), "weight_decay"),
        (dict(momentum=1.0), "momentum"),
        (dict(momentum=-0.1), "momentum"),
        (dict(trust_coefficient=0.0), "trust_coefficient"),
        (dict(learning_rate_weights=-0.2), "base_learning_rate"),
        (dict(learning_rate_biases=float("nan")), "base_learning_rate"),
    ],
)
def test_lars_rejects_bad_arguments(overrides, match):
    with pytest.raises(ValueError, match=match):
        optim.lars(**{**GOOD, **overrides})


def test_schedule_rejects_bad_arguments():
    with pytest.raises(ValueError, match="final_fraction"):
        optim.learning_rate_schedule(0.2, **GOOD, final_fraction=1.5)
    with pytest.raises(ValueError, match="base_learning_rate"):
        optim.learning_rate_schedule(-0.2, **GOOD)
