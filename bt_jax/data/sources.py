"""Image sources with random access by example index: digits, IDX files, image folders, tfds.

A `Source` holds three `Split`s: `pretrain` (what pretraining reads; usually the train split,
stl10: train+unlabelled), `train` and `test` (labelled, for evaluation). A `Split` is read by
index through `Split.reader()`, a TF function int64 [B] -> (images, labels int32 [B]) where
images are uint8 [B, H, W, C] (C in {1, 3}) for in-memory arrays or encoded bytes string [B]
(JPEG/PNG, decoded by the augmentation).

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
checks only that the data is there.
"""
from __future__ import annotations

import dataclasses
import difflib
import functools
import glob
import gzip
import io
import logging
import os
import warnings
from typing import Callable, Sequence

import numpy as np
import tensorflow as tf

log = logging.getLogger(__name__)

DEFAULT_IDX_DIR = "/usr/share/datasets/fashion-mnist"
DIGITS_NUM_TRAIN = 1500  # of 1797, after a fixed permutation (seed 0); the rest is test
FOLDER_TEST_FRACTION = 0.1  # folders without train/ and test/ sub-folders
IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".bmp", ".gif", ".webp", ".tif", ".tiff")
BUILTIN_SOURCES = {
    "digits": "scikit-learn's bundled 8x8 digits (embedded, no download)",
    "idx": f"MNIST-format IDX files in data_dir (default {DEFAULT_IDX_DIR}, Debian's dataset-fashion-mnist)",
    "fashion_mnist_idx": "alias of 'idx'",
    "folder": "a folder of image files in data_dir (class sub-folders optional; train/ and test/ optional)",
}
TFDS_EXAMPLES = ("cifar10", "cifar100", "stl10", "fashion_mnist", "mnist", "imagenet2012")
# tfds datasets whose pretraining split is not 'train' (stl10: the 100k unlabelled images too).
TFDS_PRETRAIN_SPLIT = {"stl10": "train+unlabelled"}


class DataNotPreparedError(FileNotFoundError):
    """The data for a source is not on this machine; the message says how to get it."""


