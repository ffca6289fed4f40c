"""The Barlow Twins loss: against a float64 NumPy transcription, across methods and devices."""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax import lax
from jax.test_util import check_grads
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

import bt_jax
from bt_jax import loss as loss_lib

NUM_DEVICES = 8
RTOL = 1e-5


def reference_terms(z_a, z_b, eps=1e-5):
    """NumPy float64 transcription of the official formulation: BatchNorm1d(affine=False), C / N."""
    z_a = np.asarray(z_a, np.float64)
    z_b = np.asarray(z_b, np.float64)
    n = z_a.shape[0]

    def bn(z):
        return (z - z.mean(0)) / np.sqrt(z.var(0) + eps)

    c = bn(z_a).T @ bn(z_b) / n
    on_diag = np.sum((1.0 - np.diag(c)) ** 2)
    off_diag = np.sum(c**2) - np.sum(np.diag(c) ** 2)
    return c, on_diag, off_diag


def reference_loss(z_a, z_b, lambd=0.0051, eps=1e-5):
    _, on_diag, off_diag = reference_terms(z_a, z_b, eps)
    return on_diag + lambd * off_diag


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


@pytest.mark.parametrize("method", ["dense", "gram", "auto"])
@pytest.mark.parametrize("correlated", [False, True])
@pytest.mark.parametrize("shape", [(32, 16), (16, 40), (7, 5)])
def test_matches_float64_reference(method, correlated, shape):
    z_a, z_b = random_embeddings(0, *shape, correlated=correlated)
    loss, terms = bt_jax.barlow_twins_loss(z_a, z_b, method=method, return_terms=True)
    _, on_diag, off_diag = reference_terms(z_a, z_b)
    np.testing.assert_allclose(terms.invariance, on_diag, rtol=RTOL, atol=1e-6)
    np.testing.assert_allclose(terms.redundancy, off_diag, rtol=RTOL)
    np.testing.assert_allclose(loss, on_diag + 0.0051 * off_diag, rtol=RTOL)
    assert loss.dtype == jnp.float32 and loss.shape == ()


def test_cross_correlation_matches_reference():
    z_a, z_b = random_embeddings(1, 24, 10, correlated=True)
    c_ref, _, _ = reference_terms(z_a, z_b)
    c = bt_jax.cross_correlation(z_a, z_b)
    assert c.shape == (10, 10)
    np.testing.assert_allclose(c, c_ref, rtol=RTOL, atol=1e-6)


def test_eps_zero_is_the_papers_normalised_cross_correlation():
    z_a, z_b = random_embeddings(2, 20, 6, correlated=True)
    a = z_a.astype(np.float64) - z_a.mean(0)
    b = z_b.astype(np.float64) - z_b.mean(0)
    # The seed formula: C_ij = sum_b a_bi b_bj / (||a_i|| ||b_j||) on centred columns.
    c_seed = (a.T @ b) / np.outer(np.linalg.norm(a, axis=0), np.linalg.norm(b, axis=0))
    np.testing.assert_allclose(bt_jax.cross_correlation(z_a, z_b, eps=0.0), c_seed,
                               rtol=RTOL, atol=1e-6)
    expected = np.sum((1 - np.diag(c_seed)) ** 2) + 0.0051 * (
        np.sum(c_seed**2) - np.sum(np.diag(c_seed) ** 2))
    for method in ("dense", "gram"):
        np.testing.assert_allclose(
            bt_jax.barlow_twins_loss(z_a, z_b, eps=0.0, method=method), expected, rtol=RTOL)


def test_identical_views_of_decorrelated_embeddings_give_zero_loss():
    # Orthogonal, centred columns with equal norms: C is exactly the identity.
    q, _ = np.linalg.qr(np.random.default_rng(3).normal(size=(16, 8)))
    q = q - q.mean(0)
    q, _ = np.linalg.qr(q)
    z = (q * np.sqrt(16)).astype(np.float32)
    c = bt_jax.cross_correlation(z, z, eps=0.0)
    assert np.max(np.abs(np.asarray(c) - np.eye(8))) < 2e-2  # Not exact: centring after QR.
    terms = bt_jax.barlow_twins_terms(z, z, eps=0.0)
    np.testing.assert_allclose(terms.invariance, reference_terms(z, z, eps=0.0)[1], atol=1e-5)


