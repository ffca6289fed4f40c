"""Round trips through a real object store: fake-gcs-server, started by tests/gcs_emulator.py.

Each test writes through one client and reads back through a real request (often through
another client or process). etils.epath reads ``EPATH_USE_TF`` once per process, so this process
uses its default, TensorFlow's GCS client (through tests/gcs_tls_proxy.py), and the gcsfs backend
is exercised in subprocesses started with ``EPATH_USE_TF=false``.
"""

from __future__ import annotations

import json
import os
import pathlib
import signal
import subprocess
import sys
import textwrap
import time
import urllib.request

import flax.serialization
import jax
import jax.numpy as jnp
import numpy as np
import orbax.checkpoint as ocp
import pytest
import tensorflow as tf
import tensorflow_datasets as tfds
from epath_round_trip import check_epath_round_trip
from etils import epath
from gcs_emulator import GcsEmulator
from tensorboard.backend.event_processing import event_accumulator
from tensorboard.util import tensor_util

TESTS_DIR = os.path.dirname(os.path.abspath(__file__))


def object_names(emulator: GcsEmulator, prefix: epath.Path) -> list[str]:
    """The bucket's object names under prefix, from the JSON API: no client, no cache."""
    key = str(prefix).removeprefix(f"gs://{emulator.bucket}/")
    with urllib.request.urlopen(
        f"{emulator.url}/storage/v1/b/{emulator.bucket}/o?prefix={key}/"
    ) as response:
        return sorted(
            item["name"].removeprefix(f"{key}/") for item in json.load(response).get("items", [])
        )


def upload(emulator: GcsEmulator, path: epath.Path, data: bytes) -> None:
    """Writes an object with the JSON API's simple upload: another writer, no client cache."""
    key = str(path).removeprefix(f"gs://{emulator.bucket}/")
    request = urllib.request.Request(
        f"{emulator.url}/upload/storage/v1/b/{emulator.bucket}/o?uploadType=media&name={key}",
        data=data,
        method="POST",
    )
    urllib.request.urlopen(request).close()


def run_python(
    code: str, *args: str, env: dict[str, str | None] | None = None
) -> subprocess.CompletedProcess:
    """``code`` in a fresh interpreter; ``env`` entries set (or, when None, remove) variables."""
    environment = dict(os.environ)
    for key, value in (env or {}).items():
        if value is None:
            environment.pop(key, None)
        else:
            environment[key] = value
    return subprocess.run(
        [sys.executable, "-c", textwrap.dedent(code), *args],
        cwd=TESTS_DIR,
        env=environment,
        capture_output=True,
        text=True,
        timeout=300,
    )


def test_environment_points_every_client_at_the_emulator(gcs_emulator):
    for key, value in gcs_emulator.env.items():
        assert os.environ[key] == value, key
    with urllib.request.urlopen(f"{gcs_emulator.url}/storage/v1/b") as response:
        assert gcs_emulator.bucket in [b["name"] for b in json.load(response)["items"]]


def _answers(url: str) -> bool:
    try:
        with urllib.request.urlopen(f"{url}/storage/v1/b", timeout=1):
            return True
    except OSError:
        return False


def test_a_killed_owner_leaves_no_emulator_behind(gcs_emulator):
    result = run_python("""
        import os, signal
        from gcs_emulator import running_emulator
        with running_emulator() as emulator:
            print(emulator.url, emulator.proxy_url, flush=True)
            os.kill(os.getpid(), signal.SIGKILL)
    """)
    assert result.returncode == -signal.SIGKILL, result.stderr[-3000:]
    url, proxy_url = result.stdout.split()
    deadline = time.monotonic() + 10
    while (_answers(url) or _answers(proxy_url)) and time.monotonic() < deadline:
        time.sleep(0.05)
    assert not _answers(url) and not _answers(proxy_url)


def test_epath_round_trip_through_tensorflow_gfile(gcs_emulator, gcs_dir):
    """Not here: renaming a directory. TF first asks for the bucket's storageLayout (a JSON API
    call that fake-gcs-server 1.54 answers 404), then fails; gcsfs copies and deletes."""
    assert type(gcs_dir._backend).__name__ == "_TfBackend"  # epath's default with TF installed
    check_epath_round_trip(gcs_dir, mkdir_writes_a_marker=True)


