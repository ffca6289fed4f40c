"""Sources from files: MNIST-format IDX files and folders of images, local or gs:// alike.

Every path goes through etils.epath, so `data_dir` may be a local folder or a bucket.
"""

from __future__ import annotations

import functools
import gzip
import io
import logging
import warnings
import zlib
from collections.abc import Sequence

import numpy as np
from etils import epath

from bt_jax.data.errors import DataError, DataNotPreparedError
from bt_jax.data.sources import DEFAULT_IDX_DIR, Source, Split, in_memory_source

log = logging.getLogger(__name__)

FOLDER_TEST_FRACTION = 0.1  # folders without train/ and test/ sub-folders
IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".bmp", ".gif", ".webp", ".tif", ".tiff")
_IDX_DTYPES = {0x08: np.uint8, 0x09: np.int8, 0x0B: ">i2", 0x0C: ">i4", 0x0D: ">f4", 0x0E: ">f8"}
_IDX_HINT = (
    "Install Debian's package (apt-get install dataset-fashion-mnist, files in "
    f"{DEFAULT_IDX_DIR}) or pass data_dir=a folder with train-images-idx3-ubyte.gz, "
    "train-labels-idx1-ubyte.gz, t10k-images-idx3-ubyte.gz, t10k-labels-idx1-ubyte.gz."
)


# --------------------------------------------------------------------------- IDX files


def read_idx(path: epath.PathLike) -> np.ndarray:
    """An IDX file (MNIST format, gzipped or raw) as a numpy array; DataError naming the file
    when it is truncated or corrupt."""
    path = epath.Path(path)
    data = path.read_bytes()
    if data[:2] == b"\x1f\x8b":
        try:
            data = gzip.decompress(data)
        except (EOFError, OSError, zlib.error) as error:
            raise DataError(
                f"{path}: the gzip file is truncated or corrupt ({error}); download "
                f"or install it again. {_IDX_HINT}"
            ) from None
    if len(data) < 4 or data[0] != 0 or data[1] != 0 or data[2] not in _IDX_DTYPES:
        raise DataError(
            f"{path} is not an IDX file (bad magic number {data[:4]!r}); point "
            "data_dir at MNIST-format files"
        )
    ndim = data[3]
    if len(data) < 4 + 4 * ndim:
        raise DataError(
            f"{path}: the IDX header is cut short ({len(data)} bytes); the file is "
            "truncated: download or install it again"
        )
    dims = np.frombuffer(data, ">i4", count=ndim, offset=4).astype(int)
    dtype = np.dtype(_IDX_DTYPES[data[2]])
    body = data[4 + 4 * ndim :]
    if len(body) != int(np.prod(dims)) * dtype.itemsize:
        raise DataError(
            f"{path}: the IDX header says shape {tuple(map(int, dims))} but the "
            f"file holds {len(body)} bytes of data; the file is truncated or corrupt: "
            "download or install it again"
        )
    return np.frombuffer(body, dtype).reshape(dims)


def _find_idx(directory: epath.Path, prefixes: Sequence[str], kind: str) -> epath.Path | None:
    for prefix in prefixes:
        found = sorted(directory.glob(f"{prefix}*{kind}*"))
        if found:
            return found[0]
    return None


def load_idx(data_dir: epath.PathLike | None = None) -> Source:
    """MNIST-format IDX files in a directory (train-images-idx3-ubyte[.gz], t10k-... or test-...).

    Images become uint8 [N, H, W, 1]; labels int32.
    """
    directory = epath.Path(data_dir or DEFAULT_IDX_DIR).expanduser()
    if not directory.is_dir():
        raise DataNotPreparedError(
            f"IDX source: directory {str(directory)!r} does not exist. {_IDX_HINT}"
        )
    paths = {
        "train_images": _find_idx(directory, ["train-images"], "idx3"),
        "train_labels": _find_idx(directory, ["train-labels"], "idx1"),
        "test_images": _find_idx(directory, ["t10k-images", "test-images"], "idx3"),
        "test_labels": _find_idx(directory, ["t10k-labels", "test-labels"], "idx1"),
    }
    missing = [k for k, v in paths.items() if v is None]
    if missing:
        raise DataNotPreparedError(
            f"IDX source: no {', '.join(missing)} file in {str(directory)!r}. {_IDX_HINT}"
        )

    def split(images_path, labels_path) -> Split:
        images, labels = read_idx(images_path), read_idx(labels_path)
        if images.ndim == 3:
            images = images[..., None]
        if images.ndim != 4 or images.shape[-1] not in (1, 3) or images.dtype != np.uint8:
            raise DataError(
                f"{images_path}: expected uint8 images [N, H, W(, 1|3)], got "
                f"{images.dtype} {images.shape}; point data_dir at image IDX files"
            )
        if len(images) != len(labels):
            raise DataError(
                f"{images_path} has {len(images)} images but {labels_path} has "
                f"{len(labels)} labels; one of them is from another dataset"
            )
        return Split(images, labels.astype(np.int32))

    train = split(paths["train_images"], paths["train_labels"])
    test = split(paths["test_images"], paths["test_labels"])
    num_classes = int(max(train.labels.max(), test.labels.max())) + 1
    return in_memory_source("idx", train, test, num_classes, f"IDX files in {directory}")


