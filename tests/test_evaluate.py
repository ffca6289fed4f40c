"""Evaluation protocols: kNN and logreg against exact answers, the linear and semi-supervised
protocols and the command line on a tiny pretraining run, and the errors users hit."""

import functools
import glob
import json
import math
import os
import shutil
import subprocess
import sys

import jax
import numpy as np
import optax
import pytest
import tensorflow as tf
from train_helpers import REPO, assert_bit_identical, subprocess_env
from train_helpers import tiny_config as tiny_training_config

from bt_jax import checkpoint, data
from bt_jax import config as config_lib
from bt_jax import evaluate as ev
from bt_jax import state as state_lib
from bt_jax.evaluate import baselines, logreg
from bt_jax.train import loop

ALL_SETTINGS = {"pretrained", "random_init", "random_init_bn", "random_fan_in_bn"}


def tiny_config(**overrides):
    """The trainers' tiny config, as a 2-step run at batch 32 with a checkpoint every step."""
    config = tiny_training_config(
        batch_size=32, max_steps=2, logging__every_steps=1, checkpoint__every_steps=1, **overrides
    )
    config.eval.at_end = False  # the quick evaluation is tested here, not run by the fixture
    return config


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory):
    """A 2-step pretraining run on digits: checkpoints 1 and 2, config.json, the exports."""
    workdir = str(tmp_path_factory.mktemp("run"))
    loop.train_and_evaluate(tiny_config(), workdir)
    return workdir


def assert_accuracies(results, keys=("top1", "top5")):
    for key in keys:
        assert 0.0 <= results[key] <= 1.0, (key, results)
    assert results["top5"] >= results["top1"]


def copy_run(run_dir, destination, with_checkpoints=True):
    ignore = None if with_checkpoints else shutil.ignore_patterns("checkpoints")
    shutil.copytree(run_dir, destination, ignore=ignore)
    return str(destination)


# ---------------------------------------------------------------------------------------------
# kNN and logistic regression on given features.


def test_knn_weighted_vote_by_hand():
    # Unit vectors at similarities 1.0 (class 0), 0.8 and 0.6 (class 1) to the query [1, 0].
    train_x = np.array([[1.0, 0.0], [0.8, 0.6], [0.6, 0.8]], np.float32)
    train_y = np.array([0, 1, 1])
    query = np.array([[2.0, 0.0]], np.float32)  # not unit length: normalised inside
    sharp = ev.knn_scores(train_x, train_y, query, num_classes=2, k=3, temperature=0.1)
    np.testing.assert_allclose(sharp[0], [math.exp(10), math.exp(8) + math.exp(6)], rtol=1e-5)
    # A high temperature flattens the weights: the two class-1 neighbours outvote the nearest.
    flat = ev.knn_scores(train_x, train_y, query, num_classes=2, k=3, temperature=10.0)
    np.testing.assert_allclose(flat[0], [math.exp(0.1), math.exp(0.08) + math.exp(0.06)], rtol=1e-5)
    assert sharp[0].argmax() == 0 and flat[0].argmax() == 1
    # k = 1: only the nearest votes; k beyond the train size is clipped to it.
    nearest = ev.knn_scores(train_x, train_y, query, num_classes=2, k=1, temperature=0.1)
    np.testing.assert_allclose(nearest[0], [math.exp(10), 0.0], rtol=1e-5)
    result = ev.knn_protocol(
        train_x, train_y, query, np.array([1]), num_classes=2, k=200, temperature=10.0
    )
    assert result["k"] == 3 and result["top1"] == 1.0


def numpy_knn(train_x, train_y, test_x, num_classes, k, temperature):
    """The protocol transcribed directly: a loop over test examples."""
    train_x = train_x / np.linalg.norm(train_x, axis=1, keepdims=True)
    scores = np.zeros((len(test_x), num_classes))
    for i, query in enumerate(test_x):
        similarity = train_x @ (query / np.linalg.norm(query))
        for j in np.argsort(-similarity)[:k]:
            scores[i, train_y[j]] += np.exp(similarity[j] / temperature)
    return scores


