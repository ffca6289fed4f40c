"""The Barlow Twins loss: against a float64 NumPy transcription, across methods and devices.

Values and gradients under every transformation run as chex variants (one test body for jit,
no jit, pmap, arguments on and off the device); shard_map and GSPMD, which chex has no variant
for, are pytest cases beside them. Comparisons go through chex's tree assertions, except for
plain Python numbers and the statistical check, where a one-line assert says more.
"""

import functools
import math

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from absl.testing import parameterized
from jax import lax
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P
from jax.test_util import check_grads

import bt_jax
from bt_jax import errors
from bt_jax import loss as loss_lib
from experiments import loss_scale

NUM_DEVICES = 8
RTOL = 1e-5


def reference_terms(z_a, z_b, eps=1e-5):
    """NumPy float64 transcription of the official formulation: BatchNorm1d(affine=False), C / N."""
    z_a = np.asarray(z_a, np.float64)
    z_b = np.asarray(z_b, np.float64)
    n = z_a.shape[0]

    def bn(z):
        shifted = z - z[0]  # Exact for a constant column, whatever the mean's rounding.
        centred = shifted - shifted.mean(0)
        std = np.sqrt(np.mean(centred**2, 0) + eps)
        # The documented convention for a constant dimension with eps=0: 0, not 0/0.
        return np.divide(centred, std, out=np.zeros_like(centred), where=std > 0)

    c = bn(z_a).T @ bn(z_b) / n
    on_diag = np.sum((1.0 - np.diag(c)) ** 2)
    off_diag = np.sum(c**2) - np.sum(np.diag(c) ** 2)
    return c, on_diag, off_diag


def reference_loss(z_a, z_b, lambd=0.0051, eps=1e-5):
    _, on_diag, off_diag = reference_terms(z_a, z_b, eps)
    return on_diag + lambd * off_diag


def official_loss_jax(z_a, z_b, lambd=0.0051, eps=1e-5):
    """The official formulation in jax.numpy, for gradients by plain autodiff (use in float64).

    A constant column standardises to 0 (the documented convention), by a where whose other
    branch is never 0/0, so that autodiff gives it a zero gradient rather than NaN."""

    def bn(z):
        shifted = z - z[0]  # Exact for a constant column, whatever the mean's rounding.
        centred = shifted - shifted.mean(0)
        variance = jnp.mean(centred**2, 0) + eps
        positive = variance > 0
        return jnp.where(positive, centred / jnp.sqrt(jnp.where(positive, variance, 1.0)), 0.0)

    c = bn(z_a).T @ bn(z_b) / z_a.shape[0]
    off_diagonal = jnp.sum(c**2) - jnp.sum(jnp.diag(c) ** 2)
    return jnp.sum((1.0 - jnp.diag(c)) ** 2) + lambd * off_diagonal


def random_embeddings(seed, n, d, correlated=False):
    rng = np.random.default_rng(seed)
    if correlated:
        # Low-rank shared structure plus a view-specific perturbation: C far from random, with
        # large off-diagonal entries and diagonal entries close to 1.
        base = rng.normal(size=(n, 4)) @ rng.normal(size=(4, d)) + 0.3 * rng.normal(size=(n, d))
        z_a = base + 0.1 * rng.normal(size=(n, d))
        z_b = base + 0.1 * rng.normal(size=(n, d))
    else:
        z_a = rng.normal(size=(n, d)) * rng.uniform(0.5, 3.0, size=d) + rng.normal(size=d)
        z_b = rng.normal(size=(n, d))
    return z_a.astype(np.float32), z_b.astype(np.float32)


def assert_tree_close(got, want, rtol=RTOL):
    """Leaf by leaf, relative to each leaf's largest |value| (chex takes one atol per call)."""
    chex.assert_trees_all_equal_structs(got, want)
    for g, w in zip(jax.tree.leaves(got), jax.tree.leaves(want)):
        chex.assert_trees_all_close(g, w, rtol=rtol, atol=rtol * float(np.max(np.abs(w))))


@pytest.mark.parametrize("method", ["dense", "gram", "auto"])
@pytest.mark.parametrize("correlated", [False, True])
@pytest.mark.parametrize("shape", [(32, 16), (16, 40), (7, 5)])
def test_matches_float64_reference(method, correlated, shape):
    z_a, z_b = random_embeddings(0, *shape, correlated=correlated)
    loss, terms = bt_jax.barlow_twins_loss(z_a, z_b, method=method, return_terms=True)
    _, on_diag, off_diag = reference_terms(z_a, z_b)
    chex.assert_trees_all_close(terms.invariance, on_diag, rtol=RTOL, atol=1e-6)
    chex.assert_trees_all_close(terms.redundancy, off_diag, rtol=RTOL)
    chex.assert_trees_all_close(loss, on_diag + 0.0051 * off_diag, rtol=RTOL)
    chex.assert_type(loss, jnp.float32)
    chex.assert_shape(loss, ())


