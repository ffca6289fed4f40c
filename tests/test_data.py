"""bt_jax.data: sources, determinism, exact resume, per-process shares, bad input."""
import os
import warnings

import numpy as np
import pytest
import tensorflow as tf

from bt_jax import data
from bt_jax.data import sources

FASHION_MNIST_DIR = "/usr/share/datasets/fashion-mnist"


def take(iterator, n):
    return [next(iterator) for _ in range(n)]


@pytest.fixture(scope="module")
def digits():
    return data.load_source("digits")


@pytest.fixture(scope="module")
def small(digits):
    """40 train / 10 test digits: cheap epochs (global batch 16 -> 2 steps per epoch, 8 dropped)."""
    train, test = digits.split("train"), digits.split("test")
    return data.from_arrays("small", train.images[:40], train.labels[:40], test.images[:10],
                            test.labels[:10], num_classes=10)


def batches(source, n, **kw):
    args = dict(global_batch=16, image_size=16, seed=0, process_index=0, process_count=1,
                local_device_count=8)
    args.update(kw)
    return take(data.pretrain_batches(source, **args), n)


def same(a, b):
    return a.keys() == b.keys() and all(a[k].tobytes() == b[k].tobytes() for k in a)


# ----------------------------------------------------------------------------- determinism


def test_same_seed_same_bytes_whatever_the_parallelism(small):
    first = batches(small, 3)
    again = batches(small, 3)
    one_thread = batches(small, 3, num_workers=1)
    assert all(same(a, b) and same(a, c) for a, b, c in zip(first, again, one_thread))


def test_views_can_change_the_recipe(small):
    """The views argument reaches the augmentations: the official specs give the default bytes,
    and view B without blur or solarize is different from the default view B, view A unchanged."""
    import dataclasses
    default = batches(small, 1)[0]
    official = batches(small, 1, views=data.VIEWS)[0]
    assert same(default, official)
    plain_b = dict(data.VIEWS, b=dataclasses.replace(data.VIEWS["b"], blur_prob=1.0,
                                                     solarize_prob=1.0))
    changed = batches(small, 1, views=plain_b)[0]
    assert np.array_equal(changed["view_a"], default["view_a"])
    assert not np.array_equal(changed["view_b"], default["view_b"])
    with pytest.raises(ValueError, match="views must map 'a' and 'b'"):
        batches(small, 1, views={"a": data.VIEWS["a"]})


def test_different_seed_differs(small):
    a, b = batches(small, 1)[0], batches(small, 1, seed=1)[0]
    assert not np.array_equal(a["view_a"], b["view_a"])


def test_restart_at_step_equals_uninterrupted_stream(small):
    # 2 steps per epoch: steps 3 and 4 lie in epochs 1 and 2, reached without replaying anything.
    stream = batches(small, 5, with_index=True)
    resumed = batches(small, 2, start_step=3, with_index=True)
    assert same(stream[3], resumed[0]) and same(stream[4], resumed[1])


def test_epochs_reshuffle_and_drop_the_last_incomplete_batch(small):
    stream = batches(small, 4, with_index=True)
    epoch0 = np.concatenate([b["index"].ravel() for b in stream[:2]])
    epoch1 = np.concatenate([b["index"].ravel() for b in stream[2:]])
    assert len(set(epoch0)) == 32 and len(set(epoch1)) == 32  # 40 // 16 * 16, no repeats
    assert not np.array_equal(epoch0, epoch1)
    assert data.steps_per_epoch(small, 16) == 2
    finite = list(data.pretrain_batches(small, global_batch=16, image_size=16, seed=0,
                                        process_index=0, process_count=1, local_device_count=8,
                                        num_epochs=2))
    assert len(finite) == 4


def test_shapes_dtypes_and_views_differ(small):
    batch = batches(small, 1)[0]
    assert batch["view_a"].shape == batch["view_b"].shape == (8, 2, 16, 16, 3)
    assert batch["view_a"].dtype == batch["view_b"].dtype == np.float32
    assert batch["label"].shape == (8, 2) and batch["label"].dtype == np.int32
    assert not np.allclose(batch["view_a"], batch["view_b"])
    assert np.isfinite(batch["view_a"]).all()


