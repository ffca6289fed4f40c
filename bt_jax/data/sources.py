"""Image sources with random access by example index: the Source and Split types, in-memory
arrays and scikit-learn's digits. (IDX files and image folders: file_sources.py; tfds:
tfds_sources.py; `load_source` by name: catalog.py.)

A `Source` holds three `Split`s: `pretrain` (what pretraining reads; usually the train split,
stl10: train+unlabelled), `train` and `test` (labelled, for evaluation). A `Split` is read by
index with `Split.fetch` (numpy; the input pipeline calls it once per step in a
tf.numpy_function): images are uint8 [B, H, W, C] (C in {1, 3}) for in-memory arrays, or
encoded bytes object [B] (JPEG/PNG, decoded by the augmentation).

Random access is what makes shuffling, per-process shares and exact resume pure functions of
(seed, step) (see input_pipeline). Sources provide it in one of three ways:
- In memory, decoded (digits, IDX, tfds datasets with a fixed image shape such as cifar10,
  fashion_mnist, stl10): uint8 arrays, indexed with numpy.
- In memory, encoded (image folders; tfds datasets with variable image shapes, e.g.
  imagenet2012 prepared as TFRecord): the file bytes, decoded per access (JPEG crops with
  decode_and_crop_jpeg). Loaded once; refused above `max_in_memory_gb` (default 16 GiB).
- tfds datasets prepared as array_record: `tfds.data_source`, random access from disk, nothing
  held in memory. This is the way for ImageNet-scale data; convert a TFRecord preparation once,
  in place: `tfds convert_format --dataset_version_dir=DATA_DIR/NAME/VERSION
  --out_file_format=array_record` (imagenet2012 train in memory would be ~140 GiB per host).

Splits load lazily (on first use) and are cached on the Source, so `load_source` is cheap and
checks only that the data is there. TF-free.
"""

from __future__ import annotations

import dataclasses
import importlib.util
import os
from collections.abc import Callable, Sequence

import numpy as np
from etils import epath

from bt_jax.data.errors import DataError

DEFAULT_IDX_DIR = "/usr/share/datasets/fashion-mnist"
DIGITS_NUM_TRAIN = 1500  # of 1797, after a fixed permutation (seed 0); the rest is test
BUILTIN_SOURCES = {
    "digits": "scikit-learn's bundled 8x8 digits (embedded, no download)",
    "idx": f"MNIST-format IDX files in data_dir (default {DEFAULT_IDX_DIR}, Debian's "
    "dataset-fashion-mnist)",
    "fashion_mnist_idx": "alias of 'idx'",
    "folder": "a folder of image files in data_dir (class sub-folders optional; train/ and "
    "test/ optional)",
}