def test_epath_round_trip_through_gcsfs_in_a_subprocess(gcs_emulator, gcs_dir):
    result = run_python(
        """
        import sys
        from etils import epath
        from epath_round_trip import check_epath_round_trip
        root = epath.Path(sys.argv[1])
        assert type(root._backend).__name__ == "_FileSystemSpecBackend"
        check_epath_round_trip(root, mkdir_writes_a_marker=False)
        (root / "ckpt" / "1" / "x").write_text("x")
        (root / "ckpt").rename(root / "ckpt_old")
        assert (root / "ckpt_old" / "1" / "x").read_text() == "x"
        assert not (root / "ckpt").exists()
        (root / "from_gcsfs.txt").write_text("written by gcsfs")
    """,
        os.fspath(gcs_dir),
        env={"EPATH_USE_TF": "false"},
    )
    assert result.returncode == 0, result.stderr[-3000:]
    assert (gcs_dir / "from_gcsfs.txt").read_text() == "written by gcsfs"  # read by TF here


def test_an_object_appears_whole_when_its_writer_closes(gcs_emulator, gcs_dir):
    """No rename is needed for an atomic replace: readers see the old object until close, as
    long as the writer does not flush: TF's GCS writer uploads everything so far at flush()."""
    path = gcs_dir / "config.json"
    path.write_text("old")
    with path.open("w") as f:
        f.write("new" * 100_000)
        assert path.read_text() == "old"
        f.flush()
        assert path.read_text() == "new" * 100_000
        f.write("!")
    assert path.read_text() == "new" * 100_000 + "!"


def test_a_writer_killed_before_close_leaves_the_old_object(gcs_emulator, gcs_dir):
    path = gcs_dir / "config.json"
    path.write_text("old")
    result = run_python(
        """
        import os, signal, sys
        from etils import epath
        f = epath.Path(sys.argv[1]).open("w").__enter__()
        f.write("half of the new" * 100_000)
        os.kill(os.getpid(), signal.SIGKILL)
    """,
        os.fspath(path),
    )
    assert result.returncode == -signal.SIGKILL, result.stderr[-3000:]
    assert object_names(gcs_emulator, gcs_dir) == ["config.json"]
    assert path.read_text() == "old"


def test_gcsfs_listings_cache_misses_other_processes_unless_disabled(gcs_emulator, gcs_dir):
    """gcsfs caches directory listings per process, so by default it does not see objects that
    another process wrote after it listed; ``use_listings_cache=False`` (in an environment:
    FSSPEC_GCS_USE_LISTINGS_CACHE=false) makes every listing a request."""
    result = run_python(
        """
        import subprocess, sys
        from etils import epath
        root = epath.Path(sys.argv[1])
        (root / "a").write_text("a")
        assert [p.name for p in root.iterdir()] == ["a"]
        subprocess.run([sys.executable, "-c",
                        f"from etils import epath; epath.Path('{root}/b').write_text('b')"],
                       check=True)
        print(sorted(p.name for p in root.iterdir()), (root / "b").exists())
    """,
        os.fspath(gcs_dir),
        env={
            "EPATH_USE_TF": "false",
            # gcsfs's default (importing bt_jax.files in this pytest
            # process turned the cache off for its children).
            "FSSPEC_GCS_USE_LISTINGS_CACHE": None,
        },
    )
    assert result.returncode == 0, result.stderr[-3000:]
    assert result.stdout.split("\n")[-2] == "['a'] False"  # Stale.
    result = run_python(
        """
        import subprocess, sys
        from etils import epath
        root = epath.Path(sys.argv[1])
        assert [p.name for p in root.iterdir()] == ["a", "b"]
        subprocess.run([sys.executable, "-c",
                        f"from etils import epath; epath.Path('{root}/c').write_text('c')"],
                       check=True)
        print(sorted(p.name for p in root.iterdir()), (root / "c").exists())
    """,
        os.fspath(gcs_dir),
        env={"EPATH_USE_TF": "false", "FSSPEC_GCS_USE_LISTINGS_CACHE": "false"},
    )
    assert result.returncode == 0, result.stderr[-3000:]
    assert result.stdout.split("\n")[-2] == "['a', 'b', 'c'] True"


