"""`load_source(name, data_dir)`: every source by name, with one-line errors that say what to do."""

from __future__ import annotations

from etils import epath

from bt_jax.data import file_sources, sources, tfds_sources
from bt_jax.data.errors import DataError
from bt_jax.data.sources import Source


def load_source(name: str, data_dir: epath.PathLike | None = None, **kwargs) -> Source:
    """A Source by name: 'digits', 'idx' / 'fashion_mnist_idx', 'folder', or a tfds name.

    data_dir: the IDX folder, the image folder, or tfds's data_dir, by source (local or gs://).
    kwargs go to load_tfds (download, max_in_memory_gb). Raises DataError for unknown names
    (listing the known sources and the closest names) and DataNotPreparedError (also a
    FileNotFoundError) saying what to do when the data is not on this machine.
    """
    key = name.strip()
    if key == "digits":
        if data_dir:
            raise DataError(
                f"the digits source is embedded in scikit-learn and reads no files, "
                f"but data_dir={str(data_dir)!r} was given; drop data_dir (or "
                "--config.data_dir), or pick a source that reads it: idx, folder or "
                "a tfds name"
            )
        if kwargs:
            raise DataError(f"the digits source takes no options, got {sorted(kwargs)}")
        return sources.load_digits()
    if key in ("idx", "fashion_mnist_idx", "folder") and kwargs:
        raise DataError(f"the {key} source takes no options besides data_dir, got {sorted(kwargs)}")
    if key in ("idx", "fashion_mnist_idx"):
        return file_sources.load_idx(data_dir)
    if key == "folder":
        return file_sources.load_folder(data_dir)
    return tfds_sources.load_tfds(key, data_dir, **kwargs)
