"""The Barlow Twins two-view augmentations and the evaluation transform, as pure TF functions.

Every random decision is drawn with TF *stateless* ops from an explicit seed (shape [2]), so
`augment_view(image, seed, ...)` is a pure function of its arguments: the same image and seed
give the same bytes whatever thread, map parallelism or process runs it. `view_seed` derives that
seed from (seed, epoch, example index, view).

The recipe (official code, per view; blur and solarize probabilities from BYOL):

| step                                                        | view A | view B |
| ----------------------------------------------------------- | ------ | ------ |
| RandomResizedCrop, scale (min_crop_scale, 1), ratio 3/4-4/3, bicubic | yes | yes |
| horizontal flip                                             | 0.5    | 0.5    |
| ColorJitter(brightness 0.4, contrast 0.4, saturation 0.2, hue 0.1)   | p 0.8 | p 0.8 |
| grayscale                                                   | p 0.2  | p 0.2  |
| Gaussian blur, sigma ~ U(0.1, 2.0)                          | p 1.0  | p 0.1  |
| solarize, threshold 128 of 255                              | p 0.0  | p 0.2  |
| normalise with ImageNet mean/std                            | yes    | yes    |

Where the semantics differ from torchvision/PIL (the official code runs PIL transforms), and why:
- Arithmetic is float32 in [0, 1] from the resize onwards; PIL rounds to uint8 after every
  step. Rounding adds nothing but quantisation noise, and float is what the TF ops use.
- RandomResizedCrop follows torchvision's sampler exactly (10 attempts of area ~ U(scale),
  log-aspect ~ U(log ratio), round-half-even sides, first valid attempt, else a centre crop
  clamped to the ratio range). We do not use `tf.image.stateless_sample_distorted_bounding_box`
  because it draws the aspect ratio uniformly (not log-uniformly) and falls back to the whole
  image. The resize is `tf.image.resize(bicubic, antialias=True)`, TF's match of PIL's
  antialiased bicubic (Keys a = -0.5 in TF, -0.5 in PIL; edge handling differs by < 1 level).
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
- Grayscale uses ITU-R 601-2 luma weights through `tf.image.rgb_to_grayscale`, as torchvision.

Evaluation: resize the short side to `resize_size` (bilinear, antialiased, like torchvision's
`Resize` default), centre-crop `image_size` (torchvision's rounding), normalise.
"""
from __future__ import annotations

import dataclasses
import math

import tensorflow as tf

# Pinned so that a seed means the same numbers on every platform (auto_select may differ by device).
RNG_ALG = "philox"
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
CROP_RATIO = (3.0 / 4.0, 4.0 / 3.0)
BLUR_SIGMA = (0.1, 2.0)
# Kernel radius covering 3 sigma of the largest sigma: a fixed shape keeps the graph static.
BLUR_RADIUS = int(math.ceil(3 * BLUR_SIGMA[1]))
MIN_IMAGE_SIZE = BLUR_RADIUS + 2  # reflect padding needs a side longer than the radius


@dataclasses.dataclass(frozen=True)
class ViewSpec:
    """Probabilities and strengths of one view's augmentations (defaults: the official recipe)."""

    flip_prob: float = 0.5
    jitter_prob: float = 0.8
    brightness: float = 0.4
    contrast: float = 0.4
    saturation: float = 0.2
    hue: float = 0.1
    grayscale_prob: float = 0.2
    blur_prob: float = 1.0
    solarize_prob: float = 0.0


VIEWS: dict[str, ViewSpec] = {
    "a": ViewSpec(blur_prob=1.0, solarize_prob=0.0),
    "b": ViewSpec(blur_prob=0.1, solarize_prob=0.2),
}
VIEW_IDS = {"a": 0, "b": 1}


def _view(view: str | ViewSpec) -> ViewSpec:
    if isinstance(view, ViewSpec):
        return view
    key = str(view).lower()
    if key not in VIEWS:
        raise ValueError(f"view must be one of {sorted(VIEWS)} (or a ViewSpec), got {view!r}")
    return VIEWS[key]


def view_seed(seed, epoch, index, view: str) -> tf.Tensor:
    """The augmentation seed of one view of one example: int32 [2], a pure function of its inputs.

    seed, epoch, index: integer scalars (Python or tensors); view: "a" or "b".
    """
    key = tf.stack([tf.cast(seed, tf.int64), tf.constant(0, tf.int64)])
    for data in (epoch, index, VIEW_IDS[str(view).lower()]):
        key = tf.random.experimental.stateless_fold_in(key, tf.cast(data, tf.int64), alg=RNG_ALG)
    return key


def _uniform(seed, shape=(), minval=0.0, maxval=1.0) -> tf.Tensor:
    return tf.random.stateless_uniform(shape, seed, minval=minval, maxval=maxval, alg=RNG_ALG)