def test_tensorflow_stat_cache_hides_another_writer_for_five_seconds(gcs_emulator, gcs_dir):
    """TF caches each object's size for GCS_STAT_CACHE_MAX_AGE (default 5 s) and reads only
    that many bytes: within 5 s of another writer's rewrite, this process reads a truncated
    object. GCS_STAT_CACHE_MAX_AGE=0 (read once per process) turns the cache off."""
    path = gcs_dir / "metrics.json"
    path.write_text("old")
    assert path.stat().length == 3
    upload(gcs_emulator, path, b"the new one")
    assert path.stat().length == 3 and path.read_text() == "the"  # Stale size, new bytes.
    assert object_names(gcs_emulator, gcs_dir) == ["metrics.json"]


def _state(step: int) -> dict:
    return {"w": jnp.arange(12.0).reshape(3, 4) + step, "step": jnp.int32(step)}


def _abstract(state: dict) -> dict:
    return jax.tree.map(ocp.utils.to_shape_dtype_struct, state)


def test_orbax_async_checkpoints_save_and_restore_on_gcs(gcs_emulator, gcs_dir):
    options = ocp.CheckpointManagerOptions(
        max_to_keep=2, create=True, enable_async_checkpointing=True, cleanup_tmp_directories=True
    )
    directory = gcs_dir / "checkpoints"
    with ocp.CheckpointManager(directory, options=options) as manager:
        for step in (1, 2, 3):
            manager.save(step, args=ocp.args.StandardSave(_state(step)))
        manager.wait_until_finished()
        assert manager.all_steps() == [2, 3]
    # On gs:// orbax writes in place and commits with a file, not a rename.
    assert [
        name
        for name in object_names(gcs_emulator, directory)
        if name.endswith("commit_success.txt")
    ] == [
        "2/commit_success.txt",
        "2/default/commit_success.txt",
        "3/commit_success.txt",
        "3/default/commit_success.txt",
    ]
    with ocp.CheckpointManager(directory, options=options) as second:
        assert second.all_steps() == [2, 3] and second.latest_step() == 3
        restored = second.restore(3, args=ocp.args.StandardRestore(_abstract(_state(0))))
    jax.tree.map(np.testing.assert_array_equal, restored, _state(3))


def test_orbax_ignores_and_cleans_a_save_killed_before_its_commit(gcs_emulator, gcs_dir):
    directory = gcs_dir / "checkpoints"
    options = ocp.CheckpointManagerOptions(create=True, cleanup_tmp_directories=True)
    with ocp.CheckpointManager(directory, options=options) as manager:
        manager.save(1, args=ocp.args.StandardSave(_state(1)))
        manager.wait_until_finished()
    # A preemption: a real SIGKILL after step 2's data is written, before its commit file.
    result = run_python(
        """
        import os, signal, sys
        import jax.numpy as jnp
        import orbax.checkpoint as ocp
        from orbax.checkpoint._src.path import atomicity

        async def preempted(self):
            os.kill(os.getpid(), signal.SIGKILL)

        atomicity.CommitFileTemporaryPath.finalize = preempted
        manager = ocp.CheckpointManager(sys.argv[1], options=ocp.CheckpointManagerOptions(
            enable_async_checkpointing=True))
        manager.save(2, args=ocp.args.StandardSave({"w": jnp.ones(4)}))
        manager.wait_until_finished()
    """,
        os.fspath(directory),
    )
    assert result.returncode == -signal.SIGKILL, result.stderr[-3000:]
    names = object_names(gcs_emulator, directory)
    assert "2/default/_METADATA" in names and "2/commit_success.txt" not in names
    with ocp.CheckpointManager(directory, options=options) as manager:
        assert manager.all_steps() == [1]
        # The cleanup of uncommitted steps runs in a background thread that wait_until_finished
        # does not always wait for: give it a little while.
        manager.wait_until_finished()
        deadline = time.time() + 30
        while time.time() < deadline and any(
            name.startswith("2/") for name in object_names(gcs_emulator, directory)
        ):
            time.sleep(0.2)
        assert not any(name.startswith("2/") for name in object_names(gcs_emulator, directory))
        manager.save(2, args=ocp.args.StandardSave(_state(2)))
        manager.wait_until_finished()
        assert manager.all_steps() == [1, 2]
        restored = manager.restore(2, args=ocp.args.StandardRestore(_abstract(_state(0))))
    jax.tree.map(np.testing.assert_array_equal, restored, _state(2))


