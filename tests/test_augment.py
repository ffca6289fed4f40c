"""bt_jax.data.augment: the two-view recipe as pure functions of (image, seed)."""
import numpy as np
import pytest
import tensorflow as tf

from bt_jax.data import augment


def view_means(image, view, n, image_size=16):
    """Mean of view `view` (in [0, 1]) of `image` for examples 0..n-1 of epoch 0, seed 0."""
    def one(i):
        seed = augment.view_seed(0, 0, i, view)
        x = augment.augment_view(image, seed, view=view, image_size=image_size, normalise=False)
        return tf.reduce_mean(x)

    ds = tf.data.Dataset.range(n).map(one, num_parallel_calls=tf.data.AUTOTUNE, deterministic=True)
    return np.array(list(ds.as_numpy_iterator()))


def test_only_view_b_is_solarized_at_rate_point_two():
    # White in, every step but solarize keeps a view >= 0.6 (brightness factor >= 0.6), and
    # solarize maps it to <= 0.4: a mean below 0.5 means "solarized".
    white = tf.fill([8, 8, 3], tf.constant(255, tf.uint8))
    n = 400
    rate_a = np.mean(view_means(white, "a", n) < 0.5)
    rate_b = np.mean(view_means(white, "b", n) < 0.5)
    assert rate_a == 0.0
    assert 0.14 < rate_b < 0.26, rate_b  # 0.2 +- 3 standard deviations of a binomial mean


def test_pure_function_of_seed_and_views_differ():
    rng = np.random.default_rng(0)
    image = tf.constant(rng.integers(0, 256, (40, 30, 3), dtype=np.uint8))
    seed = augment.view_seed(7, 2, 11, "a")
    x = augment.augment_view(image, seed, view="a", image_size=24)
    y = augment.augment_view(image, seed, view="a", image_size=24)
    z = augment.augment_view(image, augment.view_seed(7, 2, 11, "b"), view="b", image_size=24)
    assert x.shape == (24, 24, 3) and x.dtype == tf.float32
    assert x.numpy().tobytes() == y.numpy().tobytes()
    assert not np.allclose(x, z)
    assert not np.array_equal(augment.view_seed(7, 2, 11, "a"), augment.view_seed(7, 3, 11, "a"))


def test_encoded_jpeg_png_and_grayscale_inputs():
    rng = np.random.default_rng(1)
    pixels = rng.integers(0, 256, (33, 47, 3), dtype=np.uint8)
    seed = augment.view_seed(0, 0, 0, "b")
    from_array = augment.augment_view(tf.constant(pixels), seed, view="b", image_size=16)
    from_png = augment.augment_view(tf.io.encode_png(pixels), seed, view="b", image_size=16)
    np.testing.assert_array_equal(from_array, from_png)  # lossless: the same crop, same bytes
    from_jpeg = augment.augment_view(tf.io.encode_jpeg(pixels, quality=95), seed, view="b",
                                     image_size=16)
    assert from_jpeg.shape == (16, 16, 3)
    gray = augment.augment_view(tf.constant(pixels[..., :1]), seed, view="a", image_size=16)
    assert gray.shape == (16, 16, 3)


def test_decode_and_crop_jpeg_matches_decode_then_crop():
    yy, xx = np.mgrid[0:64, 0:48]
    smooth = np.stack([yy * 4, xx * 5, (yy + xx) * 2], -1).clip(0, 255).astype(np.uint8)
    jpeg = tf.io.encode_jpeg(smooth, quality=95)
    decoded = tf.io.decode_jpeg(jpeg, channels=3).numpy().astype(int)
    for window in ([0, 0, 64, 48], [5, 7, 30, 21], [33, 1, 31, 40]):
        crop = augment._decode_and_crop(jpeg, lambda h, w, win=window: tf.constant(win)).numpy()
        top, left, h, w = window
        diff = np.abs(crop.astype(int) - decoded[top:top + h, left:left + w])
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
    x = tf.constant([[[127 / 255, 128 / 255, 1.0]]])
    np.testing.assert_allclose(augment.solarize(x), [[[127 / 255, 127 / 255, 0.0]]], atol=1e-6)
    flat = tf.fill([16, 16, 3], 0.3)
    np.testing.assert_allclose(augment.gaussian_blur(flat, 2.0), flat, atol=1e-6)


def test_eval_transform_resize_and_centre_crop():
    image = tf.constant(np.arange(40 * 60 * 3, dtype=np.uint8).reshape(40, 60, 3))
    out = augment.eval_transform(image, image_size=32, resize_size=36)
    assert out.shape == (32, 32, 3) and out.dtype == tf.float32
    same = augment.eval_transform(tf.fill([32, 32, 3], tf.constant(128, tf.uint8)), image_size=32,
                                  normalise=False)
    np.testing.assert_allclose(same, 128 / 255, atol=1e-6)
    with pytest.raises(ValueError, match="resize_size"):
        augment.eval_transform(image, image_size=32, resize_size=16)


def test_bad_arguments():
    image = tf.zeros([8, 8, 3], tf.uint8)
    with pytest.raises(ValueError, match="view"):
        augment.augment_view(image, [0, 0], view="c", image_size=16)
    with pytest.raises(ValueError, match="image_size"):
        augment.augment_view(image, [0, 0], view="a", image_size=4)