def test_two_processes_read_disjoint_shares_covering_the_epoch(small):
    kw = dict(global_batch=8, image_size=16, seed=3, process_count=2, local_device_count=2,
              num_epochs=1, with_index=True)
    shares = [list(data.pretrain_batches(small, process_index=p, **kw)) for p in (0, 1)]
    assert len(shares[0]) == len(shares[1]) == 5
    index = [np.concatenate([b["index"].ravel() for b in s]) for s in shares]
    assert not set(index[0]) & set(index[1])
    assert len(set(index[0]) | set(index[1])) == 40  # 40 // 8 * 8: the whole split
    # The global batch does not depend on the topology: 2 x 2 devices == 1 process x 4 devices.
    single = next(data.pretrain_batches(small, global_batch=8, image_size=16, seed=3,
                                        process_index=0, process_count=1, local_device_count=4))
    joined = np.concatenate([shares[0][0]["view_a"], shares[1][0]["view_a"]])
    assert joined.tobytes() == single["view_a"].tobytes()


def test_prefetch_to_devices(small):
    import jax

    it = data.prefetch_to_devices(iter(batches(small, 2)), size=2)
    batch = next(it)
    assert isinstance(batch["view_a"], jax.Array)
    assert batch["view_a"].shape == (8, 2, 16, 16, 3)
    assert len(batch["view_a"].sharding.device_set) == jax.local_device_count()


# ----------------------------------------------------------------------------- evaluation


def test_eval_batches_all_examples_in_order(digits):
    out = list(data.eval_batches(digits, split="test", batch_size=128, image_size=16))
    assert [len(y) for _, y in out] == [128, 128, 41]
    assert out[0][0].shape == (128, 16, 16, 3) and out[0][0].dtype == np.float32
    labels = np.concatenate([y for _, y in out])
    np.testing.assert_array_equal(labels, digits.split("test").labels)
    again = next(data.eval_batches(digits, split="test", batch_size=128, image_size=16))
    assert again[0].tobytes() == out[0][0].tobytes()


def test_digits_split_is_fixed(digits):
    assert digits.num_train == 1500 and digits.num_examples("test") == 297
    assert digits.num_classes == 10
    assert digits.split("train").images.shape == (1500, 8, 8, 1)
    assert digits.split("train").images.max() == 255


# ----------------------------------------------------------------------------- other sources


def write_images(folder, n, size=(20, 24), fmt="JPEG", seed=0):
    from PIL import Image

    rng = np.random.default_rng(seed)
    os.makedirs(folder, exist_ok=True)
    ext = {"JPEG": "jpg", "PNG": "png"}[fmt]
    for i in range(n):
        pixels = rng.integers(0, 256, (*size, 3), dtype=np.uint8)
        Image.fromarray(pixels).save(os.path.join(folder, f"{i:03d}.{ext}"), format=fmt)


def test_folder_with_classes_and_mixed_formats(tmp_path):
    write_images(tmp_path / "cats", 6, fmt="JPEG")
    write_images(tmp_path / "dogs", 6, size=(30, 17), fmt="PNG", seed=1)
    source = data.load_source("folder", str(tmp_path))
    assert source.num_classes == 2
    assert source.num_train + source.num_examples("test") == 12
    assert set(source.split("train").labels) <= {0, 1}
    batch = next(data.pretrain_batches(source, global_batch=8, image_size=16, seed=0,
                                       process_index=0, process_count=1, local_device_count=8))
    assert batch["view_a"].shape == (8, 1, 16, 16, 3)
    images, labels = next(data.eval_batches(source, split="train", batch_size=64, image_size=16))
    assert images.shape == (source.num_train, 16, 16, 3)


def test_folder_train_test_layout_unlabelled(tmp_path):
    write_images(tmp_path / "train", 5)
    write_images(tmp_path / "test", 3)
    source = data.load_source("folder", str(tmp_path))
    assert (source.num_train, source.num_examples("test"), source.num_classes) == (5, 3, None)
    assert (source.split("train").labels == -1).all()


def test_folder_corrupt_image_skipped_counted_reported_once(tmp_path):
    write_images(tmp_path, 4)
    (tmp_path / "broken.jpg").write_bytes(b"\xff\xd8\xff\xe0 not really a jpeg")
    (tmp_path / "empty.png").write_bytes(b"")
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        source = data.load_source("folder", str(tmp_path))
    reports = [w for w in caught if "corrupt" in str(w.message)]
    assert len(reports) == 1 and "skipped 2" in str(reports[0].message)
    assert len(source.skipped) == 2
    assert source.num_train + source.num_examples("test") == 4


