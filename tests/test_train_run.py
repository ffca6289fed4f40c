"""The pretraining loop on one process: determinism, logs, checkpoints, SIGKILL and SIGTERM with
exact resume, the config record, the CLI as a new user types it."""

import json
import os
import re
import signal
import subprocess
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from train_helpers import (
    REPO,
    assert_bit_identical,
    restore_params,
    subprocess_env,
    tiny_config,
    trainer_command,
)

import bt_jax
from bt_jax import checkpoint, metric_logging
from bt_jax import workdir as workdir_lib
from bt_jax.train import loop


@pytest.fixture(scope="module")
def reference_run(tmp_path_factory):
    """An uninterrupted run of 6 steps over 8 devices, in this process."""
    workdir = str(tmp_path_factory.mktemp("reference"))
    state = loop.train_and_evaluate(tiny_config(max_steps=6), workdir)
    return workdir, jax.device_get(state.params)


def test_run_writes_logs_checkpoints_and_loadable_weights(reference_run):
    workdir, params = reference_run
    records = metric_logging.read_metrics(workdir)
    record = [r for r in records if "loss" in r][-1]
    for key in (
        "loss",
        "invariance",
        "redundancy",
        "lr_weights",
        "lr_biases",
        "images_per_second",
        "data_wait_seconds",
    ):
        assert np.isfinite(record[key]), key
    assert record["step"] == 6
    assert [r["step"] for r in records if "loss" in r] == [2, 4, 6]
    for key in ("probe_loss", "probe_train_accuracy"):
        assert 0 <= record[key] < 10, key
    # 1500 digits / 256 = 5 steps an epoch: the epoch's end logged the probe's test accuracy.
    epoch_end = [r for r in records if "probe_test_accuracy" in r]
    assert [r["step"] for r in epoch_end] == [5]
    assert 0.0 <= epoch_end[0]["probe_test_accuracy"] <= 1.0
    # The history is chunked at the checkpoints (object stores have no append).
    chunks = sorted(
        f for f in os.listdir(os.path.join(workdir, "metrics")) if f.startswith("steps-")
    )
    assert chunks == [
        "steps-000000002-000000002.jsonl",
        "steps-000000004-000000004.jsonl",
        "steps-000000005-000000006.jsonl",
    ], chunks
    assert sorted(os.listdir(os.path.join(workdir, "checkpoints"))) == ["4", "6"]  # keep 2
    assert any(f.startswith("events.out.tfevents") for f in os.listdir(workdir))
    # The main job ended with the quick probes beside the baselines.
    quick = json.load(open(os.path.join(workdir, "eval_quick.json")))
    assert quick["step"] == 6
    for protocol in ("logreg", "knn"):
        for setting in ("pretrained", "random_init", "random_init_bn", "random_fan_in_bn"):
            assert 0.0 <= quick["results"][protocol][setting]["top1"] <= 1.0
    assert 0.0 <= quick["results"]["logreg"]["raw_pixels"]["top1"] <= 1.0
    assert any("eval/knn_top1_random_init" in r for r in records)
    module, variables = bt_jax.load_backbone(workdir)
    assert_bit_identical(variables["params"], params["backbone"])
    features = module.apply(variables, jnp.zeros((2, 16, 16, 3)), train=False)
    assert features.shape == (2, 32)  # 8 * width, width 4
    model, variables = bt_jax.load_model(workdir)
    assert_bit_identical(variables["params"], params)
    representation, embedding = model.apply(variables, jnp.zeros((2, 16, 16, 3)), train=False)
    assert representation.shape == (2, 32) and embedding.shape == (2, 32)
    # The start is recorded, and the history keeps it.
    assert [step for step, _ in workdir_lib.history(workdir)] == [0]
    assert not os.path.exists(os.path.join(workdir, workdir_lib.LOCK_FILE))  # released


def test_sigkill_and_resume_is_bit_identical(reference_run, tmp_path):
    reference_dir, reference_params = reference_run
    workdir = str(tmp_path / "killed")
    command = trainer_command(workdir, max_steps=6, checkpoint__every_steps=1, eval__at_end=False)
    process = subprocess.Popen(
        command, cwd=REPO, env=subprocess_env(), stdout=subprocess.DEVNULL, stderr=subprocess.PIPE
    )
    checkpoints = os.path.join(workdir, "checkpoints")
    deadline = time.time() + 300
    while time.time() < deadline and process.poll() is None:
        if os.path.isdir(os.path.join(checkpoints, "3")):
            break
        time.sleep(0.05)
    assert process.poll() is None, process.stderr.read().decode()[-3000:]
    process.send_signal(signal.SIGKILL)
    process.wait()
    killed_at = max(int(d) for d in os.listdir(checkpoints) if d.isdigit())
    assert 3 <= killed_at < 6
    result = subprocess.run(
        command, cwd=REPO, env=subprocess_env(), capture_output=True, text=True, timeout=300
    )
    assert result.returncode == 0, result.stderr[-3000:]
    params, step = restore_params(workdir)
    assert step == 6
    assert_bit_identical(params, reference_params)
    # Every step logged once, the resumed ones included; two starts recorded.
    steps = [r["step"] for r in metric_logging.read_metrics(workdir) if "loss" in r]
    assert steps == sorted(set(steps)) and steps[-1] == 6
    assert [s for s, _ in workdir_lib.history(workdir)][0] == 0
    assert len(workdir_lib.history(workdir)) == 2