def test_cross_correlation_matches_reference():
    z_a, z_b = random_embeddings(1, 24, 10, correlated=True)
    c_ref, _, _ = reference_terms(z_a, z_b)
    c = bt_jax.cross_correlation(z_a, z_b)
    chex.assert_shape(c, (10, 10))
    chex.assert_trees_all_close(c, c_ref, rtol=RTOL, atol=1e-6)


def test_eps_zero_is_the_papers_normalised_cross_correlation():
    z_a, z_b = random_embeddings(2, 20, 6, correlated=True)
    a = z_a.astype(np.float64) - z_a.mean(0)
    b = z_b.astype(np.float64) - z_b.mean(0)
    # The seed formula: C_ij = sum_b a_bi b_bj / (||a_i|| ||b_j||) on centred columns.
    c_seed = (a.T @ b) / np.outer(np.linalg.norm(a, axis=0), np.linalg.norm(b, axis=0))
    chex.assert_trees_all_close(
        bt_jax.cross_correlation(z_a, z_b, eps=0.0), c_seed, rtol=RTOL, atol=1e-6
    )
    expected = np.sum((1 - np.diag(c_seed)) ** 2) + 0.0051 * (
        np.sum(c_seed**2) - np.sum(np.diag(c_seed) ** 2)
    )
    for method in ("dense", "gram"):
        chex.assert_trees_all_close(
            bt_jax.barlow_twins_loss(z_a, z_b, eps=0.0, method=method), expected, rtol=RTOL
        )


def test_identical_views_of_decorrelated_embeddings_give_zero_loss():
    # Orthogonal, centred columns with equal norms: C is exactly the identity.
    q, _ = np.linalg.qr(np.random.default_rng(3).normal(size=(16, 8)))
    q = q - q.mean(0)
    q, _ = np.linalg.qr(q)
    z = (q * np.sqrt(16)).astype(np.float32)
    c = bt_jax.cross_correlation(z, z, eps=0.0)
    chex.assert_trees_all_close(c, np.eye(8), atol=2e-2)  # Not exact: centring after QR.
    terms = bt_jax.barlow_twins_terms(z, z, eps=0.0)
    chex.assert_trees_all_close(terms.invariance, reference_terms(z, z, eps=0.0)[1], atol=1e-5)


@pytest.mark.parametrize("shape", [(32, 16), (12, 48)])
def test_methods_agree_on_values_and_gradients(shape):
    z_a, z_b = random_embeddings(4, *shape, correlated=True)
    results = {}
    for method in ("dense", "gram"):
        fn = functools.partial(bt_jax.barlow_twins_loss, method=method)
        results[method] = jax.jit(jax.value_and_grad(fn, argnums=(0, 1)))(z_a, z_b)
    assert_tree_close(results["gram"], results["dense"])


def test_auto_picks_the_cheaper_method():
    assert loss_lib.choose_method(256, 8192) == "gram"
    assert loss_lib.choose_method(2048, 2048) == "dense"
    assert loss_lib.choose_method(1024, 2048) == "dense"


def test_check_grads_float64():
    z_a, z_b = random_embeddings(5, 10, 6, correlated=True)
    with jax.enable_x64(True):
        za, zb = jnp.asarray(z_a, jnp.float64), jnp.asarray(z_b, jnp.float64)
        for method in ("dense", "gram"):
            fn = jax.jit(functools.partial(bt_jax.barlow_twins_loss, method=method, lambd=0.1))
            check_grads(fn, (za, zb), order=2, modes=("rev",), eps=1e-4)
            chex.assert_type(fn(za, zb), jnp.float64)
        check_grads(fn, (za, zb), order=1, modes=("fwd",), eps=1e-4)  # Forward mode works too.
        # The standardisation's derivative is written by hand, eps's part too.
        by_eps = jax.jit(lambda eps: bt_jax.barlow_twins_loss(za * 1e-2, zb * 1e-2, eps=eps))
        check_grads(by_eps, (jnp.float64(1e-3),), order=1, modes=("fwd", "rev"), eps=1e-6)


