"""The host half of the two views, as pure TF functions: decode, crop, flip, resize, and (with
photometric="host") colour jitter, grayscale, blur and solarize; the evaluation transform.

Every random decision is drawn with TF *stateless* ops from an explicit seed (shape [2]), so
`augment_view(image, seed, ...)` is a pure function of its arguments: the same image and seed
give the same bytes whatever thread, map parallelism or process runs it. `view_seed` derives that
seed from (seed, epoch, example index, view). The recipe and its probabilities are in views.py;
photometric.py is the device-side twin of the photometric ops here.

Where the semantics differ from torchvision/PIL (the official code runs PIL transforms), and why:
- Rounding to uint8: the crop, flip and resize end in integer values (rounded half to even,
  like every view that leaves the host as uint8), and with photometric="host" the photometric
  ops run in float32 on that uint8 scale, [0, 255], and the view is rounded once more at the
  end. PIL rounds to uint8 after every step; two roundings add at most one level of
  quantisation noise, and uint8 views are 4x fewer bytes to send to the accelerator than
  float32. Normalisation happens on the device (photometric.normalize).
- RandomResizedCrop follows torchvision's sampler exactly (10 attempts of area ~ U(scale),
  log-aspect ~ U(log ratio), round-half-even sides, first valid attempt, else a centre crop
  clamped to the ratio range). We do not use `tf.image.stateless_sample_distorted_bounding_box`
  because it draws the aspect ratio uniformly (not log-uniformly) and falls back to the whole
  image. The resize is `tf.image.resize(bicubic, antialias=True)`, TF's match of PIL's
  antialiased bicubic (Keys a = -0.5 in both; PIL also rounds its intermediate pass to uint8).
  A JPEG is decoded once per example, only inside the union of its two views' crop windows
  (`decode_and_crop_jpeg`); libjpeg's chroma upsampling at a window's edge may differ from a
  full decode by a few levels.
- ColorJitter applies its four operations in a random order, like torchvision (a stateless
  permutation per view). Brightness, contrast and saturation use torchvision's definitions
  (multiply; blend with the mean of the grayscale image; blend with the grayscale image), not
  `tf.image.adjust_brightness/contrast/saturation`, which are additive, blend with the
  per-channel mean and scale S in HSV respectively. Hue uses `tf.image.adjust_hue` (a rotation
  of H in HSV, as torchvision does, but without PIL's 8-bit hue quantisation).
- Gaussian blur is an exact separable Gaussian with a fixed 13-tap kernel (radius 6 = 3 x the
  largest sigma) and reflect padding. The official code calls PIL's `GaussianBlur(radius=sigma)`,
  which approximates the Gaussian with repeated box filters; torchvision's `GaussianBlur`
  would need a kernel size, which the paper does not give.
- Solarize inverts values >= 128/255 (PIL: `ImageOps.solarize(img, 128)`), in float.
- Grayscale uses ITU-R 601-2 luma weights (0.2989, 0.587, 0.114), as torchvision's tensor op.

Evaluation: resize the short side to `resize_size` (bilinear, antialiased, like torchvision's
`Resize` default), centre-crop `image_size` (torchvision's rounding), round to uint8.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

from bt_jax.data import views as views_lib
from bt_jax.data.errors import DataError
from bt_jax.data.tf_runtime import tf
from bt_jax.data.views import ViewSpec

# Pinned so that a seed means the same numbers on every platform (auto_select may differ by device).
RNG_ALG = "philox"


def view_seed(seed, epoch, index, view: str) -> tf.Tensor:
    """The augmentation seed of one view of one example: int64 [2], a pure function of its inputs.

    seed, epoch, index: integer scalars (Python or tensors); view: "a" or "b".
    """
    key = tf.stack([tf.cast(seed, tf.int64), tf.constant(0, tf.int64)])
    for data in (epoch, index, views_lib.VIEW_IDS[str(view).lower()]):
        key = tf.random.experimental.stateless_fold_in(key, tf.cast(data, tf.int64), alg=RNG_ALG)
    return key


def labelled_seed(seed, epoch, index) -> tf.Tensor:
    """The crop + flip seed of an example of the labelled protocols: view A's, salted."""
    return tf.random.experimental.stateless_fold_in(
        view_seed(seed, epoch, index, "a"), views_lib.LABELLED_SALT, alg=RNG_ALG
    )


