"""Runs on object storage: a real GCS emulator (fake-gcs-server, started by the tests) holds the
workdir and the data; the trainer, a SIGKILL, the resume and the evaluation all go through it,
and nothing lands on the local disk."""

import json
import os
import pathlib
import re
import signal
import subprocess
import sys
import time

import jax
import numpy as np
import pytest
import tensorflow as tf
import tensorflow_datasets as tfds
from train_helpers import (
    REPO,
    assert_bit_identical,
    restore_params,
    subprocess_env,
    tiny_config,
    trainer_command,
)

from bt_jax import metric_logging
from bt_jax import workdir as workdir_lib
from bt_jax.train import loop

pytestmark = pytest.mark.slow


def cli_env(devices=8):
    # The emulator's variables are in os.environ (the fixture set them); subprocesses inherit.
    return subprocess_env(devices)


def wait_for(predicate, process, timeout=300):
    deadline = time.time() + timeout
    while time.time() < deadline and process.poll() is None and not predicate():
        time.sleep(0.2)
    assert process.poll() is None, process.stderr.read()[-3000:]


def test_a_run_lives_in_the_bucket_through_a_kill_a_resume_and_an_evaluation(
    gcs_emulator, gcs_dir, tmp_path
):
    workdir = gcs_dir / "run"
    local_reference = loop.train_and_evaluate(
        tiny_config(max_steps=6, checkpoint__every_steps=2, eval__at_end=False),
        str(tmp_path / "local"),
    )
    command = trainer_command(workdir, max_steps=6, checkpoint__every_steps=2, eval__at_end=False)
    process = subprocess.Popen(
        command,
        cwd=tmp_path,
        env=cli_env(),
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        text=True,
    )
    wait_for(lambda: (workdir / "checkpoints" / "2" / "commit_success.txt").exists(), process)
    process.send_signal(signal.SIGKILL)
    process.wait()
    result = subprocess.run(
        command, cwd=tmp_path, env=cli_env(), capture_output=True, text=True, timeout=600
    )
    assert result.returncode == 0, result.stderr[-3000:]
    # The resumed run in the bucket ends with the parameters of the uninterrupted local one.
    params, step = restore_params(str(workdir))
    assert step == 6
    assert_bit_identical(params, jax.device_get(local_reference.params))
    # Everything a run writes is in the bucket: config and its history, the metrics (chunked:
    # objects have no append), TensorBoard events, the exports; the lease is released.
    names = {path.name for path in workdir.iterdir()}
    assert {
        "config.json",
        "config_history",
        "metrics",
        "checkpoints",
        "backbone.msgpack",
        "model.msgpack",
    } <= names, names
    assert any(name.startswith("events.out.tfevents") for name in names), names
    assert workdir_lib.LOCK_FILE not in names
    assert len(workdir_lib.history(workdir)) == 2
    steps = [r["step"] for r in metric_logging.read_metrics(workdir) if "loss" in r]
    assert steps == sorted(set(steps)) and steps[-1] == 6
    # Evaluation reads the run from the bucket and writes its results there.
    result = subprocess.run(
        [
            sys.executable,
            "-m",
            "bt_jax.evaluate",
            f"--workdir={workdir}",
            "--protocol=knn",
            "--baselines=false",
        ],
        cwd=tmp_path,
        env=cli_env(),
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    record = json.loads((workdir / "eval_knn.json").read_text())
    assert record["step"] == 6 and 0.0 <= record["results"]["pretrained"]["top1"] <= 1.0
    tags = set()
    for path in workdir.glob("events.out.tfevents*"):
        local = tmp_path / path.name
        local.write_bytes(path.read_bytes())
        tags |= {
            value.tag
            for event in tf.compat.v1.train.summary_iterator(str(local))
            for value in event.summary.value
        }
    assert {"loss", "eval/knn_top1"} <= tags
    # Nothing was written to the local disk under a folder named after the scheme.
    assert not list(tmp_path.glob("gs*")) and not os.path.exists(os.path.join(REPO, "gs:"))


def test_pretraining_reads_a_tfds_dataset_from_the_bucket(gcs_emulator, gcs_dir, tmp_path):
    rng = np.random.default_rng(0)
    splits = {
        split: tf.data.Dataset.from_tensor_slices(
            {
                "image": rng.integers(0, 256, (n, 12, 12, 3), dtype=np.uint8),
                "label": np.arange(n) % 4,
            }
        )
        for split, n in (("train", 64), ("test", 16))
    }
    tfds.dataset_builders.store_as_tfds_dataset(
        name="tiny_images",
        version="1.0.0",
        data_dir=tmp_path / "tfds",
        features=tfds.features.FeaturesDict(
            {
                "image": tfds.features.Image(shape=(12, 12, 3)),
                "label": tfds.features.ClassLabel(num_classes=4),
            }
        ),
        split_datasets=splits,
        file_format="array_record",
    )
    for local in pathlib.Path(tmp_path, "tfds").rglob("*"):
        if local.is_file():
            (gcs_dir / "tfds" / local.relative_to(tmp_path / "tfds")).write_bytes(
                local.read_bytes()
            )
    # The workdir in a bucket is the test above's; here the data: both splits read from the
    # bucket (train for pretraining, test for the probe's accuracy at the epoch's end).
    workdir = tmp_path / "run"
    state = loop.train_and_evaluate(
        tiny_config(
            batch_size=32,
            max_steps=2,
            data__dataset="tiny_images",
            data__data_dir=os.fspath(gcs_dir / "tfds"),
            data__image_size=8,
            data__eval_resize=8,
            eval__at_end=False,
        ),
        os.fspath(workdir),
    )
    assert int(state.step) == 2
    records = metric_logging.read_metrics(workdir)
    assert [r["step"] for r in records if "probe_test_accuracy" in r] == [2]  # 64 / 32: 2 steps


@pytest.mark.parametrize(
    "workdir, pattern",
    [
        ("s3://bucket/run", r"no filesystem for 's3://' is installed"),
        ("gs://no-such-bucket-bt-jax/run", r"bucket gs://no-such-bucket-bt-jax does not exist"),
    ],
)
def test_an_unusable_object_store_is_one_line_before_any_compute(
    gcs_emulator, tmp_path, workdir, pattern
):
    start = time.time()
    result = subprocess.run(
        trainer_command(workdir),
        cwd=tmp_path,
        env=cli_env(1),
        capture_output=True,
        text=True,
        timeout=300,
    )
    lines = result.stderr.strip().splitlines()
    assert result.returncode == 1 and "Traceback" not in result.stderr, result.stderr[-3000:]
    assert lines[-1].startswith("error: ") and re.search(pattern, lines[-1]), lines[-1]
    assert time.time() - start < 120
    assert not list(tmp_path.iterdir())