@pytest.mark.parametrize("shape", [(32, 16), (12, 48)])
def test_methods_agree_on_values_and_gradients(shape):
    z_a, z_b = random_embeddings(4, *shape, correlated=True)
    results = {}
    for method in ("dense", "gram", "auto"):
        fn = functools.partial(bt_jax.barlow_twins_loss, method=method)
        results[method] = jax.value_and_grad(fn, argnums=(0, 1))(z_a, z_b)
    for method in ("gram", "auto"):
        np.testing.assert_allclose(results[method][0], results["dense"][0], rtol=RTOL)
        for got, want in zip(results[method][1], results["dense"][1]):
            scale = np.max(np.abs(want))
            np.testing.assert_allclose(got, want, rtol=RTOL, atol=RTOL * scale)


def test_auto_picks_the_cheaper_method():
    assert loss_lib.choose_method(256, 8192) == "gram"
    assert loss_lib.choose_method(2048, 2048) == "dense"
    assert loss_lib.choose_method(1024, 2048) == "dense"


def test_check_grads_float64():
    z_a, z_b = random_embeddings(5, 10, 6, correlated=True)
    with jax.enable_x64(True):
        za, zb = jnp.asarray(z_a, jnp.float64), jnp.asarray(z_b, jnp.float64)
        for method in ("dense", "gram"):
            fn = functools.partial(bt_jax.barlow_twins_loss, method=method, lambd=0.1)
            check_grads(fn, (za, zb), order=2, modes=("rev",), eps=1e-4)
            assert fn(za, zb).dtype == jnp.float64


def test_invariant_to_positive_rescaling_and_batch_permutation():
    z_a, z_b = random_embeddings(6, 24, 12, correlated=True)
    base = bt_jax.barlow_twins_loss(z_a, z_b, eps=0.0)
    scale = np.random.default_rng(7).uniform(0.1, 10.0, size=12).astype(np.float32)
    np.testing.assert_allclose(
        bt_jax.barlow_twins_loss(z_a * scale, z_b / scale, eps=0.0), base, rtol=RTOL)
    perm = np.random.default_rng(8).permutation(24)
    np.testing.assert_allclose(
        bt_jax.barlow_twins_loss(z_a[perm], z_b[perm], eps=0.0), base, rtol=RTOL)
    # Permuting only one view breaks the pairing: a different loss.
    assert abs(float(bt_jax.barlow_twins_loss(z_a[perm], z_b, eps=0.0)) - float(base)) > 1e-2


@pytest.mark.parametrize("method", ["dense", "gram"])
def test_bfloat16_inputs_give_float32_loss(method):
    z_a, z_b = random_embeddings(9, 32, 16, correlated=True)
    za16, zb16 = jnp.asarray(z_a, jnp.bfloat16), jnp.asarray(z_b, jnp.bfloat16)
    loss = bt_jax.barlow_twins_loss(za16, zb16, method=method)
    assert loss.dtype == jnp.float32
    # Computed in float32 from the rounded inputs: matches the reference on those inputs exactly.
    np.testing.assert_allclose(
        loss, reference_loss(np.asarray(za16, np.float32), np.asarray(zb16, np.float32)), rtol=RTOL)
    grads = jax.grad(bt_jax.barlow_twins_loss, argnums=(0, 1))(za16, zb16)
    assert all(g.dtype == jnp.bfloat16 and bool(jnp.all(jnp.isfinite(g))) for g in grads)