def _uniform(seed, shape=(), minval=0.0, maxval=1.0) -> tf.Tensor:
    return tf.random.stateless_uniform(shape, seed, minval=minval, maxval=maxval, alg=RNG_ALG)


class _Draws:
    """The sub-seeds and coins of one view, from its seed (the same split in both modes)."""

    def __init__(self, seed):
        s = tf.random.experimental.stateless_split(tf.convert_to_tensor(seed), num=7, alg=RNG_ALG)
        self.crop, self.jitter, self.sigma = s[0], s[1], s[2]
        # The apply/skip coins: flip, jitter, grayscale, blur, solarize.
        self.coins = _uniform(s[6], (5,))


def random_resized_crop_window(
    seed, height, width, scale=(0.08, 1.0), ratio=views_lib.CROP_RATIO, attempts: int = 10
) -> tf.Tensor:
    """torchvision's RandomResizedCrop.get_params: int32 [4] = (top, left, height, width)."""
    h = tf.cast(height, tf.float32)
    w = tf.cast(width, tf.float32)
    u = _uniform(seed, (4, attempts))
    target_area = h * w * (scale[0] + (scale[1] - scale[0]) * u[0])
    log_lo, log_hi = math.log(ratio[0]), math.log(ratio[1])
    aspect = tf.exp(log_lo + (log_hi - log_lo) * u[1])
    cw = tf.round(tf.sqrt(target_area * aspect))  # tf.round is half-to-even, like Python's round
    ch = tf.round(tf.sqrt(target_area / aspect))
    valid = (cw > 0) & (cw <= w) & (ch > 0) & (ch <= h)
    top = tf.floor(u[2] * tf.maximum(h - ch + 1, 1.0))
    left = tf.floor(u[3] * tf.maximum(w - cw + 1, 1.0))
    first = tf.argmax(tf.cast(valid, tf.int32))  # index of the first valid attempt
    sampled = tf.stack([top[first], left[first], ch[first], cw[first]])

    # Fallback: centre crop, aspect clamped to the ratio range.
    in_ratio = w / h
    fw = tf.where(in_ratio < ratio[0], w, tf.where(in_ratio > ratio[1], tf.round(h * ratio[1]), w))
    fh = tf.where(in_ratio < ratio[0], tf.round(w / ratio[0]), h)
    fallback = tf.stack([tf.floor((h - fh) / 2), tf.floor((w - fw) / 2), fh, fw])
    return tf.cast(tf.where(tf.reduce_any(valid), sampled, fallback), tf.int32)


def _decode_windows(image: tf.Tensor, window_fn) -> tuple[tf.Tensor, list[tf.Tensor]]:
    """(pixels uint8 [h, w, C], windows int32 [4] relative to them) for windows = window_fn(H, W).

    image: uint8 [H, W, C] or a scalar string of encoded bytes. A JPEG is decoded only inside
    the union of the windows (`decode_and_crop_jpeg`); other formats are decoded whole.
    """

    def union(windows):
        top = tf.reduce_min(tf.stack([w[0] for w in windows]))
        left = tf.reduce_min(tf.stack([w[1] for w in windows]))
        bottom = tf.reduce_max(tf.stack([w[0] + w[2] for w in windows]))
        right = tf.reduce_max(tf.stack([w[1] + w[3] for w in windows]))
        return tf.stack([top, left, bottom - top, right - left])

    if image.dtype == tf.string:

        def jpeg():
            shape = tf.image.extract_jpeg_shape(image)
            windows = window_fn(shape[0], shape[1])
            if not windows:
                return [tf.image.decode_jpeg(image, channels=3)]
            box = union(windows)
            pixels = tf.image.decode_and_crop_jpeg(image, box, channels=3)
            return [pixels] + [w - tf.stack([box[0], box[1], 0, 0]) for w in windows]

        def other():
            pixels = tf.io.decode_image(image, channels=3, expand_animations=False)
            shape = tf.shape(pixels)
            return [pixels] + list(window_fn(shape[0], shape[1]))

        pixels, *windows = tf.cond(tf.io.is_jpeg(image), jpeg, other)
        return tf.ensure_shape(pixels, [None, None, 3]), windows
    shape = tf.shape(image)
    return image, list(window_fn(shape[0], shape[1]))


