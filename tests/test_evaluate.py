"""Evaluation protocols: kNN and logreg against exact answers, the linear and semi-supervised
protocols and the command line on a tiny pretraining run, and the errors users hit."""

import glob
import json
import math
import os
import shutil
import subprocess
import sys

import jax
import numpy as np
import pytest
import tensorflow as tf

from bt_jax import checkpoint
from bt_jax import config as config_lib
from bt_jax import data
from bt_jax import evaluate as ev
from bt_jax import train

from train_helpers import REPO
from train_helpers import tiny_config as tiny_training_config


def tiny_config(**overrides):
    """The trainers' tiny config, as a 2-step run at batch 32 with a checkpoint every step."""
    config = tiny_training_config(batch_size=32, max_steps=2, log_every_steps=1,
                                  checkpoint_every_steps=1)
    config.eval.at_end = False  # the quick evaluation is tested here, not run by the fixture
    config.update(overrides)
    return config


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory):
    """A 2-step pretraining run on digits: checkpoints 1 and 2, config.json, backbone.msgpack."""
    workdir = str(tmp_path_factory.mktemp("run"))
    train.train_and_evaluate(tiny_config(), workdir)
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
    np.testing.assert_allclose(flat[0], [math.exp(0.1), math.exp(0.08) + math.exp(0.06)],
                               rtol=1e-5)
    assert sharp[0].argmax() == 0 and flat[0].argmax() == 1
    # k = 1: only the nearest votes; k beyond the train size is clipped to it.
    nearest = ev.knn_scores(train_x, train_y, query, num_classes=2, k=1, temperature=0.1)
    np.testing.assert_allclose(nearest[0], [math.exp(10), 0.0], rtol=1e-5)
    result = ev.knn_protocol(train_x, train_y, query, np.array([1]), num_classes=2, k=200,
                             temperature=10.0)
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
    got = ev.knn_scores(train_x, train_y, test_x, num_classes=4, k=7, temperature=0.5,
                        chunk_size=8)
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
    assert result["C"] in ev.LOGREG_C_GRID


def test_topk_accuracy():
    scores = np.array([[0.1, 0.5, 0.4], [0.9, 0.05, 0.05], [0.2, 0.3, 0.5]])
    labels = np.array([2, 0, 0])
    result = ev.topk_accuracy(scores, labels, ks=(1, 2, 5))
    assert result == {"top1": 1 / 3, "top2": 2 / 3, "top5": 1.0}


# ---------------------------------------------------------------------------------------------
# Config, label subsets, errors that need no run.


def test_run_config_is_merged_over_the_defaults(tmp_path):
    saved = tiny_config().to_dict()
    del saved["eval"]  # an older run, from before the evaluation keys existed
    saved["removed_key"] = 1
    with open(tmp_path / "config.json", "w") as f:
        json.dump(saved, f)
    config = ev.load_run_config(str(tmp_path), {"eval.knn_k": 5})
    assert config.width == 4 and config.projector == "32-32"  # the run's values
    assert config.eval.linear_epochs == config_lib.get_config().eval.linear_epochs  # defaults
    assert config.eval.knn_k == 5  # the override
    assert "removed_key" not in config
    with pytest.raises(config_lib.ConfigError, match="knn_temperature"):
        ev.load_run_config(str(tmp_path), {"eval.knn_temperature": 0.0})


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
    images = np.zeros((8, 16, 16, 3), np.uint8)
    source = data.from_arrays("unlabelled", images, None, images, None)
    with pytest.raises(ev.UnlabelledSourceError, match="no labels"):
        ev.run_protocols(["knn"], tiny_config(), None, None, source)


# ---------------------------------------------------------------------------------------------
# On a tiny pretraining run.


def test_cli_writes_knn_results_with_the_random_init_baseline(run_dir):
    env = dict(os.environ, JAX_PLATFORMS="cpu", TF_CPP_MIN_LOG_LEVEL="2",
               # One device: the checkpoint was saved from 8, and must restore on any topology.
               XLA_FLAGS="--xla_force_host_platform_device_count=1")
    command = [sys.executable, "-m", "bt_jax.evaluate", f"--workdir={run_dir}",
               "--protocol=knn", "--config.eval.knn_k=20"]
    process = subprocess.run(command, cwd=REPO, env=env, capture_output=True, text=True,
                             timeout=300)
    assert process.returncode == 0, process.stderr[-3000:]
    with open(os.path.join(run_dir, "eval_knn.json")) as f:
        record = json.load(f)
    assert record["protocol"] == "knn" and record["step"] == 2
    assert record["dataset"] == "digits" and record["model"] == "resnet18"
    assert set(record["results"]) == {"pretrained", "random_init"}
    for result in record["results"].values():
        assert_accuracies(result)
        assert result["k"] == 20
    assert record["seconds"] > 0
    tags = {value.tag for path in glob.glob(os.path.join(run_dir, "events.out.tfevents*"))
            for event in tf.compat.v1.train.summary_iterator(path)
            for value in event.summary.value}
    assert {"eval/knn_top1", "eval/knn_top1_random_init"} <= tags


def test_linear_protocol_for_one_epoch_through_the_command_line(run_dir):
    args, rest = ev.parse_args(["evaluate", f"--workdir={run_dir}", "--protocol=linear",
                                "--config.eval.linear_epochs=1"])
    assert rest == ["evaluate"] and args.overrides == {"eval.linear_epochs": 1}
    [record] = ev.run_command_line(args)
    assert set(record["results"]) == {"pretrained", "random_init"}
    for result in record["results"].values():
        assert_accuracies(result)
        assert result["epochs"] == 1 and result["train_examples"] == 1500
    with open(ev.results_path(run_dir, "linear")) as f:
        assert json.load(f)["results"] == record["results"]


