"""bt_jax.data.photometric: the device-side ops against their TF twins, seed-exactness over
devices, and the same distribution of views as the host-side recipe."""

import functools
import os
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

from bt_jax import data
from bt_jax.data import augment, photometric
from bt_jax.data.tf_runtime import tf

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def random_image(shape=(20, 24, 3), seed=0):
    rng = np.random.default_rng(seed)
    x = rng.random(shape, dtype=np.float32)
    # Ties between channels: the hue kernel's branch boundaries.
    x[0, :4] = [[0.5] * 3, [0.2, 0.2, 0.7], [0.7, 0.7, 0.2], [0.3, 0.9, 0.3]]
    return x


# ----------------------------------------------------------------------------- twins
# The device ops work in pixel steps of 2^-15 (integers: the same bytes on every device count);
# their TF twins in float32 on the uint8 scale [0, 255]. They agree to a few steps, far below a
# uint8 level (128 steps).
STEP = 1.0 / photometric.ONE


def fixed_image(shape=(20, 24, 3), seed=0):
    """(int32 pixel steps, the same values as float32 on the uint8 scale) of a random image."""
    x = np.round(random_image(shape, seed) * photometric.ONE).astype(np.int32)
    return x, tf.constant(x / photometric.ONE * 255.0, tf.float32)


def assert_twins(device, host, steps):
    """device: int32 pixel steps; host: float32 on the uint8 scale."""
    np.testing.assert_allclose(
        np.asarray(photometric.from_fixed(device)), host.numpy() / 255.0, rtol=0, atol=steps * STEP
    )


@pytest.mark.parametrize(
    "name, factor",
    [
        ("brightness", 1.3),
        ("brightness", 0.6),
        ("contrast", 0.7),
        ("contrast", 1.4),
        ("saturation", 0.8),
        ("saturation", 1.2),
        ("hue", 0.08),
        ("hue", -0.1),
        ("hue", 0.5),
        ("hue", -0.5),
    ],
)
def test_jitter_ops_equal_their_tf_twins(name, factor):
    x_q, x = fixed_image()
    param = photometric.hue_q(factor) if name == "hue" else photometric.factor_q(factor)
    device = jax.jit(getattr(photometric, f"adjust_{name}"))(x_q, param)
    # A few pixel steps of rounding, and factors in steps of 2^-12 (= 8 pixel steps).
    assert_twins(device, getattr(augment, f"adjust_{name}")(x, factor), 6)


def test_grayscale_blur_solarize_equal_their_tf_twins():
    x_q, x = fixed_image()
    assert_twins(photometric.grayscale(x_q), tf.image.rgb_to_grayscale(x), 1)
    assert_twins(photometric.to_grayscale(x_q), augment.to_grayscale(x), 1)
    for level in (0, 77, photometric.BLUR_LEVELS - 1):
        sigma = float(photometric.BLUR_TABLE_SIGMAS[level])
        device = jax.jit(photometric.gaussian_blur)(x_q, level)
        assert_twins(device, augment.gaussian_blur(x, sigma), 3)
    assert photometric.BLUR_TABLE_SIGMAS[[0, -1]].tolist() == list(data.views.BLUR_SIGMA)
    assert (photometric.BLUR_TABLE.sum(axis=1) == photometric.ONE).all()
    # Solarize on the uint8 levels around the threshold: exactly PIL's (>= 128 inverted).
    levels = np.arange(120, 136, dtype=np.uint8).reshape(1, -1, 1).repeat(3, axis=2)
    device = photometric.solarize(photometric.to_fixed(levels))
    host = augment.solarize(tf.constant(levels, tf.float32))
    assert_twins(device, host, 1)
    np.testing.assert_array_equal(host.numpy(), np.where(levels >= 128, 255 - levels, levels))
    assert_twins(photometric.solarize(x_q), augment.solarize(x), 1)


def test_normalize_and_host_mode():
    images = np.arange(2 * 8 * 8 * 3, dtype=np.uint8).reshape(2, 8, 8, 3)
    expected = (images / 255.0 - np.array(data.views.IMAGENET_MEAN)) / np.array(
        data.views.IMAGENET_STD
    )
    np.testing.assert_allclose(np.asarray(photometric.normalize(images)), expected, atol=1e-6)
    batch = {
        "view_a": images,
        "view_b": images[::-1],
        "epoch": np.zeros(2, np.int32),
        "index": np.arange(2, dtype=np.int32),
    }
    out = photometric.finish_views(batch, seed=0, photometric="host")
    assert out["view_a"].dtype == jnp.float32
    np.testing.assert_allclose(np.asarray(out["view_b"]), expected[::-1], atol=1e-6)
    with pytest.raises(data.DataError, match="photometric must be one of"):
        photometric.finish_views(batch, seed=0, photometric="gpu")