def test_invariant_to_positive_rescaling_and_batch_permutation():
    z_a, z_b = random_embeddings(6, 24, 12, correlated=True)
    base = bt_jax.barlow_twins_loss(z_a, z_b, eps=0.0)
    scale = np.random.default_rng(7).uniform(0.1, 10.0, size=12).astype(np.float32)
    chex.assert_trees_all_close(
        bt_jax.barlow_twins_loss(z_a * scale, z_b / scale, eps=0.0), base, rtol=RTOL
    )
    perm = np.random.default_rng(8).permutation(24)
    chex.assert_trees_all_close(
        bt_jax.barlow_twins_loss(z_a[perm], z_b[perm], eps=0.0), base, rtol=RTOL
    )
    # Permuting only one view breaks the pairing: a different loss.
    assert abs(float(bt_jax.barlow_twins_loss(z_a[perm], z_b, eps=0.0)) - float(base)) > 1e-2


@pytest.mark.parametrize("method", ["dense", "gram"])
def test_bfloat16_inputs_give_float32_loss(method):
    z_a, z_b = random_embeddings(9, 32, 16, correlated=True)
    za16, zb16 = jnp.asarray(z_a, jnp.bfloat16), jnp.asarray(z_b, jnp.bfloat16)
    loss = bt_jax.barlow_twins_loss(za16, zb16, method=method)
    chex.assert_type(loss, jnp.float32)
    # Computed in float32 from the rounded inputs: matches the reference on those inputs exactly.
    chex.assert_trees_all_close(
        loss, reference_loss(np.asarray(za16, np.float32), np.asarray(zb16, np.float32)), rtol=RTOL
    )
    grads = jax.jit(jax.grad(bt_jax.barlow_twins_loss, argnums=(0, 1)))(za16, zb16)
    chex.assert_type(grads, jnp.bfloat16)
    chex.assert_tree_all_finite(grads)


# ---------------------------------------------------------------------------------------------
# The edge: what is accepted, what is refused and how.


@pytest.mark.parametrize(
    "z_a, z_b, kwargs, match",
    [
        (np.zeros((4, 3, 2)), np.zeros((4, 3, 2)), {}, "2-D"),
        (np.zeros((4,)), np.zeros((4,)), {}, "2-D"),
        (np.zeros((4, 3)), np.zeros((4, 5)), {}, "same shape"),
        (np.zeros((1, 3)), np.zeros((1, 3)), {}, "at least 2"),
        (np.zeros((4, 3), np.int32), np.zeros((4, 3), np.int32), {}, "floating point"),
        ([[1, 2], [3, 4]], [[1, 2], [3, 4]], {}, "floating point"),
        ([[1.0, 2.0], [3.0]], [[1.0, 2.0], [3.0, 4.0]], {}, "z_a must be an array"),
        (np.zeros((4, 3)), np.zeros((4, 3)), {"lambd": -0.1}, "lambd must be .* got -0.1"),
        (np.zeros((4, 3)), np.zeros((4, 3)), {"lambd": float("nan")}, "lambd must be .* got nan"),
        (np.zeros((4, 3)), np.zeros((4, 3)), {"lambd": float("inf")}, "lambd must be .* got inf"),
        (np.zeros((4, 3)), np.zeros((4, 3)), {"lambd": "0.1"}, "lambd must be a number"),
        (np.zeros((4, 3)), np.zeros((4, 3)), {"method": "fast"}, "method"),
        (np.zeros((4, 3)), np.zeros((4, 3)), {"eps": -1.0}, "eps must be .* got -1.0"),
        (np.zeros((4, 3)), np.zeros((4, 3)), {"eps": float("nan")}, "eps must be .* got nan"),
        (np.zeros((4, 3)), np.zeros((4, 3)), {"eps": np.float32("inf")}, "eps must be .* got inf"),
    ],
)
def test_bad_inputs_raise_clear_errors(z_a, z_b, kwargs, match):
    with pytest.raises(loss_lib.LossError, match=match) as raised:
        bt_jax.barlow_twins_loss(z_a, z_b, **kwargs)
    # One type for callers: the project's user-error base class, and still a ValueError.
    assert isinstance(raised.value, errors.Error) and isinstance(raised.value, ValueError)
    assert "\n" not in str(raised.value)


def test_cross_correlation_checks_its_arguments_too():
    with pytest.raises(loss_lib.LossError, match="eps must be .* got nan"):
        bt_jax.cross_correlation(np.ones((4, 3)), np.ones((4, 3)), eps=float("nan"))


def test_lists_and_numpy_arrays_are_accepted_as_arrays():
    z_a, z_b = random_embeddings(13, 12, 5, correlated=True)
    want = bt_jax.barlow_twins_loss(jnp.asarray(z_a), jnp.asarray(z_b), return_terms=True)
    chex.assert_trees_all_equal(bt_jax.barlow_twins_loss(z_a, z_b, return_terms=True), want)
    chex.assert_trees_all_equal(
        bt_jax.barlow_twins_loss(z_a.tolist(), z_b.tolist(), return_terms=True), want
    )
    chex.assert_trees_all_equal(
        bt_jax.cross_correlation(z_a.tolist(), z_b.tolist()), bt_jax.cross_correlation(z_a, z_b)
    )


