"""bt_jax.data.augment: the host half of the two views as pure functions of (image, seed)."""

import numpy as np
import pytest

from bt_jax import data
from bt_jax.data import augment
from bt_jax.data.tf_runtime import tf


def test_pure_function_of_seed_and_views_differ():
    rng = np.random.default_rng(0)
    image = tf.constant(rng.integers(0, 256, (40, 30, 3), dtype=np.uint8))
    seed = augment.view_seed(7, 2, 11, "a")
    x = augment.augment_view(image, seed, view="a", image_size=24)
    y = augment.augment_view(image, seed, view="a", image_size=24)
    z = augment.augment_view(image, augment.view_seed(7, 2, 11, "b"), view="b", image_size=24)
    assert x.shape == (24, 24, 3) and x.dtype == tf.uint8
    assert x.numpy().tobytes() == y.numpy().tobytes()
    assert not np.array_equal(x, z)
    assert not np.array_equal(augment.view_seed(7, 2, 11, "a"), augment.view_seed(7, 3, 11, "a"))


def test_two_views_decoded_once_equal_each_view_alone():
    rng = np.random.default_rng(3)
    for image in (
        tf.constant(rng.integers(0, 256, (33, 47, 3), dtype=np.uint8)),
        tf.io.encode_png(rng.integers(0, 256, (33, 47, 3), dtype=np.uint8)),
    ):
        seeds = [augment.view_seed(1, 0, 5, v) for v in ("a", "b")]
        for mode in ("host", "device"):
            both = augment.augment_views(image, seeds, ["a", "b"], image_size=16, photometric=mode)
            alone = [
                augment.augment_view(image, s, view=v, image_size=16, photometric=mode)
                for s, v in zip(seeds, ("a", "b"))
            ]
            for x, y in zip(both, alone):
                np.testing.assert_array_equal(x, y)


def test_device_mode_is_the_host_recipe_without_its_photometric_ops():
    """The host part (crop, flip, resize) is the same in both modes: with every photometric
    probability at zero, host mode gives device mode's bytes."""
    rng = np.random.default_rng(4)
    image = tf.constant(rng.integers(0, 256, (30, 41, 3), dtype=np.uint8))
    no_photometric = data.ViewSpec(
        jitter_prob=0.0, grayscale_prob=0.0, blur_prob=0.0, solarize_prob=0.0
    )
    for i in range(8):
        seed = augment.view_seed(0, 0, i, "b")
        crop = augment.augment_view(image, seed, view="b", image_size=16, photometric="device")
        plain = augment.augment_view(image, seed, view=no_photometric, image_size=16)
        full = augment.augment_view(image, seed, view="b", image_size=16)
        np.testing.assert_array_equal(crop, plain)
        assert not np.array_equal(crop, full) or i > 0  # the recipe changes at least one


def test_encoded_jpeg_png_and_grayscale_inputs():
    rng = np.random.default_rng(1)
    pixels = rng.integers(0, 256, (33, 47, 3), dtype=np.uint8)
    seed = augment.view_seed(0, 0, 0, "b")
    from_array = augment.augment_view(tf.constant(pixels), seed, view="b", image_size=16)
    from_png = augment.augment_view(tf.io.encode_png(pixels), seed, view="b", image_size=16)
    np.testing.assert_array_equal(from_array, from_png)  # lossless: the same crop, same bytes
    from_jpeg = augment.augment_view(
        tf.io.encode_jpeg(pixels, quality=95), seed, view="b", image_size=16
    )
    assert from_jpeg.shape == (16, 16, 3) and from_jpeg.dtype == tf.uint8
    gray = augment.augment_view(tf.constant(pixels[..., :1]), seed, view="a", image_size=16)
    assert gray.shape == (16, 16, 3)
    # One channel in, three equal channels out, resized once: the view of the tiled image.
    tiled = augment.augment_view(
        tf.constant(np.repeat(pixels[..., :1], 3, axis=-1)),
        seed,
        view=data.CROP_FLIP,
        image_size=16,
    )
    once = augment.augment_view(
        tf.constant(pixels[..., :1]), seed, view=data.CROP_FLIP, image_size=16
    )
    np.testing.assert_array_equal(tiled, once)