def decode_image(image: tf.Tensor) -> tf.Tensor:
    """uint8 [H, W, 3] from a uint8 [H, W, 1 or 3] image or encoded bytes (JPEG, PNG, GIF, BMP)."""
    pixels, _ = _decode_windows(image, lambda h, w: [])
    return tf.image.grayscale_to_rgb(pixels) if pixels.shape[-1] == 1 else pixels


def _crop_resize_flip(
    pixels: tf.Tensor, window: tf.Tensor, flip: tf.Tensor, image_size: int
) -> tf.Tensor:
    """float32 [image_size, image_size, C]: the resized crop, flipped or not, rounded to integers
    in [0, 255] (the uint8 values, kept as floats for the photometric ops)."""
    crop = pixels[window[0] : window[0] + window[2], window[1] : window[1] + window[3]]
    # uint8 in: ScaleAndTranslate converts once, inside the op.
    x = tf.image.resize(crop, [image_size, image_size], method="bicubic", antialias=True)
    x = tf.round(tf.clip_by_value(x, 0.0, 255.0))
    # A select, not a cond: at 32 px a cond's function call costs more than the reverse.
    return tf.where(flip, tf.reverse(x, axis=[1]), x)


def _to_rgb_uint8(x: tf.Tensor) -> tf.Tensor:
    """Integer-valued float [H, W, 1 or 3] in [0, 255] -> uint8 [H, W, 3]."""
    x = tf.cast(x, tf.uint8)
    return tf.image.grayscale_to_rgb(x) if x.shape[-1] == 1 else x


# --------------------------------------------------------------------------- photometric ops
# x: float32 [H, W, 3] on the uint8 scale, [0, 255] (white = WHITE): the pipeline keeps the
# rounded resize as floats, so no scaling pass is spent on either side. Formulations with few
# passes over the image: each pass is what costs on a CPU core at 224 px.
WHITE = 255.0


def grayscale(x: tf.Tensor) -> tf.Tensor:
    """Luma float32 [H, W, 1]."""
    w = views_lib.GRAY_WEIGHTS
    return (x[..., 0:1] * w[0] + x[..., 1:2] * w[1]) + x[..., 2:3] * w[2]


def adjust_brightness(x: tf.Tensor, factor) -> tf.Tensor:
    """torchvision: multiply, clamp (x >= 0 and factor > 0: only the top can clip)."""
    return tf.minimum(x * factor, WHITE)


def _blend(a: tf.Tensor, b: tf.Tensor, factor) -> tf.Tensor:
    # torchvision's _blend: factor * a + (1 - factor) * b, clamped.
    return tf.clip_by_value(factor * a + (1.0 - factor) * b, 0.0, WHITE)


def adjust_contrast(x: tf.Tensor, factor) -> tf.Tensor:
    """torchvision: blend with the mean of the grayscale image."""
    return _blend(x, tf.reduce_mean(grayscale(x)), factor)


def adjust_saturation(x: tf.Tensor, factor) -> tf.Tensor:
    """torchvision: blend with the grayscale image."""
    return _blend(x, grayscale(x), factor)


def adjust_hue(x: tf.Tensor, delta) -> tf.Tensor:
    """Hue rotation by delta turns (TF's AdjustHue kernel: independent of the scale, and its
    output stays within each pixel's channel range, so it needs no clamp)."""
    return tf.image.adjust_hue(x, delta)