def test_sigterm_saves_and_exits_cleanly(tmp_path):
    workdir = str(tmp_path / "preempted")
    command = trainer_command(
        workdir,
        max_steps=1000,
        num_epochs=200,
        checkpoint__every_steps=1000,
        logging__every_steps=1,
    )
    process = subprocess.Popen(
        command,
        cwd=REPO,
        env=subprocess_env(1),
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        text=True,
    )
    latest = os.path.join(workdir, "metrics", "latest.jsonl")
    deadline = time.time() + 300
    while time.time() < deadline and process.poll() is None:
        if os.path.exists(latest) and os.path.getsize(latest) > 0:
            break
        time.sleep(0.05)
    process.send_signal(signal.SIGTERM)
    _, stderr = process.communicate(timeout=120)
    assert process.returncode == 0, stderr[-3000:]
    saved = [int(d) for d in os.listdir(os.path.join(workdir, "checkpoints")) if d.isdigit()]
    assert len(saved) == 1 and 1 <= saved[0] < 1000
    assert "Stopped by a signal" in stderr and "Traceback" not in stderr


def test_resuming_with_an_incompatible_config_is_refused(reference_run):
    workdir, _ = reference_run
    before = sorted(os.listdir(workdir))
    with pytest.raises(
        checkpoint.IncompatibleCheckpointError, match="model.width: saved 4, given 8"
    ):
        loop.train_and_evaluate(tiny_config(max_steps=8, model__width=8), workdir)
    assert sorted(os.listdir(workdir)) == before


def test_the_default_recipe_runs_end_to_end_with_no_flags(tmp_path):
    """`python -m bt_jax.train` as a new user types it (here stopped after 2 steps)."""
    result = subprocess.run(
        [sys.executable, "-m", "bt_jax.train", "--config.max_steps=2"],
        cwd=tmp_path,
        env=subprocess_env(1, PYTHONPATH=REPO),
        capture_output=True,
        text=True,
        timeout=400,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    workdir = tmp_path / "runs" / "default"
    assert (workdir / "checkpoints" / "2").is_dir()
    assert (workdir / "backbone.msgpack").exists() and (workdir / "model.msgpack").exists()
    saved = json.loads((workdir / "config.json").read_text())
    assert saved["data"]["dataset"] == "digits" and saved["model"]["name"] == "resnet18"
    assert "linear probe (logreg) top-1" in result.stdout
    # stderr is not a terminal: progress is a periodic line per log step, not a live bar.
    assert re.search(
        r"^step 2/2 \(epoch 0\.40\) loss [\d.]+ images/s [\d.]+ ETA \d+m\d+s$",
        result.stderr,
        re.MULTILINE,
    ), result.stderr[-2000:]
    assert "\r" not in result.stderr


def test_pretraining_on_unlabelled_images_with_a_separate_labelled_set(tmp_path):
    """Own images without labels for pretraining; a labelled folder for the evaluation."""
    from PIL import Image

    from bt_jax import data

    digits = data.load_source("digits")
    images, labels = digits.split("train").images, digits.split("train").labels
    unlabelled, labelled = tmp_path / "photos", tmp_path / "labelled"
    for i in range(64):
        unlabelled.mkdir(exist_ok=True)
        Image.fromarray(images[i, :, :, 0]).save(unlabelled / f"{i}.png")
        for split in ("train", "test"):
            folder = labelled / split / f"class_{labels[i]}"
            folder.mkdir(parents=True, exist_ok=True)
            Image.fromarray(images[i, :, :, 0]).save(folder / f"{i}.png")
    workdir = str(tmp_path / "run")
    loop.train_and_evaluate(
        tiny_config(
            batch_size=32,
            max_steps=2,
            data__dataset="folder",
            data__data_dir=str(unlabelled),
            data__image_size=8,
            data__eval_resize=8,
            eval__dataset="folder",
            eval__data_dir=str(labelled),
            eval__baselines=False,
        ),
        workdir,
    )
    quick = json.load(open(os.path.join(workdir, "eval_quick.json")))
    assert quick["dataset"] == "folder"
    assert 0.0 <= quick["results"]["knn"]["pretrained"]["top1"] <= 1.0
    # eval.baselines off: the trained backbone alone (the baselines are tested above).
    assert {p: list(r) for p, r in quick["results"].items()} == {
        "logreg": ["pretrained"],
        "knn": ["pretrained"],
    }
    records = metric_logging.read_metrics(workdir)
    assert not any("probe_loss" in r for r in records)  # no labels to train the probe on