def test_union_window_decode_matches_decode_then_crop():
    yy, xx = np.mgrid[0:64, 0:48]
    smooth = np.stack([yy * 4, xx * 5, (yy + xx) * 2], -1).clip(0, 255).astype(np.uint8)
    jpeg = tf.io.encode_jpeg(smooth, quality=95)
    decoded = tf.io.decode_jpeg(jpeg, channels=3).numpy().astype(int)
    windows = [[5, 7, 30, 21], [33, 1, 31, 40]]
    pixels, relative = augment._decode_windows(
        jpeg, lambda h, w: [tf.constant(win) for win in windows]
    )
    assert pixels.shape[:2] == (59, 40)  # the union of the two windows, decoded once
    for window, rel in zip(windows, relative):
        top, left, h, w = rel.numpy()
        crop = pixels.numpy()[top : top + h, left : left + w].astype(int)
        t, left_, hh, ww = window
        diff = np.abs(crop - decoded[t : t + hh, left_ : left_ + ww])
        # libjpeg's chroma upsampling at the window's edge may differ by a few levels.
        assert diff.max() <= 4 and diff.mean() < 0.5, (window, diff.max(), diff.mean())


def test_crop_window_follows_torchvision():
    for i in range(50):
        top, left, h, w = augment.random_resized_crop_window(tf.constant([i, 0]), 30, 40).numpy()
        assert 0 <= top and top + h <= 30 and 0 <= left and left + w <= 40
        assert 0.08 * 1200 - 2 * 40 <= h * w <= 1200
    # No attempt can fit a 4x-wide area: torchvision's fallback, a centre crop at ratio 4/3.
    window = augment.random_resized_crop_window(tf.constant([1, 1]), 10, 100, scale=(0.99, 1.0))
    assert window.numpy().tolist() == [0, 43, 10, 13]


def test_solarize_and_blur_semantics():
    x = tf.constant([[[127.0, 128.0, 255.0]]])  # the host ops work on the uint8 scale
    np.testing.assert_array_equal(augment.solarize(x), [[[127.0, 127.0, 0.0]]])
    flat = tf.fill([16, 16, 3], 77.0)
    np.testing.assert_allclose(augment.gaussian_blur(flat, 2.0), flat, atol=1e-4)


def test_eval_transform_resize_and_centre_crop():
    image = tf.constant(np.arange(40 * 60 * 3, dtype=np.uint8).reshape(40, 60, 3))
    out = augment.eval_transform(image, image_size=32, resize_size=36)
    assert out.shape == (32, 32, 3) and out.dtype == tf.uint8
    flat = augment.eval_transform(tf.fill([32, 32, 3], tf.constant(128, tf.uint8)), image_size=32)
    assert (flat.numpy() == 128).all()
    gray = augment.eval_transform(tf.constant(np.full((20, 30, 1), 7, np.uint8)), image_size=16)
    assert gray.shape == (16, 16, 3) and (gray.numpy() == 7).all()
    with pytest.raises(data.DataError, match="resize_size"):
        augment.eval_transform(image, image_size=32, resize_size=16)


def test_bad_arguments():
    image = tf.zeros([8, 8, 3], tf.uint8)
    with pytest.raises(data.DataError, match="view"):
        augment.augment_view(image, [0, 0], view="c", image_size=16)
    with pytest.raises(data.DataError, match="image_size must be at least 8"):
        augment.augment_view(image, [0, 0], view="a", image_size=4)
    with pytest.raises(data.DataError, match="min_crop_scale"):
        augment.augment_view(image, [0, 0], view="a", image_size=16, min_crop_scale=0.0)
    with pytest.raises(data.DataError, match="photometric must be one of"):
        augment.augment_view(image, [0, 0], view="a", image_size=16, photometric="tpu")