def test_jitter_order_is_a_uniform_permutation():
    keys = jax.random.split(jax.random.key(1), 24_000)
    orders = np.asarray(
        jax.jit(
            jax.vmap(
                lambda k: photometric._rank_order(
                    (jax.random.bits(k, (4,), jnp.uint32) >> 16).astype(jnp.int32)
                )
            )
        )(keys)
    )
    assert (np.sort(orders, axis=1) == np.arange(4)).all()
    codes, counts = np.unique(orders @ np.array([64, 16, 4, 1]), return_counts=True)
    assert len(codes) == 24
    # Each of 24 permutations: 1000 expected, binomial sd ~31; 5 sd either way.
    assert counts.min() > 845 and counts.max() < 1155, counts


# ----------------------------------------------------------------------------- exactness


def device_batch(n=16, size=16, seed=0):
    rng = np.random.default_rng(seed)
    return {
        "view_a": rng.integers(0, 256, (n, size, size, 3), dtype=np.uint8),
        "view_b": rng.integers(0, 256, (n, size, size, 3), dtype=np.uint8),
        "epoch": rng.integers(0, 5, n).astype(np.int32),
        "index": rng.permutation(1000)[:n].astype(np.int32),
    }


FINISH = functools.partial(photometric.finish_views, seed=5, photometric="device")


@pytest.fixture(scope="module")
def one_device_views():
    batch = device_batch()
    return batch, jax.device_get(jax.jit(FINISH)(batch))


def same_bytes(a, b):
    return all(np.asarray(a[k]).tobytes() == np.asarray(b[k]).tobytes() for k in a)


def test_same_bytes_on_1_or_8_devices_under_shard_map_and_pmap(one_device_views):
    batch, one = one_device_views
    mesh = jax.make_mesh((8,), ("batch",), axis_types=(jax.sharding.AxisType.Auto,))
    sharded = jax.device_put(batch, NamedSharding(mesh, P("batch")))
    eight = jax.jit(jax.shard_map(FINISH, mesh=mesh, in_specs=P("batch"), out_specs=P("batch")))(
        sharded
    )
    assert same_bytes(one, jax.device_get(eight))
    pmapped = jax.pmap(FINISH)({k: v.reshape(8, 2, *v.shape[1:]) for k, v in batch.items()})
    assert same_bytes(one, {k: np.asarray(v).reshape(one[k].shape) for k, v in pmapped.items()})


def test_each_example_depends_only_on_its_seed_epoch_index_and_view(one_device_views):
    """Rows reordered or alone give the same bytes (a restart at step s rebuilds the same rows);
    another epoch, index or seed gives other views."""
    batch, one = one_device_views
    order = np.random.default_rng(1).permutation(16)
    shuffled = jax.jit(FINISH)({k: v[order] for k, v in batch.items()})
    assert same_bytes({k: v[order] for k, v in one.items()}, jax.device_get(shuffled))
    alone = jax.jit(FINISH)({k: v[3:4] for k, v in batch.items()})
    assert same_bytes({k: v[3:4] for k, v in one.items()}, jax.device_get(alone))
    later = jax.jit(FINISH)(dict(batch, epoch=batch["epoch"] + 1))
    assert not np.array_equal(np.asarray(later["view_a"]), one["view_a"])
    reseeded = jax.jit(functools.partial(photometric.finish_views, seed=6, photometric="device"))(
        batch
    )
    assert not np.array_equal(np.asarray(reseeded["view_b"]), one["view_b"])


def test_importable_and_runs_without_tensorflow():
    code = """
import sys
sys.modules["tensorflow"] = None  # any import of TensorFlow now fails
import numpy as np
from bt_jax import data
from bt_jax.data import photometric, views
batch = {"view_a": np.zeros((2, 16, 16, 3), np.uint8), "view_b": np.zeros((2, 16, 16, 3), np.uint8),
         "epoch": np.zeros(2, np.int32), "index": np.arange(2, dtype=np.int32)}
out = photometric.finish_views(batch, seed=0, views=data.VIEWS, photometric="device")
assert out["view_a"].shape == (2, 16, 16, 3)
assert isinstance(data.ViewSpec(), views.ViewSpec) and data.DataError
print("ok")
"""
    env = dict(os.environ, JAX_PLATFORMS="cpu", XLA_FLAGS="")
    result = subprocess.run(
        [sys.executable, "-c", code], cwd=REPO, env=env, capture_output=True, text=True, timeout=300
    )
    assert result.returncode == 0 and result.stdout.strip() == "ok", result.stderr[-2000:]