def test_knn_matches_a_numpy_transcription_across_chunks():
    rng = np.random.default_rng(0)
    train_x = rng.normal(size=(50, 8)).astype(np.float32)
    train_y = rng.integers(0, 4, 50)
    test_x = rng.normal(size=(23, 8)).astype(np.float32)  # not a multiple of the chunk: padded
    got = ev.knn_scores(train_x, train_y, test_x, num_classes=4, k=7, temperature=0.5, chunk_size=8)
    want = numpy_knn(train_x, train_y, test_x, 4, 7, 0.5)
    assert got.shape == (23, 4)
    np.testing.assert_allclose(got, want, rtol=1e-4)


def test_logreg_separates_separable_features():
    rng = np.random.default_rng(1)
    centres = 10.0 * np.eye(3, 16)

    def blobs(n):
        labels = np.repeat(np.arange(3), n)
        return (centres[labels] + rng.normal(size=(3 * n, 16))).astype(np.float32), labels

    result = ev.logreg_protocol(*blobs(40), *blobs(20), num_classes=3)
    assert result["top1"] == 1.0 and result["top5"] == 1.0
    assert result["C"] in logreg.C_GRID


def test_topk_accuracy():
    scores = np.array([[0.1, 0.5, 0.4], [0.9, 0.05, 0.05], [0.2, 0.3, 0.5]])
    labels = np.array([2, 0, 0])
    result = ev.topk_accuracy(scores, labels, ks=(1, 2, 5))
    assert result == {"top1": 1 / 3, "top2": 2 / 3, "top5": 1.0}


def test_the_summary_line_names_every_label_subset_and_skips_what_has_no_accuracy():
    results = {
        "knn": {"pretrained": {"top1": 0.5}, "random_init": {"top1": 0.25}},
        "logreg": {"pretrained": {"top1": 0.9}, "raw_pixels": {"skipped": "too large"}},
        "finetune": {
            "pretrained": {"1%": {"top1": 0.577, "num_labelled": 600}, "10%": {"top1": 0.8}},
            "random_init": {"1%": {"top1": 0.344}, "10%": {"top1": 0.6}},
        },
    }
    assert ev.summary_line(results) == (
        "kNN top-1 50.0% (random init 25.0%) | linear probe (logreg) top-1 90.0% | "
        "fine-tune 1% top-1 57.7% (random init 34.4%) | "
        "fine-tune 10% top-1 80.0% (random init 60.0%)"
    )


# ---------------------------------------------------------------------------------------------
# Config, label subsets, errors that need no run.


def test_run_config_is_read_in_either_layout_with_overrides(tmp_path):
    saved = tiny_config().to_dict()
    del saved["eval"]  # an older run, from before the evaluation keys existed
    (tmp_path / "config.json").write_text(json.dumps(saved))
    config = ev.load_run_config(str(tmp_path), {"eval.knn_k": 5})
    assert config.model.width == 4 and config.model.projector == "32-32"  # the run's values
    assert config.eval.linear_epochs == config_lib.get_config().eval.linear_epochs  # defaults
    assert config.eval.knn_k == 5  # the override
    with pytest.raises(config_lib.ConfigError, match="knn_temperature"):
        ev.load_run_config(str(tmp_path), {"eval.knn_temperature": 0.0})
    flat = {"model": "resnet18", "width": 4, "projector": "32-32", "image_size": 16}
    (tmp_path / "config.json").write_text(json.dumps(flat))  # the layout before the groups
    config = ev.load_run_config(str(tmp_path))
    assert (config.model.name, config.model.width, config.data.image_size) == ("resnet18", 4, 16)