def test_traced_lambd_and_eps_are_not_checked_but_work_in_a_sweep():
    z_a, z_b = random_embeddings(14, 16, 6)
    lambds = jnp.asarray([0.0, 0.0051, 0.1])
    epses = jnp.asarray([0.0, 1e-5, 1e-3])
    sweep = jax.jit(
        jax.vmap(lambda lambd, eps: bt_jax.barlow_twins_loss(z_a, z_b, lambd=lambd, eps=eps))
    )
    want = [reference_loss(z_a, z_b, float(lam), float(e)) for lam, e in zip(lambds, epses)]
    chex.assert_trees_all_close(sweep(lambds, epses), np.asarray(want), rtol=RTOL)
    # A traced NaN has no value at trace time: it is not refused, it propagates (documented).
    assert np.isnan(sweep(jnp.asarray([np.nan]), jnp.asarray([1e-5]))[0])


# ---------------------------------------------------------------------------------------------
# Degenerate and extreme embeddings.


def with_constant_dimensions(z, value):
    z = np.array(z)
    z[:, 1] = value  # Constant over the batch: a collapsed dimension.
    z[:, 3] = 0.0  # All zero: a dead ReLU.
    return z


@pytest.mark.parametrize("method", ["dense", "gram"])
@pytest.mark.parametrize("eps", [0.0, 1e-5])
def test_a_constant_dimension_standardises_to_zero(method, eps):
    z_a, z_b = random_embeddings(15, 7, 6, correlated=True)
    # 0.1 is not a float32 sum-exact value: a naive mean of 7 copies misses it by an ulp, and
    # the column would standardise to +-1 noise, not 0.
    z_a = with_constant_dimensions(z_a, np.float32(0.1))
    loss_fn = functools.partial(bt_jax.barlow_twins_loss, eps=eps, method=method)
    (loss, terms), grads = jax.jit(
        jax.value_and_grad(
            functools.partial(loss_fn, return_terms=True), argnums=(0, 1), has_aux=True
        )
    )(z_a, z_b)
    chex.assert_tree_all_finite((loss, grads))
    # Rows 1 and 3 of C are exactly 0, so each adds exactly 1 to the invariance.
    chex.assert_trees_all_equal(
        np.asarray(bt_jax.cross_correlation(z_a, z_b, eps=eps))[[1, 3]],
        np.zeros((2, 6), np.float32),
    )
    chex.assert_trees_all_close(tuple(terms), reference_terms(z_a, z_b, eps)[1:], rtol=RTOL)
    with jax.enable_x64(True):
        want = jax.grad(functools.partial(official_loss_jax, eps=eps), argnums=(0, 1))(
            jnp.asarray(z_a, jnp.float64), jnp.asarray(z_b, jnp.float64)
        )
    assert_tree_close(grads, want)
    if eps == 0.0:  # No direction to push a constant column in: 0, not 0/0.
        chex.assert_trees_all_equal(np.asarray(grads[0])[:, [1, 3]], np.zeros((7, 2), np.float32))
    else:  # As BatchNorm: the centring's gradient over sqrt(eps).
        assert np.min(np.abs(np.asarray(grads[0])[:, [1, 3]]).max(0)) > 1.0


def magnitude_problem():
    # Uncorrelated views: with C_ii near 1, the invariance would be a cancellation-limited 1e-4.
    z_a, z_b = random_embeddings(16, 24, 10)
    return z_a + 3.0, z_b  # An offset: the centring must not cancel it away at any scale.


@pytest.mark.parametrize("method", ["dense", "gram"])
@pytest.mark.parametrize("scale", [1e-30, 1e30])
def test_any_magnitude_gives_the_unit_scale_loss_and_gradients(method, scale):
    """float32 squares overflow above ~1.8e19: the old loss was D with zero gradients there."""
    z_a, z_b = magnitude_problem()
    fn = jax.jit(
        jax.value_and_grad(
            functools.partial(bt_jax.barlow_twins_loss, eps=0.0, method=method, return_terms=True),
            argnums=(0, 1),
            has_aux=True,
        )
    )
    want = fn(z_a, z_b)
    (loss, terms), grads = fn(z_a * np.float32(scale), z_b * np.float32(scale))
    chex.assert_trees_all_close((loss, terms), want[0], rtol=RTOL)
    # The loss is scale-invariant, so its gradient scales as 1 / scale.
    assert_tree_close(jax.tree.map(lambda g: g * np.float32(scale), grads), want[1])


