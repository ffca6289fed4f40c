"""What the two Barlow Twins views are: their augmentation probabilities and strengths.

TF-free and JAX-free, so that the host pipeline (augment.py, TensorFlow), the device-side
photometric ops (photometric.py, JAX), the config and the trainer share one definition.

| step                                                               | view A | view B |
| ------------------------------------------------------------------ | ------ | ------ |
| RandomResizedCrop, scale (min_crop_scale, 1), ratio 3/4-4/3, bicubic | yes  | yes    |
| horizontal flip                                                    | 0.5    | 0.5    |
| ColorJitter(brightness 0.4, contrast 0.4, saturation 0.2, hue 0.1) | p 0.8  | p 0.8  |
| grayscale                                                          | p 0.2  | p 0.2  |
| Gaussian blur, sigma ~ U(0.1, 2.0)                                 | p 1.0  | p 0.1  |
| solarize, threshold 128 of 255                                     | p 0.0  | p 0.2  |
| normalise with ImageNet mean/std                                   | yes    | yes    |

(The official code's recipe; the blur and solarize probabilities come from BYOL.)
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Mapping

from bt_jax.data.errors import DataError

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
# ITU-R 601-2 luma, as tf.image.rgb_to_grayscale and torchvision's tensor rgb_to_grayscale.
GRAY_WEIGHTS = (0.2989, 0.587, 0.114)
CROP_RATIO = (3.0 / 4.0, 4.0 / 3.0)
BLUR_SIGMA = (0.1, 2.0)
# Kernel radius covering 3 sigma of the largest sigma: a fixed shape keeps the graph static.
BLUR_RADIUS = int(math.ceil(3 * BLUR_SIGMA[1]))
MIN_IMAGE_SIZE = BLUR_RADIUS + 2  # reflect padding needs a side longer than the radius
SOLARIZE_THRESHOLD = 128.0 / 255.0  # PIL's ImageOps.solarize(img, 128), on [0, 1]
# Where the photometric ops (jitter, grayscale, blur, solarize) run: "host" in the tf.data
# pipeline, or "device" inside the train step (photometric.finish_views), BYOL's split.
PHOTOMETRIC_MODES = ("host", "device")
# Decorrelates the labelled views (linear / semi-supervised protocols) from the pretraining
# views of the same seed: folded into view A's seed of (seed, epoch, example).
LABELLED_SALT = 0xE7A1


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
# RandomResizedCrop + horizontal flip and nothing else: the training views of the linear and
# semi-supervised protocols (official evaluate.py).
CROP_FLIP = ViewSpec(
    flip_prob=0.5, jitter_prob=0.0, grayscale_prob=0.0, blur_prob=0.0, solarize_prob=0.0
)


def view_spec(view: str | ViewSpec) -> ViewSpec:
    """A ViewSpec as given, or the official one by name ("a" or "b")."""
    if isinstance(view, ViewSpec):
        return view
    key = str(view).lower()
    if key not in VIEWS:
        raise DataError(f"view must be one of {sorted(VIEWS)} or a ViewSpec, got {view!r}")
    return VIEWS[key]


def check_views(views: Mapping[str, ViewSpec] | None) -> dict[str, ViewSpec]:
    """{"a": ViewSpec, "b": ViewSpec} (default the official VIEWS), or DataError naming the
    fault."""
    views = dict(VIEWS if views is None else views)
    if sorted(views) != ["a", "b"]:
        raise DataError(
            f"views must map 'a' and 'b' to ViewSpecs, got keys {sorted(views)}; "
            f"start from bt_jax.data.VIEWS"
        )
    for name, spec in views.items():
        if not isinstance(spec, ViewSpec):
            raise DataError(f"views[{name!r}] must be a ViewSpec, got {type(spec).__name__}")
        for field in ("flip_prob", "jitter_prob", "grayscale_prob", "blur_prob", "solarize_prob"):
            if not 0.0 <= getattr(spec, field) <= 1.0:
                raise DataError(
                    f"views[{name!r}].{field} must be a probability in [0, 1], got "
                    f"{getattr(spec, field)}"
                )
        for field in ("brightness", "contrast", "saturation"):
            if not 0.0 <= getattr(spec, field) <= 1.0:
                raise DataError(
                    f"views[{name!r}].{field} must be in [0, 1] (a factor range "
                    f"1 +- {field}), got {getattr(spec, field)}"
                )
        if not 0.0 <= spec.hue <= 0.5:
            raise DataError(f"views[{name!r}].hue must be in [0, 0.5], got {spec.hue}")
    return views


def check_photometric(photometric: str) -> str:
    """'host' or 'device', or DataError."""
    if photometric not in PHOTOMETRIC_MODES:
        raise DataError(
            f"photometric must be one of {PHOTOMETRIC_MODES} (where the colour "
            f"jitter, grayscale, blur and solarize run), got {photometric!r}"
        )
    return photometric


def check_image_args(image_size: int, min_crop_scale: float) -> None:
    """DataError unless image_size >= MIN_IMAGE_SIZE and min_crop_scale is in (0, 1]."""
    if image_size < MIN_IMAGE_SIZE:
        raise DataError(
            f"image_size must be at least {MIN_IMAGE_SIZE} (the blur "
            f"kernel's reflect padding), got {image_size}"
        )
    if not 0.0 < min_crop_scale <= 1.0:
        raise DataError(f"min_crop_scale must be in (0, 1], got {min_crop_scale}")