def test_folder_empty_or_without_images_is_an_error(tmp_path):
    with pytest.raises(ValueError, match="no image files"):
        data.load_source("folder", str(tmp_path))
    (tmp_path / "notes.txt").write_text("hello")
    with pytest.raises(ValueError, match="no image files"):
        data.load_source("folder", str(tmp_path))
    (tmp_path / "bad.png").write_bytes(b"garbage")
    with pytest.warns(UserWarning), pytest.raises(ValueError, match="could be decoded"):
        data.load_source("folder", str(tmp_path))
    with pytest.raises(FileNotFoundError):
        data.load_source("folder", str(tmp_path / "missing"))


def test_idx_files_gzipped_and_raw(tmp_path):
    import gzip

    def idx(array, code):
        header = bytes([0, 0, code, array.ndim]) + np.array(array.shape, ">i4").tobytes()
        return header + array.tobytes()

    rng = np.random.default_rng(0)
    train = rng.integers(0, 256, (20, 12, 12), dtype=np.uint8)
    (tmp_path / "train-images-idx3-ubyte.gz").write_bytes(gzip.compress(idx(train, 8)))
    (tmp_path / "train-labels-idx1-ubyte").write_bytes(idx(np.arange(20, dtype=np.uint8) % 3, 8))
    (tmp_path / "t10k-images-idx3-ubyte").write_bytes(idx(train[:5], 8))
    (tmp_path / "t10k-labels-idx1-ubyte.gz").write_bytes(gzip.compress(idx(np.zeros(5, np.uint8), 8)))
    source = data.load_source("idx", str(tmp_path))
    assert (source.num_train, source.num_examples("test"), source.num_classes) == (20, 5, 3)
    np.testing.assert_array_equal(source.split("train").images[..., 0], train)
    batch = next(data.pretrain_batches(source, global_batch=8, image_size=16, seed=0,
                                       process_index=0, process_count=1, local_device_count=8))
    assert batch["view_a"].shape == (8, 1, 16, 16, 3)


@pytest.mark.skipif(not os.path.isdir(FASHION_MNIST_DIR),
                    reason=f"{FASHION_MNIST_DIR} absent (apt-get install dataset-fashion-mnist)")
def test_real_fashion_mnist_idx_files():
    source = data.load_source("idx")  # the default data_dir is Debian's folder
    assert (source.num_train, source.num_examples("test"), source.num_classes) == (60000, 10000, 10)
    assert source.split("train").images.shape == (60000, 28, 28, 1)
    assert np.bincount(source.split("test").labels).tolist() == [1000] * 10
    batch = next(data.pretrain_batches(source, global_batch=16, image_size=32, seed=0,
                                       process_index=0, process_count=1, local_device_count=8))
    assert batch["view_a"].shape == (8, 2, 32, 32, 3) and (batch["label"] >= 0).all()
    images, labels = next(data.eval_batches(source, split="test", batch_size=32, image_size=28))
    assert images.shape == (32, 28, 28, 3)
    np.testing.assert_array_equal(labels, source.split("test").labels[:32])


def test_tfds_source_through_mock_data():
    import tensorflow_datasets as tfds

    with tfds.testing.mock_data(num_examples=24):
        source = data.load_source("cifar10")
        assert source.num_classes == 10 and source.num_train == 24
        out = list(data.pretrain_batches(source, global_batch=8, image_size=16, seed=0,
                                         process_index=0, process_count=1,
                                         local_device_count=8, num_epochs=1))
        assert len(out) == 3 and out[0]["view_b"].shape == (8, 1, 16, 16, 3)
        images, labels = next(data.eval_batches(source, split="test", batch_size=24, image_size=16))
        assert images.shape == (24, 16, 16, 3) and labels.dtype == np.int32
        # Variable-size images (imagenet2012) stay encoded in memory, decoded per access.
        imagenet = data.load_source("imagenet2012")
        assert imagenet.split("train").encoded
        batch = next(data.pretrain_batches(imagenet, global_batch=8, image_size=16, seed=0,
                                           process_index=0, process_count=1, local_device_count=8))
        assert batch["view_a"].shape == (8, 1, 16, 16, 3)