def random_resized_crop_window(seed, height, width, scale=(0.08, 1.0), ratio=CROP_RATIO,
                               attempts: int = 10) -> tf.Tensor:
    """torchvision's RandomResizedCrop.get_params: int32 [4] = (top, left, crop_height, crop_width)."""
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


def _decode_and_crop(image: tf.Tensor, window_fn) -> tf.Tensor:
    """uint8 [h, w, 3]: the crop window_fn(height, width) of a uint8 [H, W, C] image or encoded bytes.

    JPEG bytes are decoded with `decode_and_crop_jpeg`, which only decodes the window.
    """
    if image.dtype == tf.string:
        def jpeg():
            shape = tf.image.extract_jpeg_shape(image)
            win = window_fn(shape[0], shape[1])
            return tf.image.decode_and_crop_jpeg(image, win, channels=3)

        def other():
            decoded = tf.io.decode_image(image, channels=3, expand_animations=False)
            shape = tf.shape(decoded)
            win = window_fn(shape[0], shape[1])
            return decoded[win[0]:win[0] + win[2], win[1]:win[1] + win[3]]

        crop = tf.cond(tf.io.is_jpeg(image), jpeg, other)
        return tf.ensure_shape(crop, [None, None, 3])
    shape = tf.shape(image)
    win = window_fn(shape[0], shape[1])
    crop = image[win[0]:win[0] + win[2], win[1]:win[1] + win[3]]
    if image.shape[-1] == 1:
        crop = tf.image.grayscale_to_rgb(crop)
    return crop


def decode_image(image: tf.Tensor) -> tf.Tensor:
    """uint8 [H, W, 3] from a uint8 [H, W, 1 or 3] image or encoded bytes (JPEG, PNG, GIF, BMP)."""
    return _decode_and_crop(image, lambda h, w: tf.stack([0, 0, h, w]))


def _blend(a: tf.Tensor, b: tf.Tensor, factor: tf.Tensor) -> tf.Tensor:
    # torchvision's _blend: factor * a + (1 - factor) * b, clamped.
    return tf.clip_by_value(factor * a + (1.0 - factor) * b, 0.0, 1.0)


def color_jitter(x: tf.Tensor, seed, spec: ViewSpec) -> tf.Tensor:
    """torchvision ColorJitter on float [H, W, 3] in [0, 1]: four operations in a random order."""
    s = tf.random.experimental.stateless_split(seed, num=2, alg=RNG_ALG)
    u = _uniform(s[0], (4,))
    brightness = 1.0 - spec.brightness + 2.0 * spec.brightness * u[0]
    contrast = 1.0 - spec.contrast + 2.0 * spec.contrast * u[1]
    saturation = 1.0 - spec.saturation + 2.0 * spec.saturation * u[2]
    hue = -spec.hue + 2.0 * spec.hue * u[3]
    order = tf.argsort(_uniform(s[1], (4,)))  # a uniform random permutation, as torch.randperm(4)

    ops = [
        lambda y: tf.clip_by_value(y * brightness, 0.0, 1.0),
        lambda y: _blend(y, tf.reduce_mean(tf.image.rgb_to_grayscale(y)), contrast),
        lambda y: _blend(y, tf.image.rgb_to_grayscale(y), saturation),
        lambda y: tf.clip_by_value(tf.image.adjust_hue(y, hue), 0.0, 1.0),
    ]
    # A loop (not four unrolled switches) traces each operation once: 4x less graph to build.
    def body(k, y):
        y = tf.switch_case(order[k], [lambda op=op: op(y) for op in ops])
        return k + 1, tf.ensure_shape(y, x.shape)

    return tf.while_loop(lambda k, _: k < 4, body, (tf.constant(0), x))[1]


def gaussian_blur(x: tf.Tensor, sigma) -> tf.Tensor:
    """Separable Gaussian blur of float [H, W, 3], fixed (2 * BLUR_RADIUS + 1)-tap kernel, reflect padding."""
    r = BLUR_RADIUS
    t = tf.range(-r, r + 1, dtype=tf.float32)
    k = tf.exp(-(t * t) / (2.0 * sigma * sigma))
    k = k / tf.reduce_sum(k)
    kh = tf.tile(tf.reshape(k, [2 * r + 1, 1, 1, 1]), [1, 1, 3, 1])
    kw = tf.tile(tf.reshape(k, [1, 2 * r + 1, 1, 1]), [1, 1, 3, 1])
    y = tf.pad(x[None], [[0, 0], [r, r], [r, r], [0, 0]], mode="REFLECT")
    y = tf.nn.depthwise_conv2d(y, kh, strides=[1, 1, 1, 1], padding="VALID")
    y = tf.nn.depthwise_conv2d(y, kw, strides=[1, 1, 1, 1], padding="VALID")
    return y[0]


