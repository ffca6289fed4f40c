"""tensorflow-datasets sources: read offline once prepared, by index when array_record.

What each preparation holds in memory is in sources.py. `data_dir` may be local or gs://.
"""

from __future__ import annotations

import difflib
import functools
import re

import numpy as np
from etils import epath

from bt_jax.data.errors import DataError, DataNotPreparedError
from bt_jax.data.sources import BUILTIN_SOURCES, Source, Split

TFDS_EXAMPLES = ("cifar10", "cifar100", "stl10", "fashion_mnist", "mnist", "imagenet2012")
# tfds datasets whose pretraining split is not 'train' (stl10: the 100k unlabelled images too).
TFDS_PRETRAIN_SPLIT = {"stl10": "train+unlabelled"}
_NUMBER_WORDS = {
    "zero": "0",
    "one": "1",
    "two": "2",
    "three": "3",
    "four": "4",
    "five": "5",
    "six": "6",
    "seven": "7",
    "eight": "8",
    "nine": "9",
    "ten": "10",
    "hundred": "100",
    "thousand": "1000",
}


def _tfds():
    import tensorflow_datasets as tfds

    from bt_jax.data import tf_runtime  # noqa: F401 - TF set up for tf.data only, first

    return tfds


def _canonical(name: str) -> str:
    """A name as a user may misspell it: lower case, number words as digits, no separators."""
    words = re.split(r"[^0-9a-z]+", name.lower())
    return "".join(_NUMBER_WORDS.get(w, w) for w in words)


def suggest(name: str, known: list[str], n: int = 3) -> list[str]:
    """Up to n names of `known` close to `name`: same canonical form first (cifar_ten ->
    cifar10), then difflib's closest, the common datasets first among equals."""
    by_canonical: dict[str, list[str]] = {}
    for k in known:
        by_canonical.setdefault(_canonical(k), []).append(k)
    target = _canonical(name)
    exact = sorted(by_canonical.get(target, []), key=lambda k: (k not in TFDS_EXAMPLES, k))
    close = difflib.get_close_matches(target, list(by_canonical), n=n + len(exact), cutoff=0.6)
    ranked = exact + [k for c in close for k in sorted(by_canonical[c]) if k not in exact]
    return ranked[:n]


def _tfds_not_prepared(name: str, data_dir: str | None, builder) -> DataNotPreparedError:
    where = data_dir or "the default tfds data_dir (~/tensorflow_datasets or $TFDS_DATA_DIR)"
    message = (
        f"tfds dataset {name!r} is not prepared in {where}. Prepare it on a machine with a "
        f'network (`tfds build {name} --data_dir=DIR`, or python -c "import '
        f"tensorflow_datasets as tfds; tfds.builder('{name}', data_dir='DIR')."
        f'download_and_prepare()"), then copy DIR here and pass data_dir=DIR.'
    )
    manual = getattr(builder, "MANUAL_DOWNLOAD_INSTRUCTIONS", None)
    if manual:
        message += (
            f" {name} needs a manual download first: put the files below in "
            f"DIR/downloads/manual/, then run `tfds build {name} --data_dir=DIR`:\n"
            f"{manual.strip()}"
        )
    if name in ("fashion_mnist", "mnist"):
        message += " Offline, Debian's IDX files work too: load_source('idx')."
    return DataNotPreparedError(message)


def _tfds_builder(name: str, data_dir: str | None):
    tfds = _tfds()

    try:
        return tfds.builder(name, data_dir=data_dir)
    except tfds.core.registered.DatasetNotFoundError:
        known = list(BUILTIN_SOURCES) + list(tfds.list_builders())
        close = suggest(name, known)
        raise DataError(
            f"unknown dataset {name!r}. Known sources: {', '.join(BUILTIN_SOURCES)}, or any "
            f"tensorflow-datasets image dataset (e.g. {', '.join(TFDS_EXAMPLES)}; "
            f"{len(known) - len(BUILTIN_SOURCES)} names in tfds.list_builders())."
            + (f" Did you mean {' or '.join(map(repr, close))}?" if close else "")
        ) from None