def test_prepared_tfds_array_record_and_tfrecord_give_the_same_batches(tmp_path):
    # Building a tfds dataset offline (tfds's DummyMnist) needs importlib_resources, which
    # tensorflow-datasets does not install on Python >= 3.11.
    pytest.importorskip("importlib_resources", reason="tfds needs importlib_resources to build "
                        "a dataset (pip install importlib_resources)")
    from tensorflow_datasets.testing import test_utils

    out = {}
    for file_format in ("array_record", "tfrecord"):
        data_dir = str(tmp_path / file_format)
        test_utils.DummyMnist(data_dir=data_dir, file_format=file_format).download_and_prepare()
        source = data.load_source("dummy_mnist", data_dir)
        assert source.split("train").encoded == (file_format == "array_record")  # random access
        out[file_format] = next(data.pretrain_batches(
            source, global_batch=8, image_size=16, seed=0, process_index=0, process_count=1,
            local_device_count=8))
    assert same(out["array_record"], out["tfrecord"])  # PNG bytes decode to the same pixels


def test_random_access_data_source_split():
    # What tfds.data_source gives for array_record datasets: __len__, __getitems__, dicts of bytes.
    class FakeDataSource(list):
        def __getitems__(self, keys):
            return [self[k] for k in keys]

    rng = np.random.default_rng(0)
    records = [{"image": tf.io.encode_jpeg(rng.integers(0, 256, (20, 20, 3), dtype=np.uint8)).numpy(),
                "label": i % 4} for i in range(16)]
    split = sources.Split(None, None, data_source=FakeDataSource(records))
    source = sources.Source("fake", 4, {"pretrain": lambda: split, "train": lambda: split,
                                        "test": lambda: split})
    batch = next(data.pretrain_batches(source, global_batch=8, image_size=16, seed=0,
                                       process_index=0, process_count=1, local_device_count=8,
                                       with_index=True))
    np.testing.assert_array_equal(batch["label"], batch["index"] % 4)
    images, labels = next(data.eval_batches(source, split="test", batch_size=16, image_size=16))
    assert images.shape == (16, 16, 16, 3) and labels.tolist() == [i % 4 for i in range(16)]


# ----------------------------------------------------------------------------- bad input


def test_unknown_dataset_lists_known_sources():
    with pytest.raises(ValueError, match=r"digits.*idx.*folder.*cifar10") as info:
        data.load_source("cifar1O")
    assert "Did you mean" in str(info.value)


def test_tfds_not_prepared_says_what_to_do(tmp_path):
    with pytest.raises(data.DataNotPreparedError, match=r"tfds build cifar10 --data_dir"):
        data.load_source("cifar10", str(tmp_path))
    with pytest.raises(data.DataNotPreparedError, match=r"(?s)downloads/manual.*ILSVRC2012_img_train"):
        data.load_source("imagenet2012", str(tmp_path))


def test_idx_missing_says_what_to_do(tmp_path):
    with pytest.raises(data.DataNotPreparedError, match="apt-get install dataset-fashion-mnist"):
        data.load_source("idx", str(tmp_path / "nowhere"))
    with pytest.raises(data.DataNotPreparedError, match="train_images"):
        data.load_source("idx", str(tmp_path))


def test_batch_size_errors_come_before_anything_is_built(small, monkeypatch):
    def fail(*args, **kwargs):
        raise AssertionError("pipeline built before the batch size was checked")

    monkeypatch.setattr(data.input_pipeline, "pretrain_dataset", fail)
    with pytest.raises(ValueError, match=r"12 is not divisible by the number of devices 8"):
        data.pretrain_batches(small, global_batch=12, image_size=16, seed=0,
                              process_index=0, process_count=1, local_device_count=8)
    with pytest.raises(ValueError, match=r"16 .*2 process\(es\) x 8"):
        data.pretrain_batches(small, global_batch=24, image_size=16, seed=0,
                              process_index=0, process_count=2, local_device_count=8)
    with pytest.raises(ValueError, match=r"64 is larger than the 40 training examples"):
        data.pretrain_batches(small, global_batch=64, image_size=16, seed=0,
                              process_index=0, process_count=1, local_device_count=8)


def test_preview_writes_a_picture(tmp_path):
    from bt_jax.data import preview

    out = tmp_path / "views.png"
    assert preview.main(["--dataset", "digits", "--out", str(out), "--num", "2",
                         "--image_size", "16"]) == 0
    assert out.stat().st_size > 1000
    triples = preview.preview_triples(data.load_source("digits"), num=2, image_size=16)
    assert triples.shape == (2, 3, 16, 16, 3) and 0.0 <= triples.min() <= triples.max() <= 1.0