@pytest.mark.parametrize(
    "z_a, z_b, kwargs, match",
    [
        (np.zeros((4, 3, 2)), np.zeros((4, 3, 2)), {}, "2-D"),
        (np.zeros((4,)), np.zeros((4,)), {}, "2-D"),
        (np.zeros((4, 3)), np.zeros((4, 5)), {}, "same shape"),
        (np.zeros((1, 3)), np.zeros((1, 3)), {}, "at least 2"),
        (np.zeros((4, 3), np.int32), np.zeros((4, 3), np.int32), {}, "floating point"),
        (np.zeros((4, 3)), np.zeros((4, 3)), {"lambd": -0.1}, "lambd"),
        (np.zeros((4, 3)), np.zeros((4, 3)), {"method": "fast"}, "method"),
        (np.zeros((4, 3)), np.zeros((4, 3)), {"eps": -1.0}, "eps"),
    ],
)
def test_bad_inputs_raise_clear_errors(z_a, z_b, kwargs, match):
    with pytest.raises(ValueError, match=match):
        bt_jax.barlow_twins_loss(z_a, z_b, **kwargs)


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


def objective(params, x_a, x_b, axis_name=None, method="auto"):
    return bt_jax.barlow_twins_loss(tiny_model(params, x_a), tiny_model(params, x_b),
                                    lambd=0.05, axis_name=axis_name, method=method)


def assert_tree_close(got, want, rtol=RTOL):
    for g, w in zip(jax.tree.leaves(got), jax.tree.leaves(want)):
        np.testing.assert_allclose(g, w, rtol=rtol, atol=rtol * float(np.max(np.abs(w))))


def batch_mesh():
    return jax.make_mesh((NUM_DEVICES,), ("batch",), axis_types=(jax.sharding.AxisType.Auto,))


def data_parallel_step(params, x_a, x_b, method):
    """The standard recipe: per-device value and gradient, then pmean over the axis."""
    loss, grads = jax.value_and_grad(objective)(params, x_a, x_b, "batch", method)
    return loss, lax.pmean(grads, "batch")


# Embedding widths: divisible by 8 and not (12 pads the dimension blocks); 40 > 2N picks gram.
@pytest.mark.parametrize("method", ["dense", "gram"])
@pytest.mark.parametrize("embedding_dim", [16, 12])
def test_pmap_equals_one_device_on_the_global_batch(method, embedding_dim):
    params, x_a, x_b = tiny_problem(embedding_dim)
    want_loss, want_grads = jax.value_and_grad(objective)(params, x_a, x_b, None, method)
    replicated = jax.tree.map(lambda p: jnp.stack([p] * NUM_DEVICES), params)
    shard = lambda x: x.reshape(NUM_DEVICES, -1, x.shape[-1])  # noqa: E731
    step = jax.pmap(functools.partial(data_parallel_step, method=method), axis_name="batch")
    losses, grads = step(replicated, shard(x_a), shard(x_b))
    np.testing.assert_allclose(losses, np.full(NUM_DEVICES, want_loss), rtol=RTOL)
    for device in range(NUM_DEVICES):
        assert_tree_close(jax.tree.map(lambda g: g[device], grads), want_grads)


@pytest.mark.parametrize("check_vma", [False, True])
@pytest.mark.parametrize("method", ["dense", "gram"])
def test_shard_map_equals_one_device_on_the_global_batch(method, check_vma):
    params, x_a, x_b = tiny_problem(12)
    want_loss, want_grads = jax.value_and_grad(objective)(params, x_a, x_b, None, method)
    mesh = batch_mesh()
    step = jax.jit(jax.shard_map(
        functools.partial(data_parallel_step, method=method), mesh=mesh,
        in_specs=(P(), P("batch"), P("batch")), out_specs=(P(), P()), check_vma=check_vma))
    loss, grads = step(params, x_a, x_b)
    np.testing.assert_allclose(loss, want_loss, rtol=RTOL)
    assert_tree_close(grads, want_grads)


def test_unreduced_gradient_convention_under_pmap():
    """Pins the convention: each device's raw gradient, summed over devices / K, is the total."""
    params, x_a, x_b = tiny_problem(16)
    want = jax.grad(objective)(params, x_a, x_b)
    replicated = jax.tree.map(lambda p: jnp.stack([p] * NUM_DEVICES), params)
    shard = lambda x: x.reshape(NUM_DEVICES, -1, x.shape[-1])  # noqa: E731
    raw = jax.pmap(jax.grad(functools.partial(objective, axis_name="batch")),
                   axis_name="batch")(replicated, shard(x_a), shard(x_b))
    assert_tree_close(jax.tree.map(lambda g: g.mean(0), raw), want)
    # The official code's convention would be 1/K of the total: make sure we are not that.
    with pytest.raises(AssertionError):
        assert_tree_close(jax.tree.map(lambda g: g.mean(0) / NUM_DEVICES, raw), want)