def _split_info(builder, split: str) -> tuple[int, int] | None:
    """(num_examples, num_bytes on disk) of a split like 'train' or 'train+unlabelled', if known."""
    try:
        parts = [builder.info.splits[s] for s in split.split("+")]
    except (KeyError, ValueError):
        return None
    return sum(p.num_examples for p in parts), sum(p.num_bytes for p in parts)


def _tfds_load_in_memory(
    builder, split: str, image_key: str, label_key: str | None, max_bytes: float
) -> Split:
    tfds = _tfds()

    feature = builder.info.features[image_key]
    fixed = feature.shape is not None and None not in feature.shape
    info = _split_info(builder, split) if builder.info.splits else None
    if info is not None:
        estimate = info[0] * int(np.prod(feature.shape)) if fixed else info[1]
        if estimate > max_bytes:
            raise DataError(
                f"tfds {builder.name}[{split}] would take about {estimate / 2**30:.1f} GiB in "
                f"memory (limit {max_bytes / 2**30:.1f} GiB: load_source(..., "
                f"max_in_memory_gb=...)). It is prepared as {builder.info.file_format.value}, "
                f"which has no random access; convert "
                f"it once to array_record (`tfds convert_format --dataset_version_dir="
                f"{builder.data_dir} --out_file_format=array_record`) and it is read from disk."
            )
    # Fixed-shape images (cifar, mnist, stl10) are held decoded; others as their encoded bytes.
    decoders = None if fixed else {image_key: tfds.decode.SkipDecoding()}
    try:
        ds = builder.as_dataset(split=split, decoders=decoders, shuffle_files=False)
    except AssertionError as e:  # tfds's "could not find data" check
        raise _tfds_not_prepared(builder.name, None, builder) from e
    images, labels = [], []
    for batch in tfds.as_numpy(ds.batch(1024)):
        images.append(batch[image_key])
        labels.append(
            batch[label_key].astype(np.int32)
            if label_key
            else np.full(len(batch[image_key]), -1, np.int32)
        )
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


def load_tfds(
    name: str,
    data_dir: epath.PathLike | None = None,
    *,
    download: bool = False,
    max_in_memory_gb: float = 16.0,
) -> Source:
    """A tensorflow-datasets image dataset (reads offline once prepared in data_dir).

    download=True runs tfds's download_and_prepare first (needs a network, and for imagenet2012
    the manual files). Splits: pretrain = 'train' (stl10: 'train+unlabelled'), train = 'train',
    test = 'test', else 'validation' (imagenet2012), else train[90%:] (train then is train[:90%]).
    Prepared as array_record (also as an alternative format after `tfds convert_format`), the
    data is read from disk by index; otherwise it is loaded into memory on first use.
    """
    tfds = _tfds()

    data_dir = str(epath.Path(data_dir).expanduser()) if data_dir else None
    builder = _tfds_builder(name, data_dir)
    if download:
        builder.download_and_prepare()
    features = builder.info.features
    image_key = (
        "image"
        if "image" in features
        else next((k for k, f in features.items() if isinstance(f, tfds.features.Image)), None)
    )
    if image_key is None:
        raise DataError(
            f"tfds dataset {name!r} has no image feature (features: "
            f"{list(features)}); pick an image dataset"
        )
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
            source = builder.as_data_source(
                split,
                decoders={image_key: tfds.decode.SkipDecoding()},
                file_format=tfds.core.FileFormat.ARRAY_RECORD,
            )
            return Split(None, None, data_source=source, label_key=label_key)
        return _tfds_load_in_memory(builder, split, image_key, label_key, max_bytes)

    where = "array_record, read from disk" if random_access else "loaded into memory"
    sizes = {}
    if builder.is_prepared():
        for key, split in names.items():
            info = _split_info(builder, split)
            if info is None and "[" not in split:
                raise DataError(
                    f"tfds {name!r} has no split {split!r} (splits: "
                    f"{list(builder.info.splits)}); it is not an image "
                    "classification dataset this loader knows"
                )
            if info is not None:
                sizes[key] = info[0]
    return Source(
        name=name,
        num_classes=num_classes,
        loaders={k: functools.partial(loader, s) for k, s in names.items()},
        sizes=sizes,
        description=f"tfds {name} ({where})",
    )
