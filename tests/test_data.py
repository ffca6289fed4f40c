"""bt_jax.data: sources, determinism, exact resume, per-process shares, evaluation and labelled
batches, bad input and its one-line errors."""

import gzip
import os
import subprocess
import sys
import warnings

import numpy as np
import pytest

from bt_jax import data, errors
from bt_jax.data import sources
from bt_jax.data.tf_runtime import tf

FASHION_MNIST_DIR = "/usr/share/datasets/fashion-mnist"
REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def take(iterator, n):
    return [next(iterator) for _ in range(n)]


@pytest.fixture(scope="module")
def digits():
    return data.load_source("digits")


@pytest.fixture(scope="module")
def small(digits):
    """40 train / 10 test digits: cheap epochs (global batch 16 -> 2 steps per epoch, 8 dropped)."""
    train, test = digits.split("train"), digits.split("test")
    return data.from_arrays(
        "small",
        train.images[:40],
        train.labels[:40],
        test.images[:10],
        test.labels[:10],
        num_classes=10,
    )


def batches(source, n, **kw):
    args = dict(global_batch=16, image_size=16, seed=0, process_index=0, process_count=1)
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
    and view B with blur and solarize always on differs from the default view B, view A not."""
    import dataclasses

    default = batches(small, 1)[0]
    official = batches(small, 1, views=data.VIEWS)[0]
    assert same(default, official)
    always_b = dict(
        data.VIEWS, b=dataclasses.replace(data.VIEWS["b"], blur_prob=1.0, solarize_prob=1.0)
    )
    changed = batches(small, 1, views=always_b)[0]
    assert np.array_equal(changed["view_a"], default["view_a"])
    assert not np.array_equal(changed["view_b"], default["view_b"])
    with pytest.raises(data.DataError, match="views must map 'a' and 'b'"):
        batches(small, 1, views={"a": data.VIEWS["a"]})
    with pytest.raises(data.DataError, match=r"views\['b'\].blur_prob must be a probability"):
        batches(small, 1, views=dict(data.VIEWS, b=data.ViewSpec(blur_prob=1.5)))


def test_different_seed_differs(small):
    a, b = batches(small, 1)[0], batches(small, 1, seed=1)[0]
    assert not np.array_equal(a["view_a"], b["view_a"])


def test_restart_at_step_equals_uninterrupted_stream(small):
    # 2 steps per epoch: steps 3 and 4 lie in epochs 1 and 2, reached without replaying anything.
    for mode in ("host", "device"):
        stream = batches(small, 5, photometric=mode)
        resumed = batches(small, 2, start_step=3, photometric=mode)
        assert same(stream[3], resumed[0]) and same(stream[4], resumed[1])
        assert stream[3]["epoch"].tolist() == [1] * 16 and stream[4]["epoch"].tolist() == [2] * 16


def test_epochs_reshuffle_and_drop_the_last_incomplete_batch(small):
    stream = batches(small, 4)
    epoch0 = np.concatenate([b["index"] for b in stream[:2]])
    epoch1 = np.concatenate([b["index"] for b in stream[2:]])
    assert len(set(epoch0)) == 32 and len(set(epoch1)) == 32  # 40 // 16 * 16, no repeats
    assert not np.array_equal(epoch0, epoch1)
    np.testing.assert_array_equal(epoch0, data.epoch_permutation(0, 0, 40)[:32])
    assert data.steps_per_epoch(small, 16) == 2
    finite = list(
        data.pretrain_batches(
            small,
            global_batch=16,
            image_size=16,
            seed=0,
            process_index=0,
            process_count=1,
            num_epochs=2,
        )
    )
    assert len(finite) == 4


def test_flat_uint8_batches_with_labels_indices_and_epochs(small):
    for mode in ("host", "device"):
        batch = batches(small, 1, photometric=mode)[0]
        assert batch["view_a"].shape == batch["view_b"].shape == (16, 16, 16, 3)
        assert batch["view_a"].dtype == batch["view_b"].dtype == np.uint8
        for key in ("label", "index", "epoch"):
            assert batch[key].shape == (16,) and batch[key].dtype == np.int32
        labels = small.split("pretrain").labels
        np.testing.assert_array_equal(batch["label"], labels[batch["index"]])
        assert not np.array_equal(batch["view_a"], batch["view_b"])


def test_device_mode_sends_the_host_part_of_the_same_views(small):
    """photometric="device" yields the crops, flips and resizes of host mode: with every
    photometric probability at zero, host mode gives the same bytes."""
    none = data.ViewSpec(jitter_prob=0.0, grayscale_prob=0.0, blur_prob=0.0, solarize_prob=0.0)
    host = batches(small, 2, views={"a": none, "b": none})
    device = batches(small, 2, photometric="device")
    assert all(same(h, d) for h, d in zip(host, device))
    with pytest.raises(data.DataError, match="photometric must be one of"):
        batches(small, 1, photometric="gpu")


def test_two_processes_read_disjoint_shares_covering_the_epoch(small):
    kw = dict(global_batch=8, image_size=16, seed=3, process_count=2, num_epochs=1)
    shares = [list(data.pretrain_batches(small, process_index=p, **kw)) for p in (0, 1)]
    assert len(shares[0]) == len(shares[1]) == 5
    assert shares[0][0]["view_a"].shape == (4, 16, 16, 3)
    index = [np.concatenate([b["index"] for b in s]) for s in shares]
    assert not set(index[0]) & set(index[1])
    assert len(set(index[0]) | set(index[1])) == 40  # 40 // 8 * 8: the whole split
    # The global batch does not depend on the topology: 2 processes == 1 process, row for row.
    single = next(
        data.pretrain_batches(
            small, global_batch=8, image_size=16, seed=3, process_index=0, process_count=1
        )
    )
    for key in single:
        joined = np.concatenate([shares[0][0][key], shares[1][0][key]])
        assert joined.tobytes() == single[key].tobytes(), key


def test_check_batch_size_is_pure_and_says_what_to_do():
    assert data.check_batch_size(256, 1500, 8) == 32
    with pytest.raises(data.DataError, match=r"12 is not divisible by the number of devices 8"):
        data.check_batch_size(12, 1500, 8)
    with pytest.raises(data.DataError, match=r"4096 is larger than the 1500 training examples"):
        data.check_batch_size(4096, 1500, 8)


def test_batch_size_errors_come_before_anything_is_built(small, monkeypatch):
    def fail(*args, **kwargs):
        raise AssertionError("pipeline built before the arguments were checked")

    monkeypatch.setattr(data.input_pipeline, "_stream_batches", fail)
    with pytest.raises(data.DataError, match=r"batch size 12 is not divisible by the 8 processes"):
        data.pretrain_batches(
            small, global_batch=12, image_size=16, seed=0, process_index=0, process_count=8
        )
    with pytest.raises(data.DataError, match=r"batch size 64 is larger than the 40 examples"):
        data.pretrain_batches(
            small, global_batch=64, image_size=16, seed=0, process_index=0, process_count=1
        )
    with pytest.raises(data.DataError, match=r"process_index 2 is not in \[0, process_count=2\)"):
        data.pretrain_batches(
            small, global_batch=8, image_size=16, seed=0, process_index=2, process_count=2
        )
    with pytest.raises(data.DataError, match="image_size must be at least 8"):
        data.pretrain_batches(
            small, global_batch=8, image_size=6, seed=0, process_index=0, process_count=1
        )


# ----------------------------------------------------------------------------- labelled


def test_labelled_batches_are_an_index_stream_over_the_subset(digits):
    subset = np.arange(0, 1500, 7)  # 215 examples: 6 batches of 32 per epoch, 23 dropped
    kw = dict(batch_size=32, image_size=16, seed=2, num_epochs=2)
    out = list(data.labelled_batches(digits, subset, **kw))
    assert len(out) == 12
    assert out[0]["image"].shape == (32, 16, 16, 3) and out[0]["image"].dtype == np.uint8
    order = subset[np.random.default_rng([2, 1]).permutation(len(subset))]
    np.testing.assert_array_equal(out[6]["label"], digits.split("train").labels[order[:32]])
    # The semantics of evaluate's crop + flip views: view A's seed salted, CROP_FLIP.
    from bt_jax.data import augment

    image = digits.split("train").images[order[0]]
    expected = augment.augment_view(
        tf.constant(image),
        augment.labelled_seed(2, 1, order[0]),
        view=data.CROP_FLIP,
        image_size=16,
    )
    np.testing.assert_array_equal(out[6]["image"][0], expected)
    # Two processes: each its rows of every global batch, together the single-process batch.
    shares = [
        next(data.labelled_batches(digits, subset, process_index=p, process_count=2, **kw))
        for p in (0, 1)
    ]
    for key in ("image", "label"):
        assert np.concatenate([s[key] for s in shares]).tobytes() == out[0][key].tobytes()
    with pytest.raises(data.DataError, match="batch size 512 is larger than the 215 examples"):
        data.labelled_batches(digits, subset, batch_size=512, image_size=16, seed=0, num_epochs=1)


# ----------------------------------------------------------------------------- evaluation


def test_eval_batches_all_examples_in_order(digits):
    out = list(data.eval_batches(digits, split="test", batch_size=128, image_size=16))
    assert len(out) == 3 and [b["mask"].sum() for b in out] == [128, 128, 41]
    assert out[0]["image"].shape == (128, 16, 16, 3) and out[0]["image"].dtype == np.uint8
    labels = np.concatenate([b["label"][b["mask"]] for b in out])
    np.testing.assert_array_equal(labels, digits.split("test").labels)
    assert (out[2]["label"][41:] == -1).all() and (out[2]["image"][41:] == 0).all()
    again = next(data.eval_batches(digits, split="test", batch_size=128, image_size=16))
    assert again["image"].tobytes() == out[0]["image"].tobytes()


def test_eval_batches_sharded_over_processes_gather_to_the_dataset_order(digits):
    whole = list(data.eval_batches(digits, split="test", batch_size=96, image_size=16))
    shares = [
        list(
            data.eval_batches(
                digits, split="test", batch_size=96, image_size=16, process_index=p, process_count=3
            )
        )
        for p in range(3)
    ]
    assert [len(s) for s in shares] == [4, 4, 4]  # ceil(297 / 96) on every process
    assert shares[2][3]["mask"].sum() == 0  # rows 352..383 of the last batch: all padding
    for k in range(4):
        for key in ("image", "label", "mask"):
            gathered = np.concatenate([s[k][key] for s in shares])
            assert gathered.tobytes() == whole[k][key].tobytes(), (k, key)
    with pytest.raises(data.DataError, match="multiple of the 3 processes"):
        data.eval_batches(digits, split="test", batch_size=100, image_size=16, process_count=3)


def test_digits_split_is_fixed(digits):
    assert digits.num_train == 1500 and digits.num_examples("test") == 297
    assert digits.num_classes == 10
    assert digits.split("train").images.shape == (1500, 8, 8, 1)
    assert digits.split("train").images.max() == 255


def test_digits_are_scikit_learns_read_without_importing_it():
    from sklearn.datasets import load_digits

    pixels, labels = sources._digits_arrays()
    digits = load_digits()
    np.testing.assert_array_equal(pixels, digits.images)
    np.testing.assert_array_equal(labels, digits.target)
    # A fresh process loads the digits without importing scikit-learn (~0.8 s of start-up).
    code = "import sys; from bt_jax import data; data.load_source('digits').split('train'); "
    code += "print('sklearn' in sys.modules)"
    env = {**os.environ, "PYTHONPATH": REPO}
    result = subprocess.run(
        [sys.executable, "-c", code], cwd=REPO, env=env, capture_output=True, text=True, timeout=240
    )
    assert result.returncode == 0, result.stderr[-3000:]
    assert result.stdout.strip() == "False"


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
    for mode in ("host", "device"):
        batch = next(
            data.pretrain_batches(
                source,
                global_batch=8,
                image_size=16,
                seed=0,
                photometric=mode,
                process_index=0,
                process_count=1,
            )
        )
        assert batch["view_a"].shape == (8, 16, 16, 3)
    batch = next(data.eval_batches(source, split="train", batch_size=64, image_size=16))
    assert batch["image"].shape == (64, 16, 16, 3) and batch["mask"].sum() == source.num_train


def test_folder_follows_linked_class_folders(tmp_path):
    write_images(tmp_path / "elsewhere" / "birds", 3)
    os.makedirs(tmp_path / "root")
    write_images(tmp_path / "root" / "cats", 3)
    os.symlink(tmp_path / "elsewhere" / "birds", tmp_path / "root" / "birds")
    source = data.load_source("folder", str(tmp_path / "root"))
    assert source.num_classes == 2
    assert source.num_train + source.num_examples("test") == 6


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


def test_folder_errors_say_what_to_do(tmp_path):
    with pytest.raises(data.DataError, match="no image files .* under") as info:
        data.load_source("folder", str(tmp_path))
    assert isinstance(info.value, errors.Error)
    (tmp_path / "notes.txt").write_text("hello")
    with pytest.raises(data.DataError, match="no image files"):
        data.load_source("folder", str(tmp_path))
    (tmp_path / "bad.png").write_bytes(b"garbage")
    with pytest.warns(UserWarning), pytest.raises(data.DataError, match="could be decoded"):
        data.load_source("folder", str(tmp_path))
    with pytest.raises(data.DataNotPreparedError, match="is not a directory") as info:
        data.load_source("folder", str(tmp_path / "missing"))
    assert isinstance(info.value, FileNotFoundError)
    with pytest.raises(data.DataError, match="needs data_dir"):
        data.load_source("folder")


def idx_bytes(array, code=8):
    header = bytes([0, 0, code, array.ndim]) + np.array(array.shape, ">i4").tobytes()
    return header + array.tobytes()


def write_idx_dir(folder, train_images, gzip_images=True):
    folder.mkdir(exist_ok=True)
    images = idx_bytes(train_images)
    (folder / ("train-images-idx3-ubyte" + (".gz" if gzip_images else ""))).write_bytes(
        gzip.compress(images) if gzip_images else images
    )
    (folder / "train-labels-idx1-ubyte").write_bytes(
        idx_bytes(np.arange(len(train_images), dtype=np.uint8) % 3)
    )
    (folder / "t10k-images-idx3-ubyte").write_bytes(idx_bytes(train_images[:5]))
    (folder / "t10k-labels-idx1-ubyte.gz").write_bytes(
        gzip.compress(idx_bytes(np.zeros(5, np.uint8)))
    )


def test_idx_files_gzipped_and_raw(tmp_path):
    train = np.random.default_rng(0).integers(0, 256, (20, 12, 12), dtype=np.uint8)
    write_idx_dir(tmp_path, train)
    source = data.load_source("idx", str(tmp_path))
    assert (source.num_train, source.num_examples("test"), source.num_classes) == (20, 5, 3)
    np.testing.assert_array_equal(source.split("train").images[..., 0], train)
    batch = next(
        data.pretrain_batches(
            source, global_batch=8, image_size=16, seed=0, process_index=0, process_count=1
        )
    )
    assert batch["view_a"].shape == (8, 16, 16, 3)


def test_truncated_idx_and_gzip_name_the_file(tmp_path):
    train = np.random.default_rng(0).integers(0, 256, (20, 12, 12), dtype=np.uint8)
    write_idx_dir(tmp_path / "gz", train)
    path = tmp_path / "gz" / "train-images-idx3-ubyte.gz"
    path.write_bytes(path.read_bytes()[:-30])  # a real truncated download
    with pytest.raises(
        data.DataError,
        match=r"train-images-idx3-ubyte.gz: the gzip file is "
        r"truncated or corrupt",
    ):
        data.load_source("idx", str(tmp_path / "gz"))
    write_idx_dir(tmp_path / "raw", train, gzip_images=False)
    path = tmp_path / "raw" / "train-images-idx3-ubyte"
    path.write_bytes(path.read_bytes()[:-100])
    with pytest.raises(
        data.DataError,
        match=r"train-images-idx3-ubyte: the IDX header says "
        r"shape \(20, 12, 12\) but the file holds 2780",
    ):
        data.load_source("idx", str(tmp_path / "raw"))


@pytest.mark.skipif(
    not os.path.isdir(FASHION_MNIST_DIR),
    reason=f"{FASHION_MNIST_DIR} absent (apt-get install dataset-fashion-mnist)",
)
def test_real_fashion_mnist_idx_files():
    source = data.load_source("idx")  # the default data_dir is Debian's folder
    assert (source.num_train, source.num_examples("test"), source.num_classes) == (60000, 10000, 10)
    assert source.split("train").images.shape == (60000, 28, 28, 1)
    assert np.bincount(source.split("test").labels).tolist() == [1000] * 10
    batch = next(
        data.pretrain_batches(
            source, global_batch=16, image_size=32, seed=0, process_index=0, process_count=1
        )
    )
    assert batch["view_a"].shape == (16, 32, 32, 3) and (batch["label"] >= 0).all()
    batch = next(data.eval_batches(source, split="test", batch_size=32, image_size=28))
    assert batch["image"].shape == (32, 28, 28, 3)
    np.testing.assert_array_equal(batch["label"], source.split("test").labels[:32])


def test_tfds_source_through_mock_data():
    import tensorflow_datasets as tfds

    with tfds.testing.mock_data(num_examples=24):
        source = data.load_source("cifar10")
        assert source.num_classes == 10 and source.num_train == 24
        out = list(
            data.pretrain_batches(
                source,
                global_batch=8,
                image_size=16,
                seed=0,
                process_index=0,
                process_count=1,
                num_epochs=1,
            )
        )
        assert len(out) == 3 and out[0]["view_b"].shape == (8, 16, 16, 3)
        batch = next(data.eval_batches(source, split="test", batch_size=24, image_size=16))
        assert batch["image"].shape == (24, 16, 16, 3) and batch["label"].dtype == np.int32
        # Variable-size images (imagenet2012) stay encoded in memory, decoded per access.
        imagenet = data.load_source("imagenet2012")
        assert imagenet.split("train").encoded
        batch = next(
            data.pretrain_batches(
                imagenet, global_batch=8, image_size=16, seed=0, process_index=0, process_count=1
            )
        )
        assert batch["view_a"].shape == (8, 16, 16, 3)


def test_prepared_tfds_array_record_and_tfrecord_give_the_same_batches(tmp_path):
    # Building a tfds dataset offline (tfds's DummyMnist) needs importlib_resources, which
    # tensorflow-datasets does not install on Python >= 3.11.
    pytest.importorskip(
        "importlib_resources",
        reason="tfds needs importlib_resources to build "
        "a dataset (pip install importlib_resources)",
    )
    from tensorflow_datasets.testing import test_utils

    out = {}
    for file_format in ("array_record", "tfrecord"):
        data_dir = str(tmp_path / file_format)
        test_utils.DummyMnist(data_dir=data_dir, file_format=file_format).download_and_prepare()
        source = data.load_source("dummy_mnist", data_dir)
        assert source.split("train").encoded == (file_format == "array_record")  # random access
        out[file_format] = next(
            data.pretrain_batches(
                source, global_batch=8, image_size=16, seed=0, process_index=0, process_count=1
            )
        )
    assert same(out["array_record"], out["tfrecord"])  # PNG bytes decode to the same pixels


def test_random_access_data_source_split():
    # What tfds.data_source gives for array_record datasets: __len__, __getitems__, dicts of bytes.
    class FakeDataSource(list):
        def __getitems__(self, keys):
            return [self[k] for k in keys]

    rng = np.random.default_rng(0)
    records = [
        {
            "image": tf.io.encode_jpeg(rng.integers(0, 256, (20, 20, 3), dtype=np.uint8)).numpy(),
            "label": i % 4,
        }
        for i in range(16)
    ]
    split = sources.Split(None, None, data_source=FakeDataSource(records))
    source = sources.Source(
        "fake", 4, {"pretrain": lambda: split, "train": lambda: split, "test": lambda: split}
    )
    batch = next(
        data.pretrain_batches(
            source, global_batch=8, image_size=16, seed=0, process_index=0, process_count=1
        )
    )
    np.testing.assert_array_equal(batch["label"], batch["index"] % 4)
    batch = next(data.eval_batches(source, split="test", batch_size=16, image_size=16))
    assert batch["image"].shape == (16, 16, 16, 3)
    assert batch["label"].tolist() == [i % 4 for i in range(16)]


# ----------------------------------------------------------------------------- bad input


def test_unknown_dataset_lists_known_sources_and_the_closest_names():
    with pytest.raises(data.DataError, match=r"digits.*idx.*folder.*cifar10") as info:
        data.load_source("cifar1O")
    assert "Did you mean 'cifar10'" in str(info.value)
    with pytest.raises(data.DataError, match=r"Did you mean 'cifar10'") as info:
        data.load_source("cifar_ten")
    assert isinstance(info.value, ValueError)  # what callers caught before DataError


def test_tfds_not_prepared_says_what_to_do(tmp_path):
    with pytest.raises(data.DataNotPreparedError, match=r"tfds build cifar10 --data_dir"):
        data.load_source("cifar10", str(tmp_path))
    with pytest.raises(
        data.DataNotPreparedError, match=r"(?s)downloads/manual.*ILSVRC2012_img_train"
    ):
        data.load_source("imagenet2012", str(tmp_path))


def test_idx_missing_says_what_to_do(tmp_path):
    with pytest.raises(data.DataNotPreparedError, match="apt-get install dataset-fashion-mnist"):
        data.load_source("idx", str(tmp_path / "nowhere"))
    with pytest.raises(data.DataNotPreparedError, match="train_images"):
        data.load_source("idx", str(tmp_path))


def test_digits_refuses_a_data_dir(tmp_path):
    with pytest.raises(data.DataError, match="digits source is embedded in scikit-learn"):
        data.load_source("digits", str(tmp_path))


def test_preview_writes_a_picture(tmp_path):
    from bt_jax.data import preview

    out = tmp_path / "views.png"
    assert (
        preview.main(["--dataset", "digits", "--out", str(out), "--num", "2", "--image_size", "16"])
        == 0
    )
    assert out.stat().st_size > 1000
    triples = preview.preview_triples(data.load_source("digits"), num=2, image_size=16)
    assert triples.shape == (2, 3, 16, 16, 3) and triples.dtype == np.uint8


def preview_cli(*args, cwd=REPO):
    env = dict(os.environ, TF_CPP_MIN_LOG_LEVEL="3", JAX_PLATFORMS="cpu")
    env.pop("BT_JAX_VERBOSE", None)
    return subprocess.run(
        [sys.executable, "-m", "bt_jax.data.preview", *args],
        cwd=cwd,
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )


def corrupt_cases(tmp_path):
    """(arguments, expected message) of each data problem, each made real on disk."""
    train = np.random.default_rng(0).integers(0, 256, (20, 12, 12), dtype=np.uint8)
    write_idx_dir(tmp_path / "gz", train)
    gz = tmp_path / "gz" / "train-images-idx3-ubyte.gz"
    gz.write_bytes(gz.read_bytes()[:-30])
    write_idx_dir(tmp_path / "raw", train, gzip_images=False)
    raw = tmp_path / "raw" / "train-images-idx3-ubyte"
    raw.write_bytes(raw.read_bytes()[:-100])
    (tmp_path / "empty").mkdir()
    (tmp_path / "undecodable").mkdir()
    (tmp_path / "undecodable" / "a.jpg").write_bytes(b"\xff\xd8\xff\xe0 not a jpeg")
    return {
        "idx missing": (
            ["--dataset", "idx", "--data_dir", str(tmp_path / "nowhere")],
            "IDX source: directory .*nowhere.* does not exist. Install Debian's",
        ),
        "folder missing": (
            ["--dataset", "folder", "--data_dir", str(tmp_path / "nowhere")],
            "folder source: .*nowhere.* is not a directory",
        ),
        "folder empty": (
            ["--dataset", "folder", "--data_dir", str(tmp_path / "empty")],
            "folder source: no image files",
        ),
        "folder undecodable": (
            ["--dataset", "folder", "--data_dir", str(tmp_path / "undecodable")],
            "none of the 1 image files .* could be decoded .*a.jpg",
        ),
        "idx truncated gzip": (
            ["--dataset", "idx", "--data_dir", str(tmp_path / "gz")],
            "train-images-idx3-ubyte.gz: the gzip file is truncated",
        ),
        "idx truncated": (
            ["--dataset", "idx", "--data_dir", str(tmp_path / "raw")],
            "train-images-idx3-ubyte: the IDX header says shape",
        ),
        "digits data_dir": (
            ["--dataset", "digits", "--data_dir", str(tmp_path)],
            "digits source is embedded in scikit-learn",
        ),
        "unknown tfds name": (
            ["--dataset", "cifar_ten"],
            "unknown dataset 'cifar_ten'.*Did you mean 'cifar10'",
        ),
        "tfds not prepared": (
            ["--dataset", "cifar10", "--data_dir", str(tmp_path / "tfds")],
            "tfds dataset 'cifar10' is not prepared in .*tfds",
        ),
        "bad image size": (
            ["--dataset", "digits", "--image_size", "4"],
            "image_size must be at least 8",
        ),
    }


CASES = [
    "idx missing",
    "folder missing",
    "folder empty",
    "folder undecodable",
    "idx truncated gzip",
    "idx truncated",
    "digits data_dir",
    "unknown tfds name",
    "tfds not prepared",
    "bad image size",
]


@pytest.mark.parametrize("case", CASES)
def test_preview_cli_reports_data_errors_in_one_line(tmp_path, case):
    import re

    args, message = corrupt_cases(tmp_path)[case]
    result = preview_cli(*args, "--out", str(tmp_path / "views.png"))
    assert result.returncode == 1, result.stderr[-2000:]
    assert "Traceback" not in result.stderr
    lines = [line for line in result.stderr.splitlines() if line.startswith("error:")]
    assert len(lines) == 1 and re.search(message, lines[0]), result.stderr[-2000:]
    assert not (tmp_path / "views.png").exists()


def test_a_process_with_open_pipelines_exits():
    """Open pipelines are closed before Python finalises: a tf.data thread in the numpy hop
    cannot take the GIL after that, and exit would wait for it forever (half the runs did)."""
    code = """
from bt_jax import data
source = data.load_source("digits")
pipelines = [data.pretrain_batches(source, global_batch=16, image_size=16, seed=s,
                                   process_index=0, process_count=1) for s in range(3)]
pipelines.append(data.eval_batches(source, split="test", batch_size=32, image_size=16))
for pipeline in pipelines:
    next(pipeline)
print("ok", flush=True)
"""
    env = dict(os.environ, TF_CPP_MIN_LOG_LEVEL="3", JAX_PLATFORMS="cpu")
    result = subprocess.run(
        [sys.executable, "-c", code], cwd=REPO, env=env, capture_output=True, text=True, timeout=240
    )
    assert result.returncode == 0 and result.stdout.strip() == "ok", result.stderr[-2000:]