# ----------------------------------------------------------------------------- distribution


def colourful_images(n, size=32, seed=0):
    """Textured colour images: a random colour per image plus noise, so that grayscale, blur
    and hue all leave a measurable trace."""
    rng = np.random.default_rng(seed)
    colour = rng.random((n, 1, 1, 3)) * 0.8 + 0.1
    noise = rng.random((n, size, size, 3))
    return np.round(255 * (0.6 * colour + 0.4 * noise)).astype(np.uint8)


def host_and_device_views(images, num=512, image_size=16):
    """[0, 1] views of the same crops: (host mode, device mode), {view: float [num, S, S, 3]}."""
    source = data.from_arrays("photometric", images, None, images[:1], None)
    common = dict(
        global_batch=num,
        image_size=image_size,
        seed=3,
        process_index=0,
        process_count=1,
        num_workers=2,
    )
    host = next(data.pretrain_batches(source, photometric="host", **common))
    crops = next(data.pretrain_batches(source, photometric="device", **common))
    device = jax.device_get(
        jax.jit(functools.partial(photometric.photometric_views, seed=3))(crops)
    )
    host = {k: host[k] / 255.0 for k in ("view_a", "view_b")}
    return host, device


def assert_same_mean(host_stat, device_stat, what):
    """A paired test on the same crops: mean difference within 5 standard errors."""
    d = np.asarray(host_stat, np.float64) - np.asarray(device_stat, np.float64)
    se = d.std(ddof=1) / np.sqrt(len(d))
    assert abs(d.mean()) < 5 * se + 1e-4, (what, d.mean(), se)


def assert_same_rate(host_flags, device_flags, expected, what):
    """Binomial rates: each near `expected`, and near each other, within 5 standard errors."""
    n = len(host_flags)
    se = np.sqrt(max(expected * (1 - expected), 1e-3) / n)
    for flags in (host_flags, device_flags):
        assert abs(np.mean(flags) - expected) < 5 * se, (what, np.mean(flags), expected)
    assert abs(np.mean(host_flags) - np.mean(device_flags)) < 5 * np.sqrt(2) * se, what


@pytest.fixture(scope="module")
def colourful_views():
    return host_and_device_views(colourful_images(600))


@pytest.mark.parametrize("view", ["view_a", "view_b"])
def test_host_and_device_agree_in_distribution(colourful_views, view):
    host, device = (v[view] for v in colourful_views)
    # Not the crops unchanged: the device did the photometric work.
    assert np.mean(np.abs(host - device) > 2 / 255) > 0.3
    for channel in range(3):
        assert_same_mean(
            host[..., channel].mean(axis=(1, 2)),
            device[..., channel].mean(axis=(1, 2)),
            f"{view} mean {channel}",
        )
        assert_same_mean(
            host[..., channel].std(axis=(1, 2)),
            device[..., channel].std(axis=(1, 2)),
            f"{view} std {channel}",
        )
    # Saturation: the spread of the channels at each pixel (jitter and grayscale).
    assert_same_mean(
        host.std(axis=-1).mean(axis=(1, 2)),
        device.std(axis=-1).mean(axis=(1, 2)),
        f"{view} saturation",
    )

    # Blur strength: the mean absolute difference of neighbouring pixels.
    def sharpness(x):
        return np.abs(np.diff(x, axis=2)).mean(axis=(1, 2, 3))

    assert_same_mean(sharpness(host), sharpness(device), f"{view} sharpness")

    def gray(x):
        return (x.max(axis=-1) == x.min(axis=-1)).all(axis=(1, 2))

    assert_same_rate(gray(host), gray(device), 0.2, f"{view} grayscale")


def test_only_view_b_is_solarized_at_rate_point_two():
    # White in: every step but solarize keeps a view >= 0.6 (brightness >= 0.6; contrast,
    # saturation, hue, grayscale and blur leave a flat gray image flat), solarize maps it to
    # <= 0.4. A mean below 0.5 means "solarized".
    white = np.full((600, 8, 8, 3), 255, np.uint8)
    host, device = host_and_device_views(white)
    for view, rate in (("view_a", 0.0), ("view_b", 0.2)):
        assert_same_rate(
            host[view].mean(axis=(1, 2, 3)) < 0.5,
            device[view].mean(axis=(1, 2, 3)) < 0.5,
            rate,
            f"{view} solarized",
        )