@pytest.mark.parametrize("method", ["dense", "gram"])
def test_gspmd_jit_on_batch_sharded_arrays(method):
    params, x_a, x_b = tiny_problem(16)
    want_loss, want_grads = jax.value_and_grad(objective)(params, x_a, x_b, None, method)
    mesh = batch_mesh()
    batch_sharding = NamedSharding(mesh, P("batch"))
    x_a, x_b = jax.device_put(x_a, batch_sharding), jax.device_put(x_b, batch_sharding)
    params = jax.device_put(params, NamedSharding(mesh, P()))
    fn = jax.jit(jax.value_and_grad(functools.partial(objective, method=method)))
    loss, grads = fn(params, x_a, x_b)
    np.testing.assert_allclose(loss, want_loss, rtol=RTOL)
    assert_tree_close(grads, want_grads)


def test_cross_correlation_under_pmap_is_the_global_matrix():
    z_a, z_b = random_embeddings(11, 16, 6, correlated=True)
    want = bt_jax.cross_correlation(z_a, z_b)
    got = jax.pmap(functools.partial(bt_jax.cross_correlation, axis_name="batch"),
                   axis_name="batch")(z_a.reshape(8, 2, 6), z_b.reshape(8, 2, 6))
    for device in range(NUM_DEVICES):
        np.testing.assert_allclose(got[device], want, rtol=RTOL, atol=1e-6)


def test_each_device_computes_only_its_share():
    """The per-device partial terms differ and sum to the whole: no device repeats another."""
    z_a, z_b = random_embeddings(12, 16, 16, correlated=True)
    want = bt_jax.barlow_twins_terms(z_a, z_b, method="dense")

    def partial_terms(za, zb):
        za_n, zb_n = loss_lib._global_standardized(za, zb, "batch", 1e-5)
        return loss_lib._dense_partial(za_n, zb_n, NUM_DEVICES, lax.axis_index("batch"), 16,
                                       lax.Precision.HIGHEST)

    inv, red = jax.pmap(partial_terms, axis_name="batch")(z_a.reshape(8, 2, 16),
                                                          z_b.reshape(8, 2, 16))
    assert len(set(np.round(np.asarray(red), 5).tolist())) > 1
    np.testing.assert_allclose(inv.sum(), want.invariance, rtol=RTOL)
    np.testing.assert_allclose(red.sum(), want.redundancy, rtol=RTOL)


@pytest.mark.parametrize("method", ["dense", "gram"])
def test_jit_on_an_explicit_sharding_mesh(method):
    """jax.make_mesh's default Explicit axes: the same value and gradients, no sharding error."""
    params, x_a, x_b = tiny_problem(16)
    want_loss = objective(params, x_a, x_b, None, method)
    mesh = jax.make_mesh((NUM_DEVICES,), ("batch",),
                         axis_types=(jax.sharding.AxisType.Explicit,))
    z_a = jax.device_put(tiny_model(params, x_a), NamedSharding(mesh, P("batch")))
    z_b = jax.device_put(tiny_model(params, x_b), NamedSharding(mesh, P("batch")))
    with jax.set_mesh(mesh):
        fn = jax.jit(jax.value_and_grad(
            functools.partial(bt_jax.barlow_twins_loss, lambd=0.05, method=method),
            argnums=(0, 1)))
        loss, grads = fn(z_a, z_b)
    want_z_grads = jax.grad(
        functools.partial(bt_jax.barlow_twins_loss, lambd=0.05, method=method), argnums=(0, 1))(
            tiny_model(params, x_a), tiny_model(params, x_b))
    np.testing.assert_allclose(loss, want_loss, rtol=RTOL)
    assert_tree_close(grads, want_z_grads)