@pytest.mark.parametrize("method", ["dense", "gram"])
def test_powers_of_two_scales_are_exact(method):
    """The per-column scale is a power of two: the value is bitwise the unit-scale value."""
    z_a, z_b = magnitude_problem()
    fn = jax.jit(
        jax.value_and_grad(
            functools.partial(bt_jax.barlow_twins_loss, eps=0.0, method=method), argnums=(0, 1)
        )
    )
    want_loss, want_grads = fn(z_a, z_b)
    for power in (-100, 60):
        loss, grads = fn(z_a * np.float32(2.0**power), z_b * np.float32(2.0**power))
        chex.assert_trees_all_equal(loss, want_loss)
        chex.assert_trees_all_equal(
            jax.tree.map(lambda g, power=power: g * np.float32(2.0**power), grads), want_grads
        )


@pytest.mark.parametrize("method", ["dense", "gram"])
def test_tiny_embeddings_with_eps_are_the_eps_regime(method):
    """With eps > 0 the loss is not scale-invariant: at 1e-30, eps dwarfs the variance."""
    z_a, z_b = magnitude_problem()
    z_a, z_b = z_a * np.float32(1e-30), z_b * np.float32(1e-30)
    loss, (grad_a, grad_b) = jax.jit(
        jax.value_and_grad(
            functools.partial(bt_jax.barlow_twins_loss, method=method), argnums=(0, 1)
        )
    )(z_a, z_b)
    chex.assert_trees_all_equal(loss, np.float32(10.0))  # C rounds to 0: loss == D.
    # ...yet the gradient, ~1e-26, is the exact one (float64: z_b - mean / (N eps) per entry).
    centred = lambda z: z.astype(np.float64) - z.astype(np.float64).mean(0)  # noqa: E731
    want_a = -2.0 / (24 * 1e-5) * (centred(z_b) - centred(z_b).mean(0))
    assert_tree_close((grad_a, grad_b), (want_a, -2.0 / (24 * 1e-5) * centred(z_a)))


@pytest.mark.parametrize("method", ["dense", "gram"])
def test_the_collapse_signature(method):
    """invariance == D and redundancy == 0 exactly: constant embeddings, and no longer huge ones."""
    z_a, z_b = magnitude_problem()
    d = z_a.shape[1]
    for eps in (0.0, 1e-5):
        for collapsed in (np.zeros_like(z_a), np.float32(0.1) + np.arange(d, dtype=np.float32)):
            collapsed = np.broadcast_to(collapsed, z_a.shape)
            terms = bt_jax.barlow_twins_terms(collapsed, z_b, eps=eps, method=method)
            chex.assert_trees_all_equal(tuple(terms), (np.float32(d), np.float32(0.0)))
    # Embeddings near float32's largest values (squares ~1e76) are ordinary embeddings now.
    huge = bt_jax.barlow_twins_terms(z_a * np.float32(1e37), z_b * np.float32(1e37), method=method)
    chex.assert_trees_all_close(tuple(huge), reference_terms(z_a, z_b, eps=0.0)[1:], rtol=RTOL)
    # Non-finite embeddings are not the signature either: NaN, for the trainer to stop on.
    for bad in (np.inf, np.nan):
        z_bad = np.array(z_a)
        z_bad[2, 4] = bad
        assert np.isnan(float(bt_jax.barlow_twins_loss(z_bad, z_b, method=method)))


# ---------------------------------------------------------------------------------------------
# The loss scale: chance at initialisation, and the floor that the rank of C sets.


def test_chance_terms_of_the_papers_setting():
    terms = loss_scale.chance_terms(2048, 8192)
    assert math.isclose(terms.invariance, 8192 * 2048 / 2047)
    assert math.isclose(terms.redundancy, 8192 * 8191 / 2047)
    assert round(terms.invariance + 0.0051 * terms.redundancy, 1) == 8363.2  # The docstring's.