def test_flax_msgpack_through_epath(gcs_emulator, gcs_dir):
    variables = {
        "params": {"kernel": np.arange(6, dtype=np.float32).reshape(2, 3)},
        "batch_stats": {"mean": np.ones(3, np.float32)},
    }
    path = gcs_dir / "backbone.msgpack"
    path.write_bytes(flax.serialization.msgpack_serialize(variables))
    restored = flax.serialization.msgpack_restore(path.read_bytes())
    jax.tree.map(np.testing.assert_array_equal, restored, variables)


def test_tensorboard_events_written_by_tf_summary_to_gcs_read_back_by_tensorboard(
    gcs_emulator, gcs_dir
):
    """tf.summary (bt_jax's event writer) on GCS rewrites the whole event file at each flush
    (objects cannot be appended to); TensorBoard reads gs:// through tf.io.gfile."""
    logdir = gcs_dir / "tensorboard"
    writer = tf.summary.create_file_writer(os.fspath(logdir))
    for step in range(3):
        with writer.as_default(step=step):
            tf.summary.scalar("loss", 1.0 / (step + 1))
        writer.flush()
    writer.close()
    assert len(list(logdir.glob("events.out.tfevents.*"))) == 1
    events = event_accumulator.EventAccumulator(os.fspath(logdir)).Reload()
    loss = [
        (event.step, float(tensor_util.make_ndarray(event.tensor_proto)))
        for event in events.Tensors("loss")
    ]
    assert loss == [(0, 1.0), (1, 0.5), (2, pytest.approx(1 / 3))]


@pytest.mark.parametrize("file_format", ["tfrecord", "array_record"])
def test_tfds_reads_a_dataset_copied_into_the_bucket(gcs_emulator, gcs_dir, tmp_path, file_format):
    """Prepared locally (tfds cannot prepare into gs:// on the emulator: it renames the finished
    directory, see above, and array_record writes local files only), copied through epath, read
    from gs://: tfrecord by tf.data through TF's GCS client, array_record (as_data_source) by
    array_record's own GCS client (google-cloud-cpp)."""
    images = np.random.default_rng(0).integers(0, 256, (6, 8, 8, 1), dtype=np.uint8)
    labels = np.arange(6) % 3
    tfds.dataset_builders.store_as_tfds_dataset(
        name="tiny",
        version="1.0.0",
        data_dir=tmp_path,
        file_format=file_format,
        features=tfds.features.FeaturesDict(
            {
                "image": tfds.features.Image(shape=(8, 8, 1)),
                "label": tfds.features.ClassLabel(num_classes=3),
            }
        ),
        split_datasets={
            "train": tf.data.Dataset.from_tensor_slices({"image": images, "label": labels})
        },
    )
    for local in pathlib.Path(tmp_path, "tiny").rglob("*"):
        if local.is_file():
            (gcs_dir / local.relative_to(tmp_path)).write_bytes(local.read_bytes())
    builder = tfds.builder("tiny", data_dir=os.fspath(gcs_dir))
    assert builder.info.splits["train"].num_examples == 6
    if file_format == "tfrecord":
        examples = list(builder.as_dataset(split="train").as_numpy_iterator())
    else:
        examples = list(builder.as_data_source(split="train"))
    by_label = sorted((int(e["label"]), e["image"].tobytes()) for e in examples)
    assert by_label == sorted(zip(labels.tolist(), [image.tobytes() for image in images]))