@dataclasses.dataclass
class Split:
    """One split, readable by example index.

    images: uint8 [N, H, W, C] (C in {1, 3}), or object [N] of encoded image bytes, or None when
      `data_source` is given. labels: int32 [N], -1 where unlabelled (None with `data_source`).
    data_source: a random-access sequence of tfds examples (dicts with encoded 'image' bytes and
      an optional 'label'), read in a tf.numpy_function.
    """

    images: np.ndarray | None
    labels: np.ndarray | None
    data_source: Sequence | None = None
    label_key: str | None = "label"

    def __post_init__(self):
        if self.data_source is None:
            if self.images is None or self.labels is None or len(self.images) != len(self.labels):
                raise ValueError("a Split needs images and labels of the same length")
            self.labels = np.asarray(self.labels, np.int32)

    @property
    def num_examples(self) -> int:
        return len(self.data_source) if self.data_source is not None else len(self.labels)

    @property
    def encoded(self) -> bool:
        """True when images are encoded bytes (decoded by the augmentation), False for uint8 arrays."""
        return self.data_source is not None or self.images.dtype == object

    def fetch(self, indices: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """(images [B, H, W, C] uint8 or object [B] of bytes, labels int32 [B]) of the examples `indices`."""
        indices = np.asarray(indices, np.int64)
        if self.data_source is None:
            return self.images[indices], self.labels[indices]
        records = self.data_source.__getitems__([int(i) for i in indices])
        images = np.empty(len(records), dtype=object)
        images[:] = [r["image"] for r in records]
        labels = np.array([r[self.label_key] if self.label_key else -1 for r in records], np.int32)
        return images, labels

    def reader(self) -> Callable[[tf.Tensor], tuple[tf.Tensor, tf.Tensor]]:
        """A TF function: indices int64 [B] -> (images uint8 [B, H, W, C] or string [B], labels int32 [B]).

        The arrays stay numpy, read through tf.numpy_function: a tensor captured by tf.data would
        be copied and serialised with the pipeline graph (half a minute for 2 GiB at start-up).
        """
        if self.encoded:
            image_dtype, image_shape = tf.string, []
        else:
            image_dtype, image_shape = tf.uint8, list(self.images.shape[1:])

        def read(indices):
            images, labels = tf.numpy_function(self.fetch, [indices], [image_dtype, tf.int32],
                                               stateful=False)
            images.set_shape(indices.shape.concatenate(image_shape))
            labels.set_shape(indices.shape)
            return images, labels

        return read


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
            raise ValueError(f"split must be one of {sorted(self.loaders)}, got {name!r}")
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


def _in_memory_source(name, train: Split, test: Split, num_classes, description="") -> Source:
    return Source(name=name, num_classes=num_classes,
                  loaders={"pretrain": lambda: train, "train": lambda: train, "test": lambda: test},
                  sizes={"pretrain": train.num_examples, "train": train.num_examples,
                         "test": test.num_examples},
                  description=description)


def from_arrays(name: str, train_images: np.ndarray, train_labels: np.ndarray | None,
                test_images: np.ndarray, test_labels: np.ndarray | None,
                num_classes: int | None = None) -> Source:
    """A Source from in-memory arrays: images uint8 [N, H, W, C] (C in {1, 3}), labels int [N] or None."""
    def split(images, labels) -> Split:
        images = np.asarray(images)
        if images.dtype != np.uint8 or images.ndim != 4 or images.shape[-1] not in (1, 3):
            raise ValueError(f"images must be uint8 [N, H, W, 1 or 3], got {images.dtype} {images.shape}")
        labels = np.full(len(images), -1, np.int32) if labels is None else labels
        return Split(images, labels)

    return _in_memory_source(name, split(train_images, train_labels),
                             split(test_images, test_labels), num_classes, "in-memory arrays")


# ----------------------------------------------------------------------------- digits


def load_digits() -> Source:
    """scikit-learn's 1797 8x8 digits as uint8 [N, 8, 8, 1] (0..16 scaled to 0..255).

    Split: a fixed permutation (numpy default_rng(0)); the first 1500 are train, 297 test.
    """
    from sklearn.datasets import load_digits as sk_load_digits

    digits = sk_load_digits()
    images = np.round(digits.images * (255.0 / 16.0)).astype(np.uint8)[..., None]
    labels = digits.target.astype(np.int32)
    order = np.random.default_rng(0).permutation(len(labels))
    tr, te = order[:DIGITS_NUM_TRAIN], order[DIGITS_NUM_TRAIN:]
    return _in_memory_source("digits", Split(images[tr], labels[tr]), Split(images[te], labels[te]),
                             10, BUILTIN_SOURCES["digits"])


# ----------------------------------------------------------------------------- IDX files

_IDX_DTYPES = {0x08: np.uint8, 0x09: np.int8, 0x0B: ">i2", 0x0C: ">i4", 0x0D: ">f4", 0x0E: ">f8"}


def read_idx(path: str) -> np.ndarray:
    """An IDX file (MNIST format, gzipped or raw) as a numpy array."""
    with open(path, "rb") as f:
        data = f.read()
    if data[:2] == b"\x1f\x8b":
        data = gzip.decompress(data)
    if len(data) < 4 or data[0] != 0 or data[1] != 0 or data[2] not in _IDX_DTYPES:
        raise ValueError(f"{path} is not an IDX file (bad magic number {data[:4]!r})")
    ndim = data[3]
    dims = np.frombuffer(data, ">i4", count=ndim, offset=4).astype(int)
    dtype = np.dtype(_IDX_DTYPES[data[2]])
    body = data[4 + 4 * ndim:]
    if len(body) != int(np.prod(dims)) * dtype.itemsize:
        raise ValueError(f"{path}: IDX header says shape {tuple(dims)} but the file holds "
                         f"{len(body)} bytes of data; the file is truncated or corrupt")
    return np.frombuffer(body, dtype).reshape(dims)


def _find_idx(directory: str, prefixes: Sequence[str], kind: str) -> str | None:
    for prefix in prefixes:
        found = sorted(glob.glob(os.path.join(directory, f"{prefix}*{kind}*")))
        if found:
            return found[0]
    return None


def load_idx(data_dir: str | None = None) -> Source:
    """MNIST-format IDX files in a directory (train-images-idx3-ubyte[.gz], t10k-... or test-...).

    Images become uint8 [N, H, W, 1]; labels int32.
    """
    directory = data_dir or DEFAULT_IDX_DIR
    hint = ("Install Debian's package (apt-get install dataset-fashion-mnist, files in "
            f"{DEFAULT_IDX_DIR}) or pass data_dir=a folder with train-images-idx3-ubyte.gz, "
            "train-labels-idx1-ubyte.gz, t10k-images-idx3-ubyte.gz, t10k-labels-idx1-ubyte.gz.")
    if not os.path.isdir(directory):
        raise DataNotPreparedError(f"IDX source: directory {directory!r} does not exist. {hint}")
    paths = {
        "train_images": _find_idx(directory, ["train-images"], "idx3"),
        "train_labels": _find_idx(directory, ["train-labels"], "idx1"),
        "test_images": _find_idx(directory, ["t10k-images", "test-images"], "idx3"),
        "test_labels": _find_idx(directory, ["t10k-labels", "test-labels"], "idx1"),
    }
    missing = [k for k, v in paths.items() if v is None]
    if missing:
        raise DataNotPreparedError(f"IDX source: no {', '.join(missing)} file in {directory!r}. {hint}")

    def split(images_path, labels_path) -> Split:
        images, labels = read_idx(images_path), read_idx(labels_path)
        if images.ndim == 3:
            images = images[..., None]
        if images.ndim != 4 or images.shape[-1] not in (1, 3) or images.dtype != np.uint8:
            raise ValueError(f"{images_path}: expected uint8 images [N, H, W(, 1|3)], got "
                             f"{images.dtype} {images.shape}")
        if len(images) != len(labels):
            raise ValueError(f"{images_path} has {len(images)} images but {labels_path} has "
                             f"{len(labels)} labels")
        return Split(images, labels.astype(np.int32))

    train = split(paths["train_images"], paths["train_labels"])
    test = split(paths["test_images"], paths["test_labels"])
    num_classes = int(max(train.labels.max(), test.labels.max())) + 1
    return _in_memory_source("idx", train, test, num_classes, f"IDX files in {directory}")


# ----------------------------------------------------------------------------- image folder


@functools.lru_cache(maxsize=None)
def _tf_decoder():
    # One traced function for all files: eager decode_image per file would re-dispatch each op.
    return tf.function(lambda b: tf.shape(tf.io.decode_image(b, channels=3, expand_animations=False)),
                       input_signature=[tf.TensorSpec([], tf.string)])


def _read_image_file(path: str) -> bytes | None:
    """Encoded bytes TF can decode, or None if the file is unreadable or corrupt.

    Validated with TF's own decoder (the one training uses), so a file accepted here cannot fail
    mid-run. Formats TF cannot read (WebP, TIFF, CMYK JPEG, ...) are re-encoded as PNG through PIL.
    """
    try:
        with open(path, "rb") as f:
            data = f.read()
    except OSError:
        return None
    try:
        _tf_decoder()(tf.constant(data))
        return data
    except (tf.errors.InvalidArgumentError, tf.errors.UnknownError, ValueError):
        pass
    try:
        from PIL import Image

        with Image.open(io.BytesIO(data)) as im:
            im.load()
            out = io.BytesIO()
            im.convert("RGB").save(out, format="PNG")
            return out.getvalue()
    except Exception:  # noqa: BLE001 - PIL raises many types for bad files
        return None


def _scan(root: str) -> list[tuple[str, str | None]]:
    """(path, class name or None) of every image file under root, in sorted order."""
    items = []
    for dirpath, dirnames, filenames in os.walk(root, followlinks=True):
        dirnames.sort()
        rel = os.path.relpath(dirpath, root)
        cls = None if rel == "." else rel.split(os.sep)[0]
        for fn in sorted(filenames):
            if fn.lower().endswith(IMAGE_EXTENSIONS) and not fn.startswith("."):
                items.append((os.path.join(dirpath, fn), cls))
    return items


def _load_files(items, class_ids: dict[str, int]) -> tuple[Split, list[str]]:
    images, labels, bad = [], [], []
    for path, cls in items:
        data = _read_image_file(path)
        if data is None:
            bad.append(path)
            continue
        images.append(data)
        labels.append(class_ids[cls] if cls is not None and class_ids else -1)
    arr = np.empty(len(images), dtype=object)
    arr[:] = images
    return Split(arr, np.array(labels, np.int32)), bad


def load_folder(data_dir: str | None) -> Source:
    """A folder of image files as encoded bytes in memory.

    Layouts: root/{train,test or val}/[class/]*.jpg gives those splits; otherwise every image
    under root, split by a fixed permutation (numpy default_rng(0)) into 90% train, 10% test.
    Classes are the first-level sub-folder names (sorted); images directly in root are
    unlabelled (-1), and without sub-folders num_classes is None. Unreadable or corrupt files
    are skipped, counted and reported once.
    """
    if not data_dir:
        raise ValueError("the 'folder' source needs data_dir=the folder of images")
    root = os.path.expanduser(data_dir)
    if not os.path.isdir(root):
        raise FileNotFoundError(f"folder source: {root!r} is not a directory")
    subdirs = {d.lower(): d for d in os.listdir(root) if os.path.isdir(os.path.join(root, d))}
    test_name = next((subdirs[k] for k in ("test", "val", "validation") if k in subdirs), None)
    if "train" in subdirs and test_name:
        parts = {"train": _scan(os.path.join(root, subdirs["train"])),
                 "test": _scan(os.path.join(root, test_name))}
    else:
        everything = _scan(root)
        order = np.random.default_rng(0).permutation(len(everything))
        num_test = int(round(FOLDER_TEST_FRACTION * len(everything))) if len(everything) > 1 else 0
        parts = {"train": [everything[i] for i in sorted(order[num_test:])],
                 "test": [everything[i] for i in sorted(order[:num_test])]}
    if not parts["train"]:
        raise ValueError(f"folder source: no image files ({', '.join(IMAGE_EXTENSIONS)}) under {root!r}")
    classes = sorted({c for items in parts.values() for _, c in items if c is not None})
    class_ids = {c: i for i, c in enumerate(classes)}
    train, bad = _load_files(parts["train"], class_ids)
    test, bad_test = _load_files(parts["test"], class_ids)
    bad += bad_test
    if bad:
        message = (f"folder source {root!r}: skipped {len(bad)} unreadable or corrupt image "
                   f"file(s), e.g. {bad[:3]}")
        log.warning(message)
        warnings.warn(message, stacklevel=3)
    if train.num_examples == 0:
        raise ValueError(f"folder source: none of the {len(parts['train'])} image files under "
                         f"{root!r} could be decoded")
    source = _in_memory_source("folder", train, test, len(classes) or None, f"images in {root}")
    source.skipped = bad
    return source


# ----------------------------------------------------------------------------- tfds


def _tfds_not_prepared(name: str, data_dir: str | None, builder) -> DataNotPreparedError:
    where = data_dir or "the default tfds data_dir (~/tensorflow_datasets or $TFDS_DATA_DIR)"
    message = (f"tfds dataset {name!r} is not prepared in {where}. Prepare it on a machine with a "
               f"network (`tfds build {name} --data_dir=DIR`, or python -c \"import "
               f"tensorflow_datasets as tfds; tfds.builder('{name}', data_dir='DIR')."
               f"download_and_prepare()\"), then copy DIR here and pass data_dir=DIR.")
    manual = getattr(builder, "MANUAL_DOWNLOAD_INSTRUCTIONS", None)
    if manual:
        message += (f" {name} needs a manual download first: put the files below in "
                    f"DIR/downloads/manual/, then run `tfds build {name} --data_dir=DIR`:\n"
                    f"{manual.strip()}")
    if name in ("fashion_mnist", "mnist"):
        message += " Offline, Debian's IDX files work too: load_source('idx')."
    return DataNotPreparedError(message)


def _tfds_builder(name: str, data_dir: str | None):
    import tensorflow_datasets as tfds

    try:
        return tfds.builder(name, data_dir=data_dir)
    except tfds.core.registered.DatasetNotFoundError:
        known = list(BUILTIN_SOURCES) + list(tfds.list_builders())
        close = difflib.get_close_matches(name, known, n=3)
        raise ValueError(
            f"unknown dataset {name!r}. Known sources: {', '.join(BUILTIN_SOURCES)}, or any "
            f"tensorflow-datasets image dataset (e.g. {', '.join(TFDS_EXAMPLES)}; "
            f"{len(known) - len(BUILTIN_SOURCES)} names in tfds.list_builders())."
            + (f" Did you mean {' or '.join(map(repr, close))}?" if close else "")) from None


def _split_info(builder, split: str) -> tuple[int, int] | None:
    """(num_examples, num_bytes on disk) of a split like 'train' or 'train+unlabelled', if known."""
    try:
        parts = [builder.info.splits[s] for s in split.split("+")]
    except (KeyError, ValueError):
        return None
    return sum(p.num_examples for p in parts), sum(p.num_bytes for p in parts)


def _tfds_load_in_memory(builder, split: str, image_key: str, label_key: str | None,
                         max_bytes: float) -> Split:
    import tensorflow_datasets as tfds

    feature = builder.info.features[image_key]
    fixed = feature.shape is not None and None not in feature.shape
    info = _split_info(builder, split) if builder.info.splits else None
    if info is not None:
        estimate = info[0] * int(np.prod(feature.shape)) if fixed else info[1]
        if estimate > max_bytes:
            raise MemoryError(
                f"tfds {builder.name}[{split}] would take about {estimate / 2**30:.1f} GiB in memory "
                f"(limit {max_bytes / 2**30:.1f} GiB: load_source(..., max_in_memory_gb=...)). It is "
                f"prepared as {builder.info.file_format.value}, which has no random access; convert "
                f"it once to array_record (`tfds convert_format --dataset_version_dir="
                f"{builder.data_dir} --out_file_format=array_record`) and it is read from disk.")
    # Fixed-shape images (cifar, mnist, stl10) are held decoded; others as their encoded bytes.
    decoders = None if fixed else {image_key: tfds.decode.SkipDecoding()}
    try:
        ds = builder.as_dataset(split=split, decoders=decoders, shuffle_files=False)
    except AssertionError as e:  # tfds's "could not find data" check
        raise _tfds_not_prepared(builder.name, None, builder) from e
    images, labels = [], []
    for batch in tfds.as_numpy(ds.batch(1024)):
        images.append(batch[image_key])
        labels.append(batch[label_key].astype(np.int32) if label_key
                      else np.full(len(batch[image_key]), -1, np.int32))
    if fixed:
        arr = np.concatenate(images) if images else np.zeros((0, *feature.shape), np.uint8)
    else:
        arr = np.empty(sum(map(len, images)), dtype=object)
        arr[:] = [b for chunk in images for b in chunk]
    return Split(arr, np.concatenate(labels) if labels else np.zeros(0, np.int32))


def _tfds_split_names(builder) -> dict[str, str]:
    """tfds split names for 'pretrain', 'train' and 'test'."""
    splits = builder.info.splits if builder.is_prepared() else {}
    pretrain = TFDS_PRETRAIN_SPLIT.get(builder.name, "train")
    if not splits:  # not prepared, or tfds.testing.mock_data: the usual names
        test = "validation" if builder.name == "imagenet2012" else "test"
        return {"pretrain": pretrain, "train": "train", "test": test}
    test = next((s for s in ("test", "validation") if s in splits), None)
    if test is None:  # only a train split: hold out a fixed 10% for evaluation
        return {"pretrain": "train[:90%]", "train": "train[:90%]", "test": "train[90%:]"}
    return {"pretrain": pretrain, "train": "train", "test": test}


def load_tfds(name: str, data_dir: str | None = None, *, download: bool = False,
              max_in_memory_gb: float = 16.0) -> Source:
    """A tensorflow-datasets image dataset (reads offline once prepared in data_dir).

    download=True runs tfds's download_and_prepare first (needs a network, and for imagenet2012
    the manual files). Splits: pretrain = 'train' (stl10: 'train+unlabelled'), train = 'train',
    test = 'test', else 'validation' (imagenet2012), else train[90%:] (train then is train[:90%]).
    Prepared as array_record (also as an alternative format after `tfds convert_format`), the
    data is read from disk by index; otherwise it is loaded into memory on first use.
    """
    import tensorflow_datasets as tfds

    builder = _tfds_builder(name, data_dir)
    if download:
        builder.download_and_prepare()
    features = builder.info.features
    image_key = "image" if "image" in features else next(
        (k for k, f in features.items() if isinstance(f, tfds.features.Image)), None)
    if image_key is None:
        raise ValueError(f"tfds dataset {name!r} has no image feature (features: {list(features)})")
    label_key = "label" if "label" in features else None
    num_classes = getattr(features[label_key], "num_classes", None) if label_key else None
    names = _tfds_split_names(builder)
    if not builder.is_prepared():
        try:  # building (not reading) a dataset is tfds's own check; it passes under mock_data
            builder.as_dataset(split=names["train"])
        except AssertionError as e:
            raise _tfds_not_prepared(name, data_dir, builder) from e

    formats = {builder.info.file_format, *builder.info.alternative_file_formats}
    random_access = builder.is_prepared() and tfds.core.FileFormat.ARRAY_RECORD in formats
    max_bytes = max_in_memory_gb * 2**30

    def loader(split):
        if random_access:
            source = builder.as_data_source(split, decoders={image_key: tfds.decode.SkipDecoding()},
                                            file_format=tfds.core.FileFormat.ARRAY_RECORD)
            return Split(None, None, data_source=source, label_key=label_key)
        return _tfds_load_in_memory(builder, split, image_key, label_key, max_bytes)

    where = "array_record, read from disk" if random_access else "loaded into memory"
    sizes = {}
    if builder.is_prepared():
        for key, split in names.items():
            info = _split_info(builder, split)
            if info is None and "[" not in split:
                raise ValueError(f"tfds {name!r} has no split {split!r} (splits: "
                                 f"{list(builder.info.splits)})")
            if info is not None:
                sizes[key] = info[0]
    return Source(name=name, num_classes=num_classes,
                  loaders={k: functools.partial(loader, s) for k, s in names.items()},
                  sizes=sizes, description=f"tfds {name} ({where})")


# ----------------------------------------------------------------------------- dispatch


def load_source(name: str, data_dir: str | None = None, **kwargs) -> Source:
    """A Source by name: 'digits', 'idx' / 'fashion_mnist_idx', 'folder', or a tfds name.

    data_dir: the IDX folder, the image folder, or tfds's data_dir, by source. kwargs go to
    load_tfds (download, max_in_memory_gb). Raises ValueError for unknown names (listing the
    known sources) and DataNotPreparedError (a FileNotFoundError) saying what to do when the
    data is not on this machine.
    """
    key = name.strip()
    if key == "digits":
        return load_digits()
    if key in ("idx", "fashion_mnist_idx"):
        return load_idx(data_dir)
    if key == "folder":
        return load_folder(data_dir)
    return load_tfds(key, data_dir, **kwargs)