def test_random_embeddings_measure_the_chance_terms():
    """A statistical check: the mean of R independent draws within 5 standard errors.

    For Gaussian columns each standardised column is sqrt(N) times a uniform unit vector of the
    m = N - 1 dimensional centred subspace, so c = C_ij is the dot product of two independent
    ones: E[c^2] = 1/m, E[c^4] = 3/(m (m + 2)). Off-diagonal entries are pairwise uncorrelated
    (given a shared column, each has conditional mean 1/m), so Var(redundancy) =
    D (D-1) Var(c^2); the diagonal entries are independent, and Var((1 - c)^2) =
    E[(1-c)^4] - E[(1-c)^2]^2 = 4/m + 3/(m (m+2)) - 1/m^2.
    """
    n, d, draws = 256, 1024, 16
    m = n - 1
    keys = jax.random.split(jax.random.key(17), draws)

    @jax.jit
    @jax.vmap
    def measure(key):
        z_a, z_b = jax.random.normal(key, (2, n, d))
        return bt_jax.barlow_twins_terms(z_a, z_b, eps=0.0)

    measured = jax.tree.map(lambda t: float(np.mean(t)), measure(keys))
    expected = loss_scale.chance_terms(n, d)
    variance = loss_lib.BarlowTwinsTerms(
        invariance=d * (4 / m + 3 / (m * (m + 2)) - 1 / m**2),
        redundancy=d * (d - 1) * (3 / (m * (m + 2)) - 1 / m**2),
    )
    for name in ("invariance", "redundancy"):
        error = getattr(measured, name) - getattr(expected, name)
        standard_error = math.sqrt(getattr(variance, name) / draws)
        assert abs(error) < 5 * standard_error, (name, measured, expected, standard_error)
    # The check has teeth: 1/N instead of 1/(N-1) is ~11 standard errors off the redundancy.
    assert abs(d * (d - 1) / n - expected.redundancy) > 10 * math.sqrt(variance.redundancy / draws)