@dataclasses.dataclass
class Split:
    """One split, readable by example index.

    images: uint8 [N, H, W, C] (C in {1, 3}), or object [N] of encoded image bytes, or None when
      `data_source` is given. labels: int32 [N], -1 where unlabelled (None with `data_source`).
    data_source: a random-access sequence of tfds examples (dicts with encoded 'image' bytes and
      an optional 'label').
    """

    images: np.ndarray | None
    labels: np.ndarray | None
    data_source: Sequence | None = None
    label_key: str | None = "label"

    def __post_init__(self):
        if self.data_source is None:
            if self.images is None or self.labels is None or len(self.images) != len(self.labels):
                raise DataError(
                    "a Split needs images and labels of the same length, got "
                    f"{None if self.images is None else len(self.images)} images and "
                    f"{None if self.labels is None else len(self.labels)} labels"
                )
            self.labels = np.asarray(self.labels, np.int32)

    @property
    def num_examples(self) -> int:
        return len(self.data_source) if self.data_source is not None else len(self.labels)

    @property
    def encoded(self) -> bool:
        """True for encoded bytes (decoded by the augmentation), False for uint8 arrays."""
        return self.data_source is not None or self.images.dtype == object

    def fetch(self, indices: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """(images uint8 [B, H, W, C] or object [B] of bytes, labels int32 [B]) of `indices`."""
        indices = np.asarray(indices, np.int64)
        if self.data_source is None:
            return self.images[indices], self.labels[indices]
        records = self.data_source.__getitems__([int(i) for i in indices])
        images = np.empty(len(records), dtype=object)
        images[:] = [r["image"] for r in records]
        labels = np.array([r[self.label_key] if self.label_key else -1 for r in records], np.int32)
        return images, labels


@dataclasses.dataclass
class Source:
    """A named image source: pretrain / train / test splits, loaded lazily and cached.

    name: the source name; num_classes: int, or None without labels.
    num_train: examples in the pretraining split (what one pretraining epoch reads).
    """

    name: str
    num_classes: int | None
    loaders: dict[str, Callable[[], Split]]
    sizes: dict[str, int] = dataclasses.field(default_factory=dict)
    description: str = ""
    skipped: list[str] = dataclasses.field(default_factory=list)  # unreadable files (folder)

    def __post_init__(self):
        self._splits: dict[str, Split] = {}

    def split(self, name: str) -> Split:
        """The Split 'pretrain', 'train' or 'test' (loaded on first use)."""
        if name not in self.loaders:
            raise DataError(f"split must be one of {sorted(self.loaders)}, got {name!r}")
        if name not in self._splits:
            self._splits[name] = self.loaders[name]()
            self.sizes[name] = self._splits[name].num_examples
        return self._splits[name]

    def num_examples(self, split: str) -> int:
        if split not in self.sizes:
            self.split(split)
        return self.sizes[split]

    @property
    def num_train(self) -> int:
        return self.num_examples("pretrain")

    def __repr__(self) -> str:
        return f"Source({self.name!r}, num_classes={self.num_classes}, sizes={self.sizes})"


def in_memory_source(
    name: str, train: Split, test: Split, num_classes: int | None, description: str = ""
) -> Source:
    """A Source whose pretrain and train splits are `train`."""
    return Source(
        name=name,
        num_classes=num_classes,
        loaders={"pretrain": lambda: train, "train": lambda: train, "test": lambda: test},
        sizes={
            "pretrain": train.num_examples,
            "train": train.num_examples,
            "test": test.num_examples,
        },
        description=description,
    )


def from_arrays(
    name: str,
    train_images: np.ndarray,
    train_labels: np.ndarray | None,
    test_images: np.ndarray,
    test_labels: np.ndarray | None,
    num_classes: int | None = None,
) -> Source:
    """A Source from in-memory arrays: images uint8 [N, H, W, C] (C in {1, 3}), labels int [N]
    or None."""

    def split(images, labels) -> Split:
        images = np.asarray(images)
        if images.dtype != np.uint8 or images.ndim != 4 or images.shape[-1] not in (1, 3):
            raise DataError(
                f"images must be uint8 [N, H, W, 1 or 3], got {images.dtype} {images.shape}"
            )
        labels = np.full(len(images), -1, np.int32) if labels is None else labels
        return Split(images, labels)

    return in_memory_source(
        name,
        split(train_images, train_labels),
        split(test_images, test_labels),
        num_classes,
        "in-memory arrays",
    )


DIGITS_FILE = ("datasets", "data", "digits.csv.gz")  # inside scikit-learn's package


def _digits_arrays() -> tuple[np.ndarray, np.ndarray]:
    """(pixels float64 [1797, 8, 8] in 0..16, labels [1797]): ``sklearn.datasets.load_digits``'s
    arrays, read from its file without importing scikit-learn (the import is ~0.8 s of every
    digits run's start-up, for a 1797-row file); through scikit-learn where the file is not."""
    spec = importlib.util.find_spec("sklearn")
    for folder in (spec.submodule_search_locations or []) if spec else []:
        path = epath.Path(folder).joinpath(*DIGITS_FILE)
        if path.exists():
            rows = np.loadtxt(os.fspath(path), delimiter=",")  # 64 pixels, the label; per row
            return rows[:, :-1].reshape(-1, 8, 8), rows[:, -1].astype(int)
    from sklearn.datasets import load_digits as sk_load_digits

    digits = sk_load_digits()
    return digits.images, digits.target


def load_digits() -> Source:
    """scikit-learn's 1797 8x8 digits as uint8 [N, 8, 8, 1] (0..16 scaled to 0..255).

    Split: a fixed permutation (numpy default_rng(0)); the first 1500 are train, 297 test.
    """
    pixels, labels = _digits_arrays()
    images = np.round(pixels * (255.0 / 16.0)).astype(np.uint8)[..., None]
    labels = labels.astype(np.int32)
    order = np.random.default_rng(0).permutation(len(labels))
    tr, te = order[:DIGITS_NUM_TRAIN], order[DIGITS_NUM_TRAIN:]
    return in_memory_source(
        "digits",
        Split(images[tr], labels[tr]),
        Split(images[te], labels[te]),
        10,
        BUILTIN_SOURCES["digits"],
    )