def color_jitter(x: tf.Tensor, seed, spec: ViewSpec) -> tf.Tensor:
    """torchvision ColorJitter on float [H, W, 3]: four operations in a random order."""
    s = tf.random.experimental.stateless_split(seed, num=2, alg=RNG_ALG)
    u = _uniform(s[0], (4,))
    brightness = 1.0 - spec.brightness + 2.0 * spec.brightness * u[0]
    contrast = 1.0 - spec.contrast + 2.0 * spec.contrast * u[1]
    saturation = 1.0 - spec.saturation + 2.0 * spec.saturation * u[2]
    hue = -spec.hue + 2.0 * spec.hue * u[3]
    order = tf.argsort(_uniform(s[1], (4,)))  # a uniform random permutation, as torch.randperm(4)

    ops = [
        lambda y: adjust_brightness(y, brightness),
        lambda y: adjust_contrast(y, contrast),
        lambda y: adjust_saturation(y, saturation),
        lambda y: adjust_hue(y, hue),
    ]

    # A loop (not four unrolled switches) traces each operation once: 4x less graph to build.
    def body(k, y):
        y = tf.switch_case(order[k], [lambda op=op: op(y) for op in ops])
        return k + 1, tf.ensure_shape(y, x.shape)

    return tf.while_loop(lambda k, _: k < 4, body, (tf.constant(0), x))[1]


def to_grayscale(x: tf.Tensor) -> tf.Tensor:
    """The grayscale view: luma in all three channels."""
    return tf.tile(grayscale(x), [1, 1, 3])


def gaussian_blur(x: tf.Tensor, sigma) -> tf.Tensor:
    """Separable Gaussian blur of float [H, W, 3]: fixed (2 * BLUR_RADIUS + 1)-tap kernel,
    reflect padding."""
    r = views_lib.BLUR_RADIUS
    t = tf.range(-r, r + 1, dtype=tf.float32)
    k = tf.exp(-(t * t) / (2.0 * sigma * sigma))
    k = k / tf.reduce_sum(k)
    kh = tf.tile(tf.reshape(k, [2 * r + 1, 1, 1, 1]), [1, 1, 3, 1])
    kw = tf.tile(tf.reshape(k, [1, 2 * r + 1, 1, 1]), [1, 1, 3, 1])
    y = tf.pad(x[None], [[0, 0], [r, r], [r, r], [0, 0]], mode="REFLECT")
    y = tf.nn.depthwise_conv2d(y, kh, strides=[1, 1, 1, 1], padding="VALID")
    y = tf.nn.depthwise_conv2d(y, kw, strides=[1, 1, 1, 1], padding="VALID")
    return y[0]


def solarize(x: tf.Tensor) -> tf.Tensor:
    """PIL's ImageOps.solarize(img, 128): invert values >= 128 (of 255).

    |x - 255| is exactly 255 - x, and this is several times faster than tf.where on a CPU core.
    """
    return tf.abs(x - WHITE * tf.cast(x >= views_lib.SOLARIZE_THRESHOLD * WHITE, x.dtype))


def _maybe(coin: tf.Tensor, prob: float, fn, x: tf.Tensor) -> tf.Tensor:
    if prob <= 0.0:
        return x  # static: no graph for steps that never run (view A's solarize)
    if prob >= 1.0:
        return fn(x)
    return tf.cond(coin < prob, lambda: fn(x), lambda: x)


def photometric_view(x: tf.Tensor, draws: _Draws, spec: ViewSpec) -> tf.Tensor:
    """Integer-valued float [H, W, 3] in [0, 255] -> jitter, grayscale, blur, solarize in float,
    rounded once: float [H, W, 3], integer-valued in [0, 255]."""
    x = _maybe(draws.coins[1], spec.jitter_prob, lambda y: color_jitter(y, draws.jitter, spec), x)
    x = _maybe(draws.coins[2], spec.grayscale_prob, to_grayscale, x)
    sigma = _uniform(draws.sigma, (), views_lib.BLUR_SIGMA[0], views_lib.BLUR_SIGMA[1])
    x = _maybe(draws.coins[3], spec.blur_prob, lambda y: gaussian_blur(y, sigma), x)
    x = _maybe(draws.coins[4], spec.solarize_prob, solarize, x)
    # Every op keeps [0, 255] (clamps, convex blur, hue within each pixel's range): no clamp.
    return tf.round(x)