def test_label_subsets_are_class_balanced_deterministic_and_nested():
    labels = data.load_source("digits").split("train").labels
    counts = np.bincount(labels)
    tenth = ev.label_subset(labels, 0.1, seed=0)
    np.testing.assert_array_equal(tenth, ev.label_subset(labels, 0.1, seed=0))
    assert not np.array_equal(tenth, ev.label_subset(labels, 0.1, seed=1))
    np.testing.assert_array_equal(np.bincount(labels[tenth]), np.round(0.1 * counts))
    assert abs(len(tenth) - 0.1 * len(labels)) <= len(counts) / 2
    assert len(np.unique(tenth)) == len(tenth)
    hundredth = ev.label_subset(labels, 0.01, seed=0)
    assert np.all(np.bincount(labels[hundredth]) >= 1)  # every class keeps an example
    assert set(hundredth) <= set(tenth)


def test_a_source_without_labels_is_refused():
    config = tiny_config()
    config.data.dataset = "folder"
    images = np.zeros((8, 16, 16, 3), np.uint8)
    source = data.from_arrays("unlabelled", images, None, images, None)
    with pytest.raises(ev.UnlabelledSourceError, match="no labels.*config.eval.dataset"):
        ev.labelled_source(config, pretraining=source)
    assert ev.labelled_source(config, pretraining=source, required=False) is None


def test_every_protocol_is_registered_by_name():
    assert set(ev.protocols()) == {"linear", "logreg", "knn", "finetune"}


# ---------------------------------------------------------------------------------------------
# On a tiny pretraining run.


def test_cli_writes_knn_results_beside_the_baselines(run_dir):
    # One device: the checkpoint was saved from 8, and must restore on any topology.
    command = [
        sys.executable,
        "-m",
        "bt_jax.evaluate",
        f"--workdir={run_dir}",
        "--protocol=knn",
        "--config.eval.knn_k=20",
    ]
    process = subprocess.run(
        command, cwd=REPO, env=subprocess_env(), capture_output=True, text=True, timeout=300
    )
    assert process.returncode == 0, process.stderr[-3000:]
    with open(os.path.join(run_dir, "eval_knn.json")) as f:
        record = json.load(f)
    assert record["protocol"] == "knn" and record["step"] == 2
    assert record["dataset"] == "digits" and record["model"]["name"] == "resnet18"
    assert set(record["results"]) == ALL_SETTINGS
    for result in record["results"].values():
        assert_accuracies(result)
        assert result["k"] == 20
    assert record["seconds"] > 0
    tags = {
        value.tag
        for path in glob.glob(os.path.join(run_dir, "events.out.tfevents*"))
        for event in tf.compat.v1.train.summary_iterator(path)
        for value in event.summary.value
    }
    assert {"eval/knn_top1", "eval/knn_top1_random_init", "eval/knn_top1_random_init_bn"} <= tags


def test_linear_protocol_for_one_epoch(run_dir):
    record = ev.evaluate(run_dir, "linear", overrides={"eval.linear_epochs": 1})
    assert set(record["results"]) == ALL_SETTINGS
    for result in record["results"].values():
        assert_accuracies(result)
        assert result["epochs"] == 1 and result["train_examples"] == 1500
    with open(ev.results_path(run_dir, "linear")) as f:
        assert json.load(f)["results"] == record["results"]


def test_finetune_on_label_subsets(run_dir):
    record = ev.evaluate(
        run_dir,
        "finetune",
        baselines=False,
        write=False,
        overrides={"eval.finetune_epochs": 2, "eval.label_fractions": (0.1,)},
    )
    result = record["results"]["pretrained"]
    assert list(result) == ["10%"]
    assert_accuracies(result["10%"])
    assert result["10%"]["num_labelled"] == 150