def test_finetune_on_label_subsets(run_dir):
    record = ev.evaluate(run_dir, "finetune", baselines=False, write=False, overrides={
        "eval.finetune_epochs": 2, "eval.label_fractions": (0.1,)})
    result = record["results"]["pretrained"]
    assert list(result) == ["10%"]
    assert_accuracies(result["10%"])
    assert result["10%"]["num_labelled"] == 150


def test_evaluate_quick_and_every_checkpoint(run_dir):
    config = ev.load_run_config(run_dir)
    source = ev.load_labelled_source(config)
    variables, step = ev.load_backbone_variables(run_dir, config)
    assert step == 2
    quick = ev.evaluate_quick(config, ev.build_backbone(config), variables, source)
    for protocol in ("logreg", "knn"):
        assert set(quick[protocol]) == {"pretrained", "random_init"}
        for result in quick[protocol].values():
            assert_accuracies(result)
    line = ev.summary_line(quick)
    assert "kNN top-1" in line and "random init" in line

    records = ev.evaluate_checkpoints(run_dir, ("knn",))
    assert [r["step"] for r in records] == [1, 2]
    assert records[-1]["results"]["knn"]["pretrained"] == quick["knn"]["pretrained"]
    # The baseline is computed once and is the same at every step.
    assert records[0]["results"]["knn"]["random_init"] == quick["knn"]["random_init"]
    assert os.path.exists(os.path.join(run_dir, "eval_checkpoints.json"))
    subset = ev.evaluate_checkpoints(run_dir, ("knn",), steps=[2], baselines=False)
    assert [r["step"] for r in subset] == [2]
    assert subset[0]["results"]["knn"]["pretrained"] == quick["knn"]["pretrained"]
    with pytest.raises(ev.NoCheckpointError, match=r"steps \[5\]"):
        ev.evaluate_checkpoints(run_dir, ("knn",), steps=[5])


def test_checkpoints_load_whatever_else_the_state_holds(run_dir, tmp_path):
    config = ev.load_run_config(run_dir)
    variables, _ = ev.load_backbone_variables(run_dir, config)
    # A TrainState of another vintage: no optimiser state, a field nobody knows about.
    workdir = str(tmp_path / "other_state")
    checkpoint.write_config(workdir, config)
    manager = checkpoint.checkpoint_manager(workdir, config)
    checkpoint.save(manager, 7, {"params": {"backbone": variables["params"]},
                                 "batch_stats": {"backbone": variables["batch_stats"]},
                                 "some_future_field": np.arange(3)})
    manager.close()
    restored, step = ev.load_backbone_variables(workdir, config)
    assert step == 7
    for got, want in zip(jax.tree.leaves(restored), jax.tree.leaves(variables)):
        np.testing.assert_array_equal(got, want)
    # No checkpoints, only the exported backbone: the end of the same run.
    exported_only = copy_run(run_dir, tmp_path / "exported", with_checkpoints=False)
    restored, step = ev.load_backbone_variables(exported_only, config)
    assert step is None
    for got, want in zip(jax.tree.leaves(restored), jax.tree.leaves(variables)):
        np.testing.assert_array_equal(got, want)


# ---------------------------------------------------------------------------------------------
# Errors.


def test_a_workdir_without_checkpoints_says_what_to_do(run_dir, tmp_path):
    workdir = str(tmp_path / "empty")
    os.makedirs(workdir)
    shutil.copy(os.path.join(run_dir, "config.json"), workdir)
    with pytest.raises(ev.NoCheckpointError, match="no checkpoint.*python -m bt_jax.train"):
        ev.evaluate(workdir, "knn")
    with pytest.raises(ev.NoCheckpointError, match="no checkpoint of step 99.*steps there"):
        ev.evaluate(run_dir, "knn", step=99)
    # The command line reports it as one line, without a traceback.
    args, _ = ev.parse_args(["evaluate", f"--workdir={workdir}"])
    with pytest.raises(SystemExit, match="^error: Nothing to evaluate"):
        ev.main(args)
    assert not os.path.exists(os.path.join(workdir, "checkpoints"))  # nothing was created


def test_a_checkpoint_of_another_architecture_is_refused(run_dir, tmp_path):
    workdir = copy_run(run_dir, tmp_path / "edited")
    path = os.path.join(workdir, "config.json")
    with open(path) as f:
        saved = json.load(f)
    saved["width"] = 8
    with open(path, "w") as f:
        json.dump(saved, f)
    with pytest.raises(ev.ArchitectureMismatchError, match=r"width=8.*conv1/kernel is "
                       r"\(3, 3, 3, 4\) there but \(3, 3, 3, 8\)"):
        ev.evaluate(workdir, "knn")
    shutil.rmtree(os.path.join(workdir, "checkpoints"))  # the exported backbone is checked too
    with pytest.raises(ev.ArchitectureMismatchError, match="backbone.msgpack"):
        ev.evaluate(workdir, "knn")


def test_an_unknown_protocol_lists_the_known_ones(run_dir):
    with pytest.raises(ev.EvaluationError, match="linear, logreg, knn, finetune"):
        ev.evaluate(run_dir, "svm")
    args, _ = ev.parse_args(["evaluate", f"--workdir={run_dir}", "--protocol=svm"])
    with pytest.raises(SystemExit, match="Unknown protocol 'svm'"):
        ev.main(args)