def test_the_loss_floor_is_attained():
    """D k / (1 + k): tight, reached by identical views of a tight frame with eps shrinking C.

    N=9 examples (rank r = 8), D = 32: four copies of an orthonormal basis of the centred
    subspace, so C = v / (v + eps) times a matrix of D/r - 1 = 3 off-diagonal ones per row;
    the variance v that puts C_ii at 1 / (1 + k) gives the bound exactly.
    """
    n, d, lambd, eps = 9, 32, 0.1, 1e-5
    k = lambd * (d / (n - 1) - 1)
    centred_basis, _ = np.linalg.qr(np.eye(n)[:, :-1] - 1.0 / n)  # [n, n-1], orthogonal to 1
    variance = eps / k  # v / (v + eps) = 1 / (1 + k)
    z = np.sqrt(n * variance) * np.tile(centred_basis, (1, d // (n - 1)))
    floor = loss_scale.minimum_loss(n, d, lambd)
    assert math.isclose(floor, d * k / (1 + k))
    for method in ("dense", "gram"):
        chex.assert_trees_all_close(
            bt_jax.barlow_twins_loss(z, z, lambd=lambd, eps=eps, method=method), floor, rtol=RTOL
        )
    # Random embeddings stay above it; with D <= N - 1 the floor is 0.
    z_a, z_b = random_embeddings(18, n, d, correlated=True)
    assert float(bt_jax.barlow_twins_loss(z_a, z_b, lambd=lambd)) > floor
    assert loss_scale.minimum_loss(2048, 2047) == 0.0


# ---------------------------------------------------------------------------------------------
# Across 8 simulated devices: the value and the gradients of the global batch.


def tiny_model(params, x):
    """A small two-layer network standing in for backbone + projector: x [n, 6] -> [n, D]."""
    h = jnp.tanh(x @ params["w1"])
    return h @ params["w2"]


def tiny_problem(embedding_dim, per_device_batch=3, seed=10):
    rng = np.random.default_rng(seed)
    params = {
        "w1": jnp.asarray(rng.normal(size=(6, 16)) / 2, jnp.float32),
        "w2": jnp.asarray(rng.normal(size=(16, embedding_dim)) / 4, jnp.float32),
    }
    global_batch = NUM_DEVICES * per_device_batch
    x_a = jnp.asarray(rng.normal(size=(global_batch, 6)), jnp.float32)
    x_b = jnp.asarray(x_a + 0.3 * rng.normal(size=(global_batch, 6)), jnp.float32)
    return params, x_a, x_b


def objective(params, x_a, x_b, axis_name=None, method="auto", scale=1.0, eps=1e-5):
    return bt_jax.barlow_twins_loss(
        scale * tiny_model(params, x_a),
        scale * tiny_model(params, x_b),
        lambd=0.05,
        axis_name=axis_name,
        method=method,
        eps=eps,
    )


def data_parallel_step(params, x_a, x_b, axis_name, method, scale=1.0, eps=1e-5):
    """The standard recipe: per-device value and gradient, then pmean over the axis."""
    loss, grads = jax.value_and_grad(objective)(params, x_a, x_b, axis_name, method, scale, eps)
    if axis_name is not None:
        grads = lax.pmean(grads, axis_name)
    return loss, grads


@functools.cache
def float64_reference(embedding_dim):
    """Value and parameter gradients of the tiny problem: the official formula in float64,
    differentiated by autodiff (independent of bt_jax's hand-written derivative)."""
    params, x_a, x_b = tiny_problem(embedding_dim)

    def official_objective(params, x_a, x_b):
        return official_loss_jax(tiny_model(params, x_a), tiny_model(params, x_b), lambd=0.05)

    with jax.enable_x64(True):
        to64 = lambda t: jax.tree.map(lambda x: jnp.asarray(x, jnp.float64), t)  # noqa: E731
        loss, grads = jax.value_and_grad(official_objective)(to64(params), to64(x_a), to64(x_b))
        return jax.tree.map(np.asarray, (loss, grads))


def shard_batch(x):
    """[N, ...] -> [devices, N / devices, ...]: pmap's layout of a batch split over devices."""
    return x.reshape(NUM_DEVICES, -1, *x.shape[1:])


def same_on_every_device(tree):
    """chex's with_pmap reduce_fn: each device holds the same global value; keep device 0's."""
    first = jax.tree.map(lambda x: x[0], tree)
    for device in range(1, NUM_DEVICES):
        assert_tree_close(jax.tree.map(lambda x, d=device: x[d], tree), first)
    return first


def with_rows_larger_on_one_device(x):
    """Device 5's examples (rows 15-17 of 24) ten times larger: each column's max is there."""
    return x.at[15:18].multiply(10.0)


class LossUnderTransformationsTest(chex.TestCase):
    """One body per property, run under jit, without jit, pmap, and args on / off the device.

    Under with_pmap the body passes the batch split over the 8 devices (not chex's default of
    a copy of everything on every device, which would never exercise the all-gather) and the
    loss's axis_name; elsewhere the whole batch and no axis.
    """

    def _run(self, fn, params, x_a, x_b):
        pmapped = self.variant.type == chex.ChexVariantType.WITH_PMAP
        if pmapped:
            x_a, x_b = shard_batch(x_a), shard_batch(x_b)
        step = self.variant(
            functools.partial(fn, axis_name="batch" if pmapped else None),
            axis_name="batch",
            in_axes=(None, 0, 0),
            broadcast_args_to_devices=False,
            reduce_fn=same_on_every_device,
        )
        return step(params, x_a, x_b)

    def _check_value_and_gradient(self, method, embedding_dim):
        params, x_a, x_b = tiny_problem(embedding_dim)
        loss, grads = self._run(
            functools.partial(data_parallel_step, method=method), params, x_a, x_b
        )
        chex.assert_type(loss, jnp.float32)
        assert_tree_close((loss, grads), float64_reference(embedding_dim))

    # Arguments on or off the device matter once, not per method: those variants run for dense.
    @chex.variants(
        with_jit=True, without_jit=True, with_pmap=True, with_device=True, without_device=True
    )
    def test_dense_value_and_gradient_match_float64(self):
        # Width 12: with 8 devices it pads the dense method's blocks of columns.
        self._check_value_and_gradient("dense", 12)

    @chex.variants(with_jit=True, without_jit=True, with_pmap=True)
    def test_gram_value_and_gradient_match_float64(self):
        self._check_value_and_gradient("gram", 16)

    @chex.variants(with_jit=True, without_jit=True, with_pmap=True)
    @parameterized.parameters(("dense", 1e30), ("gram", 1e-30))
    def test_any_magnitude_value_and_gradient(self, method, scale):
        # Parameter gradients of L(scale * f(params)) do not depend on the scale at all (eps=0).
        params, x_a, x_b = tiny_problem(16)
        x_a, x_b = with_rows_larger_on_one_device(x_a), with_rows_larger_on_one_device(x_b)
        want = jax.jit(
            functools.partial(data_parallel_step, axis_name=None, method=method, eps=0.0)
        )(params, x_a, x_b)
        got = self._run(
            functools.partial(data_parallel_step, method=method, scale=scale, eps=0.0),
            params,
            x_a,
            x_b,
        )
        assert_tree_close(got, want)


# pmap's variants above; shard_map and GSPMD, which chex has no variants for, here.


def batch_mesh(axis_type=jax.sharding.AxisType.Auto):
    return jax.make_mesh((NUM_DEVICES,), ("batch",), axis_types=(axis_type,))


@pytest.mark.parametrize("check_vma", [False, True])
@pytest.mark.parametrize("method", ["dense", "gram"])
def test_shard_map_equals_one_device_on_the_global_batch(method, check_vma):
    """At scale 1e30 against unit scale: the exact gradients, at any magnitude, on 8 devices."""
    params, x_a, x_b = tiny_problem(12)
    scale = 1e30
    want = jax.jit(functools.partial(data_parallel_step, axis_name=None, method=method, eps=0.0))(
        params, x_a, x_b
    )
    step = jax.jit(
        jax.shard_map(
            functools.partial(
                data_parallel_step, axis_name="batch", method=method, scale=scale, eps=0.0
            ),
            mesh=batch_mesh(),
            in_specs=(P(), P("batch"), P("batch")),
            out_specs=(P(), P()),
            check_vma=check_vma,
        )
    )
    assert_tree_close(step(params, x_a, x_b), want)


def test_unreduced_gradient_convention_under_pmap():
    """Pins the convention: each device's raw gradient, summed over devices / K, is the total."""
    params, x_a, x_b = tiny_problem(16)
    want = jax.jit(jax.grad(objective))(params, x_a, x_b)
    replicated = jax.tree.map(lambda p: jnp.stack([p] * NUM_DEVICES), params)
    raw = jax.pmap(jax.grad(functools.partial(objective, axis_name="batch")), axis_name="batch")(
        replicated, shard_batch(x_a), shard_batch(x_b)
    )
    assert_tree_close(jax.tree.map(lambda g: g.mean(0), raw), want)
    # The official code's convention would be 1/K of the total: make sure we are not that.
    with pytest.raises(AssertionError):
        assert_tree_close(jax.tree.map(lambda g: g.mean(0) / NUM_DEVICES, raw), want)


@pytest.mark.parametrize("method, scale", [("dense", 1e30), ("gram", 1e-30)])
def test_gspmd_jit_on_batch_sharded_arrays(method, scale):
    """No axis name: XLA inserts the collectives, the column max among them."""
    params, x_a, x_b = tiny_problem(16)
    x_a, x_b = with_rows_larger_on_one_device(x_a), with_rows_larger_on_one_device(x_b)
    fn = jax.jit(jax.value_and_grad(functools.partial(objective, method=method, eps=0.0)))
    want = fn(params, x_a, x_b)
    mesh = batch_mesh()
    batch_sharding = NamedSharding(mesh, P("batch"))
    x_a, x_b = jax.device_put(x_a, batch_sharding), jax.device_put(x_b, batch_sharding)
    params = jax.device_put(params, NamedSharding(mesh, P()))
    fn = jax.jit(
        jax.value_and_grad(functools.partial(objective, method=method, scale=scale, eps=0.0))
    )
    assert_tree_close(fn(params, x_a, x_b), want)


@pytest.mark.parametrize("method", ["dense", "gram"])
def test_jit_on_an_explicit_sharding_mesh(method):
    """jax.make_mesh's default Explicit axes: the same value and gradients, no sharding error."""
    params, x_a, x_b = tiny_problem(16)
    loss_fn = functools.partial(bt_jax.barlow_twins_loss, lambd=0.05, method=method)
    z_a, z_b = tiny_model(params, x_a), tiny_model(params, x_b)
    want = jax.jit(jax.value_and_grad(loss_fn, argnums=(0, 1)))(z_a, z_b)
    mesh = batch_mesh(jax.sharding.AxisType.Explicit)
    z_a = jax.device_put(z_a, NamedSharding(mesh, P("batch")))
    z_b = jax.device_put(z_b, NamedSharding(mesh, P("batch")))
    with jax.set_mesh(mesh):
        got = jax.jit(jax.value_and_grad(loss_fn, argnums=(0, 1)))(z_a, z_b)
    assert_tree_close(got, want)


def test_cross_correlation_under_pmap_is_the_global_matrix():
    z_a, z_b = random_embeddings(11, 16, 6, correlated=True)
    want = bt_jax.cross_correlation(z_a, z_b)
    got = jax.pmap(
        functools.partial(bt_jax.cross_correlation, axis_name="batch"), axis_name="batch"
    )(shard_batch(z_a), shard_batch(z_b))
    chex.assert_trees_all_close(got, jnp.broadcast_to(want, got.shape), rtol=RTOL, atol=1e-6)


def test_each_device_computes_only_its_share():
    """The per-device partial terms differ and sum to the whole: no device repeats another."""
    z_a, z_b = random_embeddings(12, 16, 16, correlated=True)
    want = bt_jax.barlow_twins_terms(z_a, z_b, method="dense")

    def partial_terms(za, zb):
        za_n, zb_n = loss_lib._global_standardized(za, zb, "batch", 1e-5)
        return loss_lib._dense_partial(
            za_n, zb_n, NUM_DEVICES, lax.axis_index("batch"), 16, lax.Precision.HIGHEST
        )

    inv, red = jax.pmap(partial_terms, axis_name="batch")(shard_batch(z_a), shard_batch(z_b))
    assert len(set(np.round(np.asarray(red), 5).tolist())) > 1
    chex.assert_trees_all_close((inv.sum(), red.sum()), tuple(want), rtol=RTOL)