# --------------------------------------------------------------------------- views


def augment_views(
    image: tf.Tensor,
    seeds: Sequence,
    specs: Sequence[str | ViewSpec],
    *,
    image_size: int,
    min_crop_scale: float = 0.08,
    photometric: str = "host",
) -> list[tf.Tensor]:
    """Views of one image, decoded once: uint8 [image_size, image_size, 3] each.

    image: uint8 [H, W, C] with C in {1, 3}, or a scalar string of encoded image bytes.
    seeds: one int [2] per view (see `view_seed`); specs: "a", "b" or ViewSpecs.
    photometric="host": the whole recipe; "device": crop, flip and resize only (the rest is
    photometric.finish_views, on the device).
    """
    specs = [views_lib.view_spec(s) for s in specs]
    views_lib.check_photometric(photometric)
    views_lib.check_image_args(image_size, min_crop_scale)
    draws = [_Draws(s) for s in seeds]
    scale = (min_crop_scale, 1.0)
    pixels, windows = _decode_windows(
        image, lambda h, w: [random_resized_crop_window(d.crop, h, w, scale=scale) for d in draws]
    )
    out = []
    for d, spec, window in zip(draws, specs, windows):
        x = _crop_resize_flip(pixels, window, d.coins[0] < spec.flip_prob, image_size)
        if photometric == "host":
            if x.shape[-1] == 1:
                x = tf.tile(x, [1, 1, 3])
            x = photometric_view(x, d, spec)
        out.append(tf.ensure_shape(_to_rgb_uint8(x), [image_size, image_size, 3]))
    return out


def augment_view(
    image: tf.Tensor,
    seed,
    *,
    view: str | ViewSpec,
    image_size: int,
    min_crop_scale: float = 0.08,
    photometric: str = "host",
) -> tf.Tensor:
    """One view: uint8 [image_size, image_size, 3] (see augment_views)."""
    return augment_views(
        image,
        [seed],
        [view],
        image_size=image_size,
        min_crop_scale=min_crop_scale,
        photometric=photometric,
    )[0]


def eval_transform(
    image: tf.Tensor, *, image_size: int, resize_size: int | None = None
) -> tf.Tensor:
    """Deterministic evaluation view: uint8 [image_size, image_size, 3].

    Resize the short side to resize_size (default image_size; ImageNet protocol: 256 for 224),
    centre-crop image_size. image: uint8 [H, W, C] or encoded bytes.
    """
    resize_size = image_size if resize_size is None else int(resize_size)
    if resize_size < image_size:
        raise DataError(f"resize_size ({resize_size}) must be >= image_size ({image_size})")
    x, _ = _decode_windows(image, lambda h, w: [])  # 1 or 3 channels
    shape = tf.cast(tf.shape(x)[:2], tf.float32)
    short = tf.minimum(shape[0], shape[1])
    # torchvision Resize(int): the short side becomes resize_size, the long side is truncated.
    new = tf.cast(tf.math.floor(shape * (resize_size / short)), tf.int32)
    new = tf.where(shape == short, resize_size, new)
    x = tf.image.resize(x, new, method="bilinear", antialias=True)
    top = tf.cast(tf.round(tf.cast(new[0] - image_size, tf.float32) / 2.0), tf.int32)
    left = tf.cast(tf.round(tf.cast(new[1] - image_size, tf.float32) / 2.0), tf.int32)
    x = tf.round(tf.clip_by_value(x[top : top + image_size, left : left + image_size], 0.0, 255.0))
    return tf.ensure_shape(_to_rgb_uint8(x), [image_size, image_size, 3])