def test_evaluate_quick_and_every_checkpoint(run_dir):
    config = ev.load_run_config(run_dir)
    variables, step = ev.load_variables(run_dir, config)
    assert step == 2
    context = ev.make_context(config, ev.labelled_source(config))
    quick = ev.with_baselines(ev.QUICK, context, variables)
    for protocol in ("logreg", "knn"):
        assert set(quick[protocol]) >= ALL_SETTINGS
        for name in ALL_SETTINGS:
            assert_accuracies(quick[protocol][name])
    line = ev.summary_line(quick)
    assert "kNN top-1" in line and "random init bn" in line

    records = ev.evaluate_checkpoints(run_dir, ("knn",))
    assert [r["step"] for r in records] == [1, 2]
    assert records[-1]["results"]["knn"]["pretrained"] == quick["knn"]["pretrained"]
    # The baselines are computed once and are the same at every step.
    assert records[0]["results"]["knn"]["random_init"] == quick["knn"]["random_init"]
    assert os.path.exists(os.path.join(run_dir, "eval_checkpoints.json"))
    subset = ev.evaluate_checkpoints(run_dir, ("knn",), steps=[2], baselines=False)
    assert [r["step"] for r in subset] == [2]
    assert subset[0]["results"]["knn"]["pretrained"] == quick["knn"]["pretrained"]
    with pytest.raises(checkpoint.NoCheckpointError, match=r"steps \[5\]"):
        ev.evaluate_checkpoints(run_dir, ("knn",), steps=[5])


def test_a_small_split_is_read_once_for_every_backbone(run_dir, monkeypatch):
    """A split's evaluation images are kept after the first backbone reads them (the baselines
    read them again otherwise); one over the bound is read again each time, the same features."""
    from bt_jax.evaluate import context as context_lib

    config = ev.load_run_config(run_dir)
    variables, _ = ev.load_variables(run_dir, config)
    kept = ev.make_context(config, ev.labelled_source(config))
    features, labels = kept.representations(context_lib.Backbone("pretrained", variables), "test")
    assert list(kept.kept_batches) == ["test"]
    assert kept.batches("test") is kept.kept_batches["test"]
    monkeypatch.setattr(context_lib, "KEEP_SPLIT_MAX_BYTES", 0)
    streamed = ev.make_context(config, ev.labelled_source(config))
    again = streamed.representations(context_lib.Backbone("pretrained", variables), "test")
    assert not streamed.kept_batches
    np.testing.assert_array_equal(again[0], features)
    np.testing.assert_array_equal(again[1], labels)
    assert len(labels) == ev.labelled_source(config).num_examples("test")


def test_the_random_init_baseline_is_the_step_0_state_to_the_bit():
    """The trainer and the baseline compile the initialisation for a program that runs once (XLA
    level 1 on a CPU, 3x faster to compile); its bits are those of a plain ``jax.jit``."""
    config = tiny_training_config()
    model = state_lib.build_model(config, axis_name=None)
    plain = jax.jit(functools.partial(state_lib.init_state, config, model, optax.identity()))()
    assert_bit_identical(state_lib.variables_of(plain), baselines.random_init(config))


def test_recomputed_batch_norm_statistics_are_the_training_mode_average(run_dir):
    """The BN baseline's statistics equal the mean of per-batch statistics of a training-mode
    pass (checked on the first BatchNorm: the conv before it is linear, so its batch mean is
    the conv of the batch's mean image)."""
    config = ev.load_run_config(run_dir)
    context = ev.make_context(config, ev.labelled_source(config))
    initial = baselines.random_init(config)
    recomputed = baselines.recompute_batch_stats(context, initial, num_batches=2)
    first = recomputed["batch_stats"]["bn1"]
    assert not np.allclose(first["mean"], initial["batch_stats"]["bn1"]["mean"])
    images = []
    for batch in data.eval_batches(
        context.source, split="train", batch_size=256, image_size=16, resize_size=16
    ):
        images.append(batch["image"])
        if len(images) == 2:
            break
    import jax.numpy as jnp

    from bt_jax.data import photometric

    kernel = initial["params"]["conv1"]["kernel"]
    means = []
    for batch in images:
        x = photometric.normalize(jnp.asarray(batch))
        y = jax.lax.conv_general_dilated(
            x, kernel, (1, 1), ((1, 1), (1, 1)), dimension_numbers=("NHWC", "HWIO", "NHWC")
        )
        means.append(np.asarray(jnp.mean(y, axis=(0, 1, 2))))
    np.testing.assert_allclose(first["mean"], np.mean(means, axis=0), rtol=1e-4, atol=1e-5)