# --------------------------------------------------------------------------- image folder


@functools.cache
def _tf_decoder():
    from bt_jax.data.tf_runtime import tf

    # One traced function for all files: eager decode_image per file would re-dispatch each op.
    def shape(encoded):
        return tf.shape(tf.io.decode_image(encoded, channels=3, expand_animations=False))

    return tf.function(shape, input_signature=[tf.TensorSpec([], tf.string)])


def _read_image_file(path: epath.Path) -> bytes | None:
    """Encoded bytes TF can decode, or None if the file is unreadable or corrupt.

    Validated with TF's own decoder (the one training uses), so a file accepted here cannot fail
    mid-run. Formats TF cannot read (WebP, TIFF, CMYK JPEG, ...) are re-encoded as PNG through PIL.
    """
    from bt_jax.data.tf_runtime import tf

    try:
        data = path.read_bytes()
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


def _is_image(path: epath.Path) -> bool:
    return path.name.lower().endswith(IMAGE_EXTENSIONS) and not path.name.startswith(".")


def _scan(root: epath.Path) -> list[tuple[epath.Path, str | None]]:
    """(path, class name or None) of every image file under root, in sorted order.

    Sub-folders (symbolic links too) are listed, not walked with is_dir on every entry: a
    bucket answers one listing per folder.
    """
    items = []

    def visit(directory: epath.Path, cls: str | None):
        for entry in sorted(directory.iterdir(), key=lambda p: p.name):
            if entry.name.startswith("."):
                continue
            if _is_image(entry):
                items.append((entry, cls))
            elif entry.is_dir():
                visit(entry, entry.name if cls is None else cls)

    visit(root, None)
    return items


def _load_files(items, class_ids: dict[str, int]) -> tuple[Split, list[str]]:
    images, labels, bad = [], [], []
    for path, cls in items:
        data = _read_image_file(path)
        if data is None:
            bad.append(str(path))
            continue
        images.append(data)
        labels.append(class_ids[cls] if cls is not None and class_ids else -1)
    arr = np.empty(len(images), dtype=object)
    arr[:] = images
    return Split(arr, np.array(labels, np.int32)), bad


def load_folder(data_dir: epath.PathLike | None) -> Source:
    """A folder of image files as encoded bytes in memory.

    Layouts: root/{train,test or val}/[class/]*.jpg gives those splits; otherwise every image
    under root, split by a fixed permutation (numpy default_rng(0)) into 90% train, 10% test.
    Classes are the first-level sub-folder names (sorted); images directly in root are
    unlabelled (-1), and without sub-folders num_classes is None. Unreadable or corrupt files
    are skipped, counted and reported once.
    """
    if not data_dir:
        raise DataError(
            "the 'folder' source needs data_dir=the folder of images (--config.data_dir=DIR)"
        )
    root = epath.Path(data_dir).expanduser()
    if not root.is_dir():
        raise DataNotPreparedError(
            f"folder source: {str(root)!r} is not a directory; pass "
            "data_dir=a folder of JPEG/PNG files (class sub-folders "
            "optional)"
        )
    subdirs = {d.name.lower(): d for d in root.iterdir() if not _is_image(d) and d.is_dir()}
    test_dir = next((subdirs[k] for k in ("test", "val", "validation") if k in subdirs), None)
    if "train" in subdirs and test_dir is not None:
        parts = {"train": _scan(subdirs["train"]), "test": _scan(test_dir)}
    else:
        everything = _scan(root)
        order = np.random.default_rng(0).permutation(len(everything))
        num_test = int(round(FOLDER_TEST_FRACTION * len(everything))) if len(everything) > 1 else 0
        parts = {
            "train": [everything[i] for i in sorted(order[num_test:])],
            "test": [everything[i] for i in sorted(order[:num_test])],
        }
    if not parts["train"]:
        raise DataError(
            f"folder source: no image files ({', '.join(IMAGE_EXTENSIONS)}) under "
            f"{str(root)!r}; put the images there, in class sub-folders if labelled"
        )
    classes = sorted({c for items in parts.values() for _, c in items if c is not None})
    class_ids = {c: i for i, c in enumerate(classes)}
    train, bad = _load_files(parts["train"], class_ids)
    test, bad_test = _load_files(parts["test"], class_ids)
    bad += bad_test
    if bad:
        message = (
            f"folder source {str(root)!r}: skipped {len(bad)} unreadable or corrupt image "
            f"file(s), e.g. {bad[:3]}"
        )
        log.warning(message)
        warnings.warn(message, stacklevel=3)
    if train.num_examples == 0:
        raise DataError(
            f"folder source: none of the {len(parts['train'])} image files under "
            f"{str(root)!r} could be decoded (e.g. {bad[0]}); check that they are "
            "images (JPEG, PNG, ...) and not truncated"
        )
    source = in_memory_source("folder", train, test, len(classes) or None, f"images in {root}")
    source.skipped = bad
    return source