def solarize(x: tf.Tensor, threshold: float = 128.0 / 255.0) -> tf.Tensor:
    """PIL's ImageOps.solarize(img, 128) on float [0, 1]: invert values >= threshold."""
    return tf.where(x >= threshold, 1.0 - x, x)


def normalize(x: tf.Tensor) -> tf.Tensor:
    """float [..., 3] in [0, 1] -> ImageNet-normalised float32."""
    return (x - tf.constant(IMAGENET_MEAN)) / tf.constant(IMAGENET_STD)


def _maybe(u: tf.Tensor, prob: float, fn, x: tf.Tensor) -> tf.Tensor:
    if prob <= 0.0:
        return x  # static: no graph for steps that never run (view A's solarize)
    if prob >= 1.0:
        return fn(x)
    return tf.cond(u < prob, lambda: fn(x), lambda: x)


def augment_view(image: tf.Tensor, seed, *, view: str | ViewSpec, image_size: int,
                 min_crop_scale: float = 0.08, normalise: bool = True) -> tf.Tensor:
    """One Barlow Twins view: float32 [image_size, image_size, 3], ImageNet-normalised.

    image: uint8 [H, W, C] with C in {1, 3}, or a scalar string of encoded image bytes.
    seed: int [2] (see `view_seed`); view: "a", "b" or a ViewSpec.
    normalise=False returns the view in [0, 1] (for pictures and tests).
    """
    spec = _view(view)
    if image_size < MIN_IMAGE_SIZE:
        raise ValueError(f"image_size must be at least {MIN_IMAGE_SIZE} (blur radius), got {image_size}")
    if not 0.0 < min_crop_scale <= 1.0:
        raise ValueError(f"min_crop_scale must be in (0, 1], got {min_crop_scale}")
    s = tf.random.experimental.stateless_split(tf.convert_to_tensor(seed), num=7, alg=RNG_ALG)
    u = _uniform(s[6], (5,))  # the apply/skip coins: flip, jitter, grayscale, blur, solarize

    crop = _decode_and_crop(
        image, lambda h, w: random_resized_crop_window(s[0], h, w, scale=(min_crop_scale, 1.0)))
    x = tf.image.resize(tf.cast(crop, tf.float32), [image_size, image_size], method="bicubic",
                        antialias=True)
    x = tf.clip_by_value(x / 255.0, 0.0, 1.0)  # bicubic overshoots; PIL clamps to 0..255
    x = _maybe(u[0], spec.flip_prob, tf.image.flip_left_right, x)
    x = _maybe(u[1], spec.jitter_prob, lambda y: color_jitter(y, s[1], spec), x)
    x = _maybe(u[2], spec.grayscale_prob, lambda y: tf.tile(tf.image.rgb_to_grayscale(y), [1, 1, 3]), x)
    sigma = _uniform(s[2], (), BLUR_SIGMA[0], BLUR_SIGMA[1])
    x = _maybe(u[3], spec.blur_prob, lambda y: gaussian_blur(y, sigma), x)
    x = _maybe(u[4], spec.solarize_prob, solarize, x)
    x = tf.ensure_shape(x, [image_size, image_size, 3])
    return normalize(x) if normalise else x


def eval_transform(image: tf.Tensor, *, image_size: int, resize_size: int | None = None,
                   normalise: bool = True) -> tf.Tensor:
    """Deterministic evaluation view: float32 [image_size, image_size, 3].

    Resize the short side to resize_size (default image_size; ImageNet protocol: 256 for 224),
    centre-crop image_size, normalise. image: uint8 [H, W, C] or encoded bytes.
    """
    resize_size = image_size if resize_size is None else int(resize_size)
    if resize_size < image_size:
        raise ValueError(f"resize_size ({resize_size}) must be >= image_size ({image_size})")
    x = tf.cast(decode_image(image), tf.float32)
    shape = tf.cast(tf.shape(x)[:2], tf.float32)
    short = tf.minimum(shape[0], shape[1])
    # torchvision Resize(int): the short side becomes resize_size, the long side is truncated.
    new = tf.cast(tf.math.floor(shape * (resize_size / short)), tf.int32)
    new = tf.where(shape == short, resize_size, new)
    x = tf.image.resize(x, new, method="bilinear", antialias=True)
    top = tf.cast(tf.round(tf.cast(new[0] - image_size, tf.float32) / 2.0), tf.int32)
    left = tf.cast(tf.round(tf.cast(new[1] - image_size, tf.float32) / 2.0), tf.int32)
    x = x[top:top + image_size, left:left + image_size]
    x = tf.ensure_shape(tf.clip_by_value(x / 255.0, 0.0, 1.0), [image_size, image_size, 3])
    return normalize(x) if normalise else x