def test_checkpoints_load_whatever_else_the_state_holds(run_dir, tmp_path):
    config = ev.load_run_config(run_dir)
    variables, _ = ev.load_variables(run_dir, config)
    # A TrainState of another vintage: no optimiser state, a field nobody knows about.
    workdir = str(tmp_path / "other_state")
    shutil.copytree(run_dir, workdir, ignore=shutil.ignore_patterns("checkpoints"))
    manager = checkpoint.open_manager(workdir, keep=2)
    checkpoint.save(
        manager,
        7,
        {
            "params": {"backbone": variables["params"]},
            "batch_stats": {"backbone": variables["batch_stats"]},
            "some_future_field": np.arange(3),
        },
        config_lib.resume_identity(config),
    )
    manager.wait_until_finished()
    manager.close()
    restored, step = ev.load_variables(workdir, config)
    assert step == 7
    for got, want in zip(jax.tree.leaves(restored), jax.tree.leaves(variables)):
        np.testing.assert_array_equal(got, want)
    # No checkpoints, only the exported backbone: the end of the same run.
    exported_only = copy_run(run_dir, tmp_path / "exported", with_checkpoints=False)
    restored, step = ev.load_variables(exported_only, config)
    assert step is None
    for got, want in zip(jax.tree.leaves(restored), jax.tree.leaves(variables)):
        np.testing.assert_array_equal(got, want)


# ---------------------------------------------------------------------------------------------
# Errors.


def run_cli(*args, devices=8):
    return subprocess.run(
        [sys.executable, "-m", "bt_jax.evaluate", *args],
        cwd=REPO,
        env=subprocess_env(devices),
        capture_output=True,
        text=True,
        timeout=300,
    )


def test_a_workdir_without_checkpoints_says_what_to_do(run_dir, tmp_path):
    workdir = str(tmp_path / "empty")
    os.makedirs(workdir)
    shutil.copy(os.path.join(run_dir, "config.json"), workdir)
    with pytest.raises(checkpoint.NoCheckpointError, match="no checkpoint.*python -m bt_jax"):
        ev.evaluate(workdir, "knn")
    with pytest.raises(checkpoint.NoCheckpointError, match="no checkpoint of step 99.*steps"):
        ev.evaluate(run_dir, "knn", step=99)
    # The command line reports it as one line, without a traceback.
    result = run_cli(f"--workdir={workdir}")
    assert result.returncode == 1
    assert result.stderr.strip().splitlines()[-1].startswith("error: Nothing to evaluate")
    assert "Traceback" not in result.stderr
    assert not os.path.exists(os.path.join(workdir, "checkpoints"))  # nothing was created


def test_a_checkpoint_of_another_architecture_is_refused(run_dir, tmp_path):
    workdir = copy_run(run_dir, tmp_path / "edited")
    path = os.path.join(workdir, "config.json")
    with open(path) as f:
        saved = json.load(f)
    saved["model"]["width"] = 8
    with open(path, "w") as f:
        json.dump(saved, f)
    with pytest.raises(
        ev.ArchitectureMismatchError,
        match=r"width=8.*conv1/kernel is "
        r"\(3, 3, 3, 4\) there but \(3, 3, 3, 8\)",
    ):
        ev.evaluate(workdir, "knn")
    shutil.rmtree(os.path.join(workdir, "checkpoints"))  # the exported backbone is checked too
    with pytest.raises(ev.ArchitectureMismatchError, match="backbone.msgpack"):
        ev.evaluate(workdir, "knn")


def test_an_unknown_protocol_lists_the_known_ones(run_dir):
    with pytest.raises(ev.EvaluationError, match="finetune, knn, linear, logreg"):
        ev.evaluate(run_dir, "svm")
    result = run_cli(f"--workdir={run_dir}", "--protocol=svm")
    assert result.returncode == 2 and "Traceback" not in result.stderr
    assert "svm" in result.stderr.strip().splitlines()[-1]
