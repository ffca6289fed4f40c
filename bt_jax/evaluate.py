"""Evaluation protocols for a pretrained backbone, each beside the same numbers for baselines.

    python -m bt_jax.evaluate --workdir=runs/default --protocol=knn
    python -m bt_jax.evaluate --workdir=runs/default --protocol=linear \
        --config.eval.linear_epochs=10
    python -m bt_jax.evaluate --workdir=runs/default --protocol=logreg --step=400 --baselines=false
    python -m bt_jax.evaluate --workdir=runs/default --protocol=knn --all_checkpoints

Protocols (``config.eval.*`` sets their hyperparameters; the defaults are the published ones):

* ``linear``: the paper's linear evaluation. Frozen backbone in inference mode, a linear layer
  on the pooled representation (weights N(0, 0.01), bias 0), SGD momentum 0.9, cosine learning
  rate stepped per epoch (official evaluate.py: CosineAnnealingLR(T_max=epochs)), weight decay,
  RandomResizedCrop + flip for training, resize + centre crop for testing. Top-1 and top-5.
* ``logreg``: the fast variant for small data: representations extracted once (evaluation
  transform), standardised, scikit-learn's multinomial logistic regression with C chosen from
  ``LOGREG_C_GRID`` on a held-out 10% of the train split, then refit on all of it.
* ``knn``: weighted k-nearest-neighbours on L2-normalised representations (cosine similarity),
  weights exp(similarity / T), class scores summed over the k neighbours (InstDisc; the protocol
  of solo-learn and lightly). Top-1 and top-5.
* ``finetune``: the paper's semi-supervised protocol on class-balanced label subsets
  (``label_fractions``): the whole network trained with train-mode BatchNorm, backbone and head
  learning rates multiplied by 0.2 after 60% and 80% of the epochs, no weight decay.

Every protocol also runs on a randomly initialised backbone of the same architecture (the run's
step-0 backbone: ``train.init_state`` from ``config.seed``), and ``logreg`` on raw pixels too.
Results go to ``WORKDIR/eval_<protocol>.json`` and to TensorBoard as ``eval/<protocol>_top1``,
``eval/<protocol>_top1_random_init``, ...

The backbone comes from the latest (or ``--step``) orbax checkpoint, restored without a target
(only ``params/backbone`` and ``batch_stats/backbone`` are read, as numpy), so a checkpoint from
an older TrainState still loads; without checkpoints, from ``backbone.msgpack``. The run's
``config.json`` is merged over today's defaults (:func:`load_run_config`), so older runs that
lack newer keys evaluate with the defaults.
"""

from __future__ import annotations

import dataclasses
import functools
import json
import logging as std_logging
import os
import sys
import time
import warnings
from typing import Any, Iterator, Mapping, Sequence

import flax.linen as nn
import flax.serialization
import flax.traverse_util
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax
import orbax.checkpoint as ocp
import tensorflow as tf
from absl import app
from absl import flags
from absl import logging
from clu import metric_writers
from ml_collections import config_flags

from bt_jax import checkpoint
from bt_jax import config as config_lib
from bt_jax import data

PROTOCOLS = ("linear", "logreg", "knn", "finetune")
FEATURE_PROTOCOLS = ("logreg", "knn")  # protocols on representations extracted once
QUICK_PROTOCOLS = ("logreg", "knn")
LOGREG_C_GRID = (0.01, 0.1, 1.0)  # inverse L2 strengths tried on standardised features
LOGREG_VALIDATION_FRACTION = 0.1
SMALL_LOGREG_SIZE = 2**24  # train matrices with fewer entries are fitted single-threaded
FEATURE_BATCH_SIZE = 256  # images per forward pass when extracting representations
KNN_CHUNK_SIZE = 256  # test examples per similarity block: memory is chunk x num_train floats
# Raw pixels of a large dataset (ImageNet: 1.28M x 150k floats) cannot be held in memory: the
# baseline is skipped, with a note in the results, above this many bytes of train pixels.
RAW_PIXELS_MAX_BYTES = 4 * 2**30
# RandomResizedCrop + horizontal flip and nothing else: the training views of the linear and
# semi-supervised protocols (official evaluate.py), through the pretraining augmentation code
# with every other operation's probability at zero (skipped statically).
CROP_FLIP = data.ViewSpec(flip_prob=0.5, jitter_prob=0.0, grayscale_prob=0.0, blur_prob=0.0,
                          solarize_prob=0.0)
_AUGMENT_SALT = 0xE7A1  # decorrelates evaluation crops from the pretraining views of a seed
_HEAD_SALT = 0x4EAD  # the classifier's initialisation key, folded into config.seed


# ---------------------------------------------------------------------------------------------
# Errors.


class EvaluationError(ValueError):
    """Something about the run or the request that makes evaluation impossible; says what to do."""


class NoCheckpointError(EvaluationError):
    """The workdir holds neither a checkpoint nor an exported backbone."""


class ArchitectureMismatchError(EvaluationError):
    """The saved backbone's variables do not fit the architecture the config describes."""


class UnlabelledSourceError(EvaluationError):
    """The dataset has no labels, which every protocol needs."""


def check_protocol(protocol: str) -> str:
    if protocol not in PROTOCOLS:
        raise EvaluationError(
            f"Unknown protocol {protocol!r}. Known protocols: {', '.join(PROTOCOLS)}.")
    return protocol


def require_labels(source: data.Source) -> int:
    """The number of classes of a labelled source; UnlabelledSourceError otherwise."""
    if not source.num_classes:
        raise UnlabelledSourceError(
            f"The dataset {source.name!r} has no labels, and every evaluation protocol trains or "
            "scores a classifier. Evaluate on a labelled dataset of the same image size: "
            "--config.dataset=NAME [--config.data_dir=DIR] (an image folder needs one "
            "sub-folder per class).")
    return int(source.num_classes)


# ---------------------------------------------------------------------------------------------
# The run's config.


def load_run_config(workdir: str,
                    overrides: Mapping[str, Any] | None = None) -> ml_collections.ConfigDict:
    """The run's ``config.json`` merged over :func:`bt_jax.config.get_config` defaults.

    Older runs lack newer keys (``eval.*``, ...); they get today's defaults. Keys the run has
    and the defaults do not (removed since) are ignored with a warning. ``overrides`` maps
    dotted keys ("eval.knn_k") to values applied last, as ``--config.eval.knn_k=`` does.
    """
    config = config_lib.get_config()
    _merge_into(config, checkpoint.read_config(workdir).to_dict(), prefix="")
    for key, value in (overrides or {}).items():
        _set_dotted(config, key, value)
    validate_eval_config(config)
    return config


def _merge_into(config: ml_collections.ConfigDict, saved: Mapping[str, Any], prefix: str) -> None:
    for key, value in saved.items():
        if key not in config:
            logging.warning("Ignoring config.%s%s from the run: no such key any more.", prefix, key)
        elif isinstance(config[key], ml_collections.ConfigDict) and isinstance(value, Mapping):
            _merge_into(config[key], value, prefix=f"{prefix}{key}.")
        else:
            try:
                config[key] = value
            except TypeError as error:
                raise config_lib.ConfigError(
                    f"config.{prefix}{key}={value!r} in the run's config.json does not fit the "
                    f"current schema ({error}). Fix config.json or override the key with "
                    f"--config.{prefix}{key}=...") from None


def _set_dotted(config: ml_collections.ConfigDict, key: str, value: Any) -> None:
    *parents, leaf = key.split(".")
    node = config
    for part in parents:
        node = node[part]
    node[leaf] = value


def validate_eval_config(config: ml_collections.ConfigDict) -> None:
    """Checks the ``eval.*`` keys the protocols read; ConfigError naming the key otherwise."""
    ev = config.eval

    def require(ok: bool, key: str, what: str) -> None:
        if not ok:
            raise config_lib.ConfigError(f"config.eval.{key}={ev[key]!r}: {what}")

    for key in ("linear_epochs", "linear_batch_size", "knn_k", "finetune_epochs",
                "finetune_batch_size"):
        require(isinstance(ev[key], int) and ev[key] > 0, key, "must be a positive integer.")
    for key in ("linear_learning_rate", "knn_temperature", "finetune_backbone_learning_rate",
                "finetune_head_learning_rate"):
        require(ev[key] > 0, key, "must be > 0.")
    require(ev.linear_weight_decay >= 0, "linear_weight_decay", "must be >= 0.")
    require(len(ev.label_fractions) > 0 and all(0 < f <= 1 for f in ev.label_fractions),
            "label_fractions", "must be a non-empty list of fractions in (0, 1], e.g. (0.01, 0.1).")


def load_labelled_source(config: ml_collections.ConfigDict) -> data.Source:
    source = data.load_source(config.dataset, config.data_dir or None)
    require_labels(source)
    return source


# ---------------------------------------------------------------------------------------------
# The backbone: built from the config, restored from a checkpoint, or randomly initialised.


def _train_module():
    # Imported on first use, not with this module: bt_jax.train defines its absl flags at import
    # and reads sys.argv's --config.* overrides then, so importing it before this tool's own
    # flags are checked turns a mistyped --config.eval.KEY into a traceback.
    from bt_jax import train

    return train


def build_backbone(config: ml_collections.ConfigDict) -> nn.Module:
    """The run's backbone module, single-device (no axis_name): the trainer's own builder."""
    return _train_module().build_model(config, axis_name=None).backbone


def _init_backbone(config: ml_collections.ConfigDict) -> dict:
    # train.init_state itself, so the random-init baseline is the run's step-0 backbone
    # (parameters from config.seed, BatchNorm running statistics at their initial 0 / 1).
    train = _train_module()
    model = train.build_model(config, axis_name=None)
    state = train.init_state(config, model, optax.identity())
    return {"params": state.params["backbone"], "batch_stats": state.batch_stats["backbone"]}


# The config fields that determine the initial backbone.
_INIT_FIELDS = ("seed", "model", "stem", "width", "zero_init_residual", "dtype", "projector",
                "image_size")


def random_init_variables(config: ml_collections.ConfigDict) -> dict:
    """The randomly initialised backbone of the run: {"params", "batch_stats"}, numpy leaves.

    Cached per architecture and seed: its compilation costs seconds, and a process evaluating
    several protocols or checkpoints of one run needs the same baseline each time.
    """
    return _cached_random_init(json.dumps({key: config[key] for key in _INIT_FIELDS},
                                          sort_keys=True))


@functools.lru_cache(maxsize=2)
def _cached_random_init(fields: str) -> dict:
    config = config_lib.get_config()
    config.update(json.loads(fields))
    # Jitted (one compilation, not one per distinct eager op), and without XLA's backend
    # optimisations: compiling the ~100 threefry normal draws of a ResNet-18 takes 9.5 s at the
    # default level and 1.5 s at level 0 on a CPU, and this program runs once. The draws are the
    # same; rounding in the normal transform may move a value by 1 ulp (so does jit vs eager).
    init = jax.jit(functools.partial(_init_backbone, config)).lower()
    return jax.device_get(init.compile({"xla_backend_optimization_level": 0})())


def _shapes(tree: Any) -> dict[str, tuple[int, ...]]:
    flat = flax.traverse_util.flatten_dict(_plain(tree), sep="/")
    return {key: tuple(np.shape(value)) for key, value in flat.items()}


def _plain(tree: Any) -> Any:
    """Nested dicts all the way down (FrozenDicts and orbax mappings included)."""
    if isinstance(tree, Mapping):
        return {key: _plain(value) for key, value in tree.items()}
    return tree


def check_architecture(variables: Mapping[str, Any], config: ml_collections.ConfigDict,
                       where: str) -> None:
    """ArchitectureMismatchError unless ``variables`` has the shapes of the config's backbone.

    The expected shapes come from ``jax.eval_shape`` of the initialisation: nothing is computed.
    """
    expected = _shapes(jax.eval_shape(functools.partial(_init_backbone, config)))
    # Parameters before BatchNorm statistics: the first differences shown are the telling ones.
    expected = dict(sorted(expected.items(), key=lambda item: item[0].startswith("batch_stats")))
    got = _shapes(variables)
    problems = [f"{key} is {got[key]} there but {shape} for the config"
                for key, shape in expected.items() if key in got and got[key] != shape]
    problems += [f"{key} is missing there" for key in expected if key not in got]
    problems += [f"{key} is there but not in the config's backbone" for key in got
                 if key not in expected]
    if problems:
        shown = "; ".join(problems[:3]) + (f"; and {len(problems) - 3} more" if
                                            len(problems) > 3 else "")
        raise ArchitectureMismatchError(
            f"The backbone in {where} is not the architecture the config describes "
            f"(model={config.model}, width={config.width}, stem={config.stem}): {shown}. The "
            "workdir's config.json must be the one the run was trained with: restore it, or "
            "pass the run's values (--config.model=, --config.width=, --config.stem=).")


def _checkpoint_dir(workdir: str) -> str:
    return os.path.join(os.path.abspath(workdir), "checkpoints")


def _read_manager(workdir: str) -> ocp.CheckpointManager:
    # A manager of our own, not checkpoint.checkpoint_manager: that one creates the directory,
    # prunes to keep_checkpoints and cleans temporary directories, and a training run may be
    # writing into this workdir right now. This one never deletes or creates anything.
    options = ocp.CheckpointManagerOptions(create=False, cleanup_tmp_directories=False)
    return ocp.CheckpointManager(_checkpoint_dir(workdir), options=options,
                                 item_handlers=ocp.PyTreeCheckpointHandler())


def checkpoint_steps(workdir: str) -> list[int]:
    """The steps of the orbax checkpoints in ``workdir/checkpoints`` (sorted; [] if none)."""
    if not os.path.isdir(_checkpoint_dir(workdir)):
        return []
    manager = _read_manager(workdir)
    try:
        return sorted(int(step) for step in manager.all_steps())
    finally:
        manager.close()


def restore_variables(workdir: str, step: int, part: str | None = "backbone") -> dict:
    """{"params", "batch_stats"} at checkpoint ``step``, as numpy arrays: of the backbone
    (``part="backbone"``), the projector, or the whole model (``part=None``).

    Restored without a target: only those subtrees are read, whatever else the TrainState held
    when it was saved (optimiser state, probe, fields added later), and whatever devices it was
    saved from.
    """
    manager = _read_manager(workdir)
    try:
        metadata = manager.item_metadata(step)
        try:
            wanted = {key: (metadata[key] if part is None else {part: metadata[key][part]})
                      for key in ("params", "batch_stats")}
        except (KeyError, TypeError):
            raise ArchitectureMismatchError(
                f"The checkpoint {_checkpoint_dir(workdir)}/{step} holds no params/{part} and "
                f"batch_stats/{part}: it is not a bt_jax pretraining checkpoint.") from None
        restore_args = jax.tree.map(lambda _: ocp.RestoreArgs(restore_type=np.ndarray), wanted)
        restored = manager.restore(step, args=ocp.args.PyTreeRestore(
            item=wanted, restore_args=restore_args, partial_restore=True))
    finally:
        manager.close()
    restored = _plain(restored)
    if part is None:
        return restored
    return {key: restored[key][part] for key in ("params", "batch_stats")}


def restore_backbone(workdir: str, step: int) -> dict:
    """{"params", "batch_stats"} of the backbone at checkpoint ``step``, as numpy arrays."""
    return restore_variables(workdir, step, "backbone")


def _read_exported_backbone(path: str) -> dict:
    with open(path, "rb") as f:
        payload = flax.serialization.msgpack_restore(f.read())
    return _plain(payload["variables"])


def load_backbone_variables(workdir: str, config: ml_collections.ConfigDict,
                            step: int | None = None) -> tuple[dict, int | None]:
    """(variables {"params", "batch_stats"}, the checkpoint step or None for backbone.msgpack).

    The latest checkpoint (or ``step``); without checkpoints, the exported backbone.msgpack.
    Raises NoCheckpointError when there is neither (or no such step), and
    ArchitectureMismatchError when the variables do not fit the config's backbone.
    """
    steps = checkpoint_steps(workdir)
    exported = os.path.join(workdir, checkpoint.BACKBONE_FILE)
    if step is not None and step not in steps:
        raise NoCheckpointError(
            f"There is no checkpoint of step {step} in {_checkpoint_dir(workdir)} (steps there: "
            f"{steps or 'none'}). Pass one of those to --step, or leave --step out for the "
            "latest; raise config.keep_checkpoints when pretraining to keep more.")
    if steps:
        step = steps[-1] if step is None else step
        variables, where = restore_backbone(workdir, step), f"{_checkpoint_dir(workdir)}/{step}"
    elif os.path.exists(exported):
        variables, where = _read_exported_backbone(exported), exported
    else:
        raise NoCheckpointError(
            f"Nothing to evaluate in {workdir}: no checkpoint in {_checkpoint_dir(workdir)} and no "
            f"{checkpoint.BACKBONE_FILE}. Pretrain first (python -m bt_jax.train "
            f"--workdir={workdir}); a run saves a checkpoint every config.checkpoint_every_steps "
            "steps and exports the backbone at its end.")
    check_architecture(variables, config, where)
    return variables, step


# ---------------------------------------------------------------------------------------------
# Representations.


def _on_device(tree: Any) -> Any:
    """One local device's copy: a replicated multi-device array (the trainer's state) would
    otherwise make every jitted evaluation run redundantly on all devices."""
    return jax.device_put(jax.device_get(tree), jax.local_devices()[0])


def _pad_batch(images: np.ndarray, size: int) -> np.ndarray:
    """[b, ...] -> [size, ...] with zero images after the b real ones (one compiled shape)."""
    if len(images) == size:
        return images
    padding = np.zeros((size - len(images),) + images.shape[1:], images.dtype)
    return np.concatenate([images, padding])


@functools.partial(jax.jit, static_argnums=0)
def _represent(module: nn.Module, variables: dict, images: jax.Array) -> jax.Array:
    return module.apply(variables, images, train=False).astype(jnp.float32)


def _eval_batches(source: data.Source, split: str,
                  config: ml_collections.ConfigDict) -> Iterator[tuple[np.ndarray, np.ndarray]]:
    return data.eval_batches(source, split=split, batch_size=FEATURE_BATCH_SIZE,
                             image_size=config.image_size, resize_size=config.eval_resize)


def extract_features(module: nn.Module, variables: Mapping[str, Any], source: data.Source,
                     split: str,
                     config: ml_collections.ConfigDict) -> tuple[np.ndarray, np.ndarray]:
    """Pooled representations of every example of ``split`` ("train" or "test").

    Evaluation transform (resize to ``config.eval_resize``, centre crop ``config.image_size``),
    backbone in inference mode, batches of FEATURE_BATCH_SIZE through one jitted forward.
    Returns (features float32 [N, F], labels int32 [N]).
    """
    variables = _on_device(variables)
    features, labels = [], []
    for images, batch_labels in _eval_batches(source, split, config):
        out = _represent(module, variables, _pad_batch(images, FEATURE_BATCH_SIZE))
        features.append(np.asarray(out[:len(images)]))
        labels.append(batch_labels)
    return np.concatenate(features).astype(np.float32), np.concatenate(labels).astype(np.int32)


def extract_pixels(source: data.Source, split: str,
                   config: ml_collections.ConfigDict) -> tuple[np.ndarray, np.ndarray]:
    """Raw pixels (evaluation transform, flattened): (float32 [N, H * W * 3], labels int32 [N])."""
    pixels, labels = [], []
    for images, batch_labels in _eval_batches(source, split, config):
        pixels.append(images.reshape(len(images), -1))
        labels.append(batch_labels)
    return np.concatenate(pixels).astype(np.float32), np.concatenate(labels).astype(np.int32)


def _labelled(features: np.ndarray, labels: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Drops examples without a label (-1: images at the root of an image folder)."""
    keep = labels >= 0
    return features[keep], labels[keep]


# ---------------------------------------------------------------------------------------------
# Accuracy.


def topk_accuracy(scores: np.ndarray, labels: np.ndarray,
                  ks: Sequence[int] = (1, 5)) -> dict[str, float]:
    """{"top1": ..., "top5": ...}: fraction of rows whose label is among the k highest scores.

    scores: [N, C]; labels: int [N]. k is clipped to C (top-5 of 3 classes is 1.0).
    """
    scores, labels = np.asarray(scores), np.asarray(labels)
    order = np.argsort(-scores, axis=1, kind="stable")
    results = {}
    for k in ks:
        hit = np.any(order[:, :min(k, scores.shape[1])] == labels[:, None], axis=1)
        results[f"top{k}"] = float(np.mean(hit)) if len(labels) else float("nan")
    return results


# ---------------------------------------------------------------------------------------------
# kNN.


def _l2_normalize(x: jax.Array) -> jax.Array:
    return x / jnp.maximum(jnp.linalg.norm(x, axis=-1, keepdims=True), 1e-12)


@functools.partial(jax.jit, static_argnames=("num_classes", "k", "chunk_size"))
def _knn_scores(train_features, train_labels, test_features, temperature, *, num_classes, k,
                chunk_size):
    train_features = _l2_normalize(train_features)
    test_features = _l2_normalize(test_features)

    def chunk_scores(queries):  # [chunk, F] -> [chunk, C]
        similarity = jnp.matmul(queries, train_features.T, precision=jax.lax.Precision.HIGHEST)
        top_similarity, top_index = jax.lax.top_k(similarity, k)  # [chunk, k]
        weights = jnp.exp(top_similarity / temperature)
        votes = jax.nn.one_hot(train_labels[top_index], num_classes) * weights[..., None]
        return jnp.sum(votes, axis=1)

    chunks = test_features.reshape(-1, chunk_size, test_features.shape[-1])
    return jax.lax.map(chunk_scores, chunks).reshape(-1, num_classes)


def knn_scores(train_features: np.ndarray, train_labels: np.ndarray, test_features: np.ndarray,
               *, num_classes: int, k: int, temperature: float,
               chunk_size: int = KNN_CHUNK_SIZE) -> np.ndarray:
    """Weighted kNN class scores: float32 [M, num_classes].

    train_features [N, F], train_labels int [N] in [0, num_classes), test_features [M, F].
    Both sides are L2-normalised; each test example's k most cosine-similar train examples
    (k clipped to N) vote for their class with weight exp(similarity / temperature). The test
    side is processed chunk_size examples at a time (memory: chunk_size x N similarities).
    """
    k = min(int(k), len(train_features))
    num_test = len(test_features)
    chunk_size = max(1, min(chunk_size, num_test))
    padded = _pad_batch(np.asarray(test_features, np.float32),
                        -(-num_test // chunk_size) * chunk_size)
    scores = _knn_scores(jnp.asarray(train_features, jnp.float32),
                         jnp.asarray(train_labels, jnp.int32), padded,
                         jnp.float32(temperature), num_classes=int(num_classes), k=k,
                         chunk_size=chunk_size)
    return np.asarray(scores[:num_test])


def knn_protocol(train_features: np.ndarray, train_labels: np.ndarray, test_features: np.ndarray,
                 test_labels: np.ndarray, *, num_classes: int, k: int,
                 temperature: float) -> dict[str, float]:
    """{"top1", "top5", "k"}: weighted kNN (see :func:`knn_scores`) accuracy on the test set."""
    train_features, train_labels = _labelled(train_features, train_labels)
    test_features, test_labels = _labelled(test_features, test_labels)
    scores = knn_scores(train_features, train_labels, test_features, num_classes=num_classes,
                        k=k, temperature=temperature)
    return {**topk_accuracy(scores, test_labels), "k": min(int(k), len(train_features))}


# ---------------------------------------------------------------------------------------------
# Logistic regression (scikit-learn).


def _fit_logreg(x: np.ndarray, y: np.ndarray, c: float):
    from sklearn.exceptions import ConvergenceWarning
    from sklearn.linear_model import LogisticRegression

    from threadpoolctl import threadpool_limits

    # On small problems lbfgs is a long series of small BLAS calls, where thread hand-offs cost
    # more than they save (15x slower with two threads on a busy 2-core machine): one thread.
    threads = 1 if x.size < SMALL_LOGREG_SIZE else None
    with warnings.catch_warnings(), threadpool_limits(threads, user_api="blas"):
        # lbfgs stopping at max_iter is normal on near-separable data: accuracy has converged.
        warnings.simplefilter("ignore", ConvergenceWarning)
        return LogisticRegression(C=c, max_iter=1000).fit(x, y)


def _choose_c(x: np.ndarray, y: np.ndarray, c_grid: Sequence[float], seed: int) -> float:
    """The C of c_grid with the best accuracy on a stratified held-out part of the train set."""
    from sklearn.model_selection import train_test_split

    if len(c_grid) == 1:
        return float(c_grid[0])
    try:
        x_fit, x_val, y_fit, y_val = train_test_split(
            x, y, test_size=LOGREG_VALIDATION_FRACTION, stratify=y, random_state=seed)
    except ValueError:  # a class with a single example cannot be stratified
        return 1.0
    scores = [_fit_logreg(x_fit, y_fit, c).score(x_val, y_val) for c in c_grid]
    return float(c_grid[int(np.argmax(scores))])


def logreg_protocol(train_x: np.ndarray, train_y: np.ndarray, test_x: np.ndarray,
                    test_y: np.ndarray, *, num_classes: int | None = None,
                    c_grid: Sequence[float] = LOGREG_C_GRID, seed: int = 0) -> dict[str, float]:
    """{"top1", "top5", "C"}: multinomial logistic regression on standardised features.

    train_x [N, F], test_x [M, F] (representations or pixels); labels int. Each feature is
    standardised with the train mean / std; C (inverse L2 strength) is chosen from c_grid on a
    stratified 10% of the train set (seeded), then the model is refit on the whole train set.
    """
    from sklearn.preprocessing import StandardScaler

    train_x, train_y = _labelled(train_x, train_y)
    test_x, test_y = _labelled(test_x, test_y)
    scaler = StandardScaler().fit(train_x)
    train_x, test_x = scaler.transform(train_x), scaler.transform(test_x)
    c = _choose_c(train_x, train_y, c_grid, seed)
    model = _fit_logreg(train_x, train_y, c)
    num_classes = num_classes or int(max(train_y.max(), test_y.max())) + 1
    scores = np.full((len(test_x), num_classes), -np.inf)
    scores[:, model.classes_] = model.predict_proba(test_x)
    return {**topk_accuracy(scores, test_y), "C": c}


# ---------------------------------------------------------------------------------------------
# Training a classifier: batches with crop + flip, the head.


def _train_labels(split: data.Split) -> np.ndarray:
    if split.labels is not None:
        return split.labels
    # A tfds data source read from disk: the labels come with the records; read them once and
    # keep them on the split (its reads go through data_source, which this does not change).
    logging.info("Reading the labels of %d examples.", split.num_examples)
    chunks = [split.fetch(np.arange(start, min(start + 4096, split.num_examples)))[1]
              for start in range(0, split.num_examples, 4096)]
    split.labels = np.concatenate(chunks).astype(np.int32)
    return split.labels


def labelled_train_indices(source: data.Source) -> np.ndarray:
    """Indices int64 of the train-split examples that have a label."""
    indices = np.flatnonzero(_train_labels(source.split("train")) >= 0)
    if len(indices) == 0:
        raise UnlabelledSourceError(
            f"No example of the train split of {source.name!r} has a label: nothing to train a "
            "classifier on. Put the images in one sub-folder per class, or use another dataset.")
    return indices


def augmented_batches(source: data.Source, indices: np.ndarray, *, batch_size: int,
                      image_size: int, seed: int, num_epochs: int,
                      min_crop_scale: float = 0.08) -> Iterator[tuple[np.ndarray, np.ndarray]]:
    """num_epochs epochs over the train-split examples ``indices``, crop + flip views.

    Each epoch is a fresh permutation of indices (numpy default_rng([seed, epoch])) cut into
    len(indices) // batch_size full batches (the remainder is dropped: fixed shapes, and no
    tiny batch for train-mode BatchNorm). Each view's crop and flip come from a seed of (seed,
    epoch, example index), so the stream is the same bytes on every run.
    Yields (images float32 [batch_size, image_size, image_size, 3], labels int32 [batch_size]).
    """
    indices = np.asarray(indices, np.int64)
    steps_per_epoch = len(indices) // batch_size
    if steps_per_epoch == 0:
        raise EvaluationError(f"batch_size {batch_size} is larger than the {len(indices)} "
                              "training examples; use a smaller batch size.")
    read = source.split("train").reader()

    @functools.lru_cache(maxsize=2)
    def epoch_order(epoch: int) -> np.ndarray:
        return indices[np.random.default_rng([seed, epoch]).permutation(len(indices))]

    def step_indices(step):
        epoch, position = divmod(int(step), steps_per_epoch)
        batch = epoch_order(epoch)[position * batch_size:(position + 1) * batch_size]
        return np.int64(epoch), batch

    def read_step(step):
        epoch, idx = tf.numpy_function(step_indices, [step], [tf.int64, tf.int64], stateful=False)
        idx = tf.ensure_shape(idx, [batch_size])
        images, labels = read(idx)
        return tf.fill([batch_size], tf.ensure_shape(epoch, [])), idx, images, labels

    def crop_flip(epoch, index, image, label):
        view_seed = tf.random.experimental.stateless_fold_in(
            data.view_seed(seed, epoch, index, "a"), _AUGMENT_SALT, alg="philox")
        return data.augment_view(image, view_seed, view=CROP_FLIP, image_size=image_size,
                                 min_crop_scale=min_crop_scale), label

    ds = tf.data.Dataset.range(num_epochs * steps_per_epoch).map(read_step).unbatch()
    ds = ds.map(crop_flip, num_parallel_calls=tf.data.AUTOTUNE, deterministic=True)
    options = tf.data.Options()
    options.deterministic = True
    # Single-threaded ops, as in pretraining: float results cannot depend on the core count.
    options.threading.max_intra_op_parallelism = 1
    ds = ds.batch(batch_size, drop_remainder=True).prefetch(tf.data.AUTOTUNE).with_options(options)
    yield from ds.as_numpy_iterator()


@functools.lru_cache(maxsize=None)
def linear_head(num_classes: int) -> nn.Dense:
    """The classifier: weights N(0, 0.01), bias 0 (official evaluate.py).

    Cached: the initialisers are new closures on every call, and the jitted functions that take
    the head as a static argument would otherwise compile again for each call.
    """
    return nn.Dense(num_classes, kernel_init=nn.initializers.normal(0.01),
                    bias_init=nn.initializers.zeros)


def _init_head(head: nn.Dense, num_features: int, seed: int) -> dict:
    key = jax.random.fold_in(jax.random.key(seed), _HEAD_SALT)
    return head.init(key, jnp.zeros((1, num_features), jnp.float32))["params"]


def classifier_accuracy(module: nn.Module, head: nn.Dense, variables: Mapping[str, Any],
                        head_params: Mapping[str, Any], source: data.Source,
                        config: ml_collections.ConfigDict) -> dict[str, float]:
    """{"top1", "top5"} of backbone (inference mode) + head on the test split (eval transform).

    Through extract_features: the backbone's forward is compiled once for every protocol.
    """
    features, labels = _labelled(*extract_features(module, variables, source, "test", config))
    logits = head.apply({"params": head_params}, features)
    return topk_accuracy(np.asarray(logits), labels)


def _cross_entropy(logits: jax.Array, labels: jax.Array) -> jax.Array:
    return jnp.mean(optax.softmax_cross_entropy_with_integer_labels(logits, labels))


# ---------------------------------------------------------------------------------------------
# The linear protocol.


def linear_optimizer(learning_rate: float, weight_decay: float, num_epochs: int,
                     steps_per_epoch: int) -> optax.GradientTransformation:
    """SGD momentum 0.9 with weight decay (added to the gradient, as torch.optim.SGD does) and a
    cosine learning rate that changes once per epoch (CosineAnnealingLR(T_max=epochs))."""
    cosine = optax.cosine_decay_schedule(learning_rate, decay_steps=num_epochs)
    schedule = lambda count: cosine(count // steps_per_epoch)  # noqa: E731
    return optax.chain(optax.add_decayed_weights(weight_decay),
                       optax.sgd(schedule, momentum=0.9))


@functools.lru_cache(maxsize=16)
def _linear_trainer(head: nn.Dense, learning_rate: float, weight_decay: float, num_epochs: int,
                    steps_per_epoch: int):
    """(tx, jitted step of the head); cached so the pretrained and baseline runs share one
    compilation."""
    tx = linear_optimizer(learning_rate, weight_decay, num_epochs, steps_per_epoch)

    @jax.jit
    def step(head_params, opt_state, representation, labels):
        def loss_fn(params):
            return _cross_entropy(head.apply({"params": params}, representation), labels)

        loss, grads = jax.value_and_grad(loss_fn)(head_params)
        updates, opt_state = tx.update(grads, opt_state, head_params)
        return optax.apply_updates(head_params, updates), opt_state, loss

    return tx, step


def linear_protocol(config: ml_collections.ConfigDict, module: nn.Module,
                    variables: Mapping[str, Any], source: data.Source) -> dict[str, float]:
    """The paper's linear evaluation: {"top1", "top5", "epochs", "train_examples"}.

    A linear classifier on the frozen backbone's pooled representation, trained for
    config.eval.linear_epochs epochs on crop + flip views of the labelled train split.
    """
    num_classes = require_labels(source)
    ev = config.eval
    indices = labelled_train_indices(source)
    batch_size = min(ev.linear_batch_size, len(indices))
    steps_per_epoch = len(indices) // batch_size
    head = linear_head(num_classes)
    tx, step = _linear_trainer(head, float(ev.linear_learning_rate),
                               float(ev.linear_weight_decay), int(ev.linear_epochs),
                               steps_per_epoch)
    variables = _on_device(variables)
    head_params = _init_head(head, module.num_features, config.seed)
    opt_state = tx.init(head_params)
    losses = []
    for i, (images, labels) in enumerate(augmented_batches(
            source, indices, batch_size=batch_size, image_size=config.image_size,
            seed=config.seed, num_epochs=ev.linear_epochs)):
        # The frozen backbone in inference mode (running BatchNorm statistics, no gradient),
        # through the forward that extract_features compiled: one backbone compilation serves
        # training, testing and the other protocols; only the small head step is added.
        representation = _represent(module, variables, images)
        head_params, opt_state, loss = step(head_params, opt_state, representation, labels)
        losses.append(loss)
        if (i + 1) % steps_per_epoch == 0:
            logging.info("linear: epoch %d/%d, loss %.4f", (i + 1) // steps_per_epoch,
                         ev.linear_epochs, float(np.mean(jax.device_get(losses))))
            losses = []
    accuracy = classifier_accuracy(module, head, variables, head_params, source, config)
    return {**accuracy, "epochs": int(ev.linear_epochs), "train_examples": int(len(indices))}


# ---------------------------------------------------------------------------------------------
# The semi-supervised (fine-tuning) protocol.


def label_subset(labels: np.ndarray, fraction: float, seed: int) -> np.ndarray:
    """Sorted indices int64 of a class-balanced subset holding about ``fraction`` of the labels.

    Per class c (labels -1 are never chosen): the first max(1, round(fraction * n_c)) of a
    permutation of that class's examples seeded by (seed, c). A pure function of its arguments,
    and nested: a smaller fraction's subset is inside a larger one's.
    """
    labels = np.asarray(labels)
    chosen = []
    for c in np.unique(labels[labels >= 0]):
        members = np.flatnonzero(labels == c)
        count = max(1, int(round(fraction * len(members))))
        order = np.random.default_rng([seed, int(c)]).permutation(len(members))
        chosen.append(members[order[:count]])
    return np.sort(np.concatenate(chosen)).astype(np.int64)


def finetune_optimizer(backbone_learning_rate: float, head_learning_rate: float, num_epochs: int,
                       steps_per_epoch: int) -> optax.GradientTransformation:
    """SGD momentum 0.9, no weight decay; params {"backbone", "head"} with their own learning
    rates, both multiplied by 0.2 after 60% and 80% of the epochs (the paper: 12 and 16 of 20).
    """
    boundaries = {int(round(f * num_epochs)) * steps_per_epoch: 0.2 for f in (0.6, 0.8)}

    def sgd(learning_rate):
        return optax.sgd(optax.piecewise_constant_schedule(learning_rate, boundaries),
                         momentum=0.9)

    return optax.multi_transform(
        {"backbone": sgd(backbone_learning_rate), "head": sgd(head_learning_rate)},
        {"backbone": "backbone", "head": "head"})


@functools.lru_cache(maxsize=16)
def _finetune_trainer(module: nn.Module, head: nn.Dense, backbone_learning_rate: float,
                      head_learning_rate: float, num_epochs: int, steps_per_epoch: int):
    """(tx, jitted step); cached so the pretrained and baseline runs share one compilation."""
    tx = finetune_optimizer(backbone_learning_rate, head_learning_rate, num_epochs,
                            steps_per_epoch)

    @jax.jit
    def step(params, batch_stats, opt_state, images, labels):
        def loss_fn(params):
            # Train-mode BatchNorm on this (single-device) batch, running averages updated.
            representation, updates = module.apply(
                {"params": params["backbone"], "batch_stats": batch_stats}, images, train=True,
                mutable=["batch_stats"])
            logits = head.apply({"params": params["head"]}, representation.astype(jnp.float32))
            return _cross_entropy(logits, labels), updates["batch_stats"]

        (loss, batch_stats), grads = jax.value_and_grad(loss_fn, has_aux=True)(params)
        updates, opt_state = tx.update(grads, opt_state, params)
        return optax.apply_updates(params, updates), batch_stats, opt_state, loss

    return tx, step


def fraction_name(fraction: float) -> str:
    """0.01 -> "1%", 0.1 -> "10%", 0.005 -> "0.5%"."""
    return f"{fraction * 100:g}%"


def finetune_subset(config: ml_collections.ConfigDict, module: nn.Module,
                    variables: Mapping[str, Any], source: data.Source,
                    indices: np.ndarray) -> dict[str, float]:
    """Fine-tunes backbone + a new head on the train examples ``indices``; test accuracy."""
    num_classes = require_labels(source)
    ev = config.eval
    batch_size = min(ev.finetune_batch_size, len(indices))
    steps_per_epoch = len(indices) // batch_size
    head = linear_head(num_classes)
    tx, step = _finetune_trainer(module, head, float(ev.finetune_backbone_learning_rate),
                                 float(ev.finetune_head_learning_rate), int(ev.finetune_epochs),
                                 steps_per_epoch)
    variables = _on_device(variables)
    params = {"backbone": variables["params"],
              "head": _init_head(head, module.num_features, config.seed)}
    batch_stats = variables["batch_stats"]
    opt_state = tx.init(params)
    for images, labels in augmented_batches(
            source, indices, batch_size=batch_size, image_size=config.image_size,
            seed=config.seed, num_epochs=ev.finetune_epochs):
        params, batch_stats, opt_state, loss = step(params, batch_stats, opt_state, images, labels)
    logging.info("finetune on %d examples: last loss %.4f", len(indices), float(loss))
    tuned = {"params": params["backbone"], "batch_stats": batch_stats}
    return classifier_accuracy(module, head, tuned, params["head"], source, config)


def finetune_protocol(config: ml_collections.ConfigDict, module: nn.Module,
                      variables: Mapping[str, Any], source: data.Source) -> dict[str, dict]:
    """The paper's semi-supervised protocol on each of config.eval.label_fractions.

    Returns {"1%": {"top1", "top5", "num_labelled"}, "10%": {...}, ...}; the subsets come from
    :func:`label_subset` with config.seed.
    """
    require_labels(source)
    labels = _train_labels(source.split("train"))
    labelled_train_indices(source)  # fails clearly when no example has a label
    results = {}
    for fraction in config.eval.label_fractions:
        indices = label_subset(labels, fraction, config.seed)
        accuracy = finetune_subset(config, module, variables, source, indices)
        results[fraction_name(fraction)] = {**accuracy, "num_labelled": int(len(indices))}
    return results


# ---------------------------------------------------------------------------------------------
# Running protocols on backbones.


def feature_protocols(protocols: Sequence[str], config: ml_collections.ConfigDict,
                      train_set: tuple[np.ndarray, np.ndarray],
                      test_set: tuple[np.ndarray, np.ndarray],
                      num_classes: int) -> dict[str, dict]:
    """logreg and / or knn on representations (or pixels) already extracted: {protocol: {...}}.

    train_set, test_set: (features float32 [N, F], labels int32 [N]).
    """
    results = {}
    for protocol in protocols:
        if protocol == "logreg":
            results[protocol] = logreg_protocol(*train_set, *test_set, num_classes=num_classes,
                                                seed=config.seed)
        elif protocol == "knn":
            results[protocol] = knn_protocol(*train_set, *test_set, num_classes=num_classes,
                                             k=config.eval.knn_k,
                                             temperature=config.eval.knn_temperature)
        else:
            raise EvaluationError(f"{protocol!r} is not a protocol on extracted features "
                                  f"({', '.join(FEATURE_PROTOCOLS)}).")
    return results


def run_protocols(protocols: Sequence[str], config: ml_collections.ConfigDict,
                  module: nn.Module, variables: Mapping[str, Any],
                  source: data.Source) -> dict[str, dict]:
    """{protocol: results} for one backbone; representations are extracted once for all the
    feature protocols among ``protocols``."""
    for protocol in protocols:
        check_protocol(protocol)
    num_classes = require_labels(source)
    results = {}
    on_features = [p for p in protocols if p in FEATURE_PROTOCOLS]
    if on_features:
        train_set = extract_features(module, variables, source, "train", config)
        test_set = extract_features(module, variables, source, "test", config)
        results.update(feature_protocols(on_features, config, train_set, test_set, num_classes))
    if "linear" in protocols:
        results["linear"] = linear_protocol(config, module, variables, source)
    if "finetune" in protocols:
        results["finetune"] = finetune_protocol(config, module, variables, source)
    return {p: results[p] for p in protocols}


def raw_pixels_logreg(config: ml_collections.ConfigDict, source: data.Source) -> dict:
    """The logreg protocol on flattened, standardised pixels (or a note why it was skipped)."""
    num_classes = require_labels(source)
    size = source.num_examples("train") * config.image_size ** 2 * 3 * 4
    if size > RAW_PIXELS_MAX_BYTES:
        return {"skipped": f"the train pixels would take {size / 2**30:.1f} GiB"}
    return logreg_protocol(*extract_pixels(source, "train", config),
                           *extract_pixels(source, "test", config),
                           num_classes=num_classes, seed=config.seed)


def evaluate_quick(config: ml_collections.ConfigDict, backbone_module: nn.Module,
                   variables: Mapping[str, Any], source: data.Source) -> dict[str, dict]:
    """logreg and kNN on the given backbone and on the run's random-init backbone.

    Returns {"logreg": {"pretrained": {...}, "random_init": {...}}, "knn": {...}}; see
    :func:`summary_line` for a one-line report.
    """
    pretrained = run_protocols(QUICK_PROTOCOLS, config, backbone_module, variables, source)
    baseline = run_protocols(QUICK_PROTOCOLS, config, backbone_module,
                             random_init_variables(config), source)
    return {p: {"pretrained": pretrained[p], "random_init": baseline[p]} for p in QUICK_PROTOCOLS}


def summary_line(results: Mapping[str, Mapping[str, Any]]) -> str:
    """"linear probe (logreg) top-1 91.2% (random init 62.0%) | kNN top-1 ..." from
    {protocol: {"pretrained": {...}, "random_init": {...}, ...}}."""
    names = {"logreg": "linear probe (logreg)", "knn": "kNN", "linear": "linear"}
    parts = []
    for protocol, settings in results.items():
        if "top1" not in settings.get("pretrained", {}):
            continue
        text = f"{names.get(protocol, protocol)} top-1 {settings['pretrained']['top1']:.1%}"
        others = [f"{name.replace('_', ' ')} {value['top1']:.1%}"
                  for name, value in settings.items()
                  if name != "pretrained" and "top1" in value]
        parts.append(text + (f" ({', '.join(others)})" if others else ""))
    return " | ".join(parts)


# ---------------------------------------------------------------------------------------------
# Evaluating a workdir; results to JSON and TensorBoard.


def _scalars(protocol: str, results: Mapping[str, Mapping[str, Any]]) -> dict[str, float]:
    """eval/<protocol>[_<subset>]_top<k>[_<setting>] for every accuracy in results."""
    scalars = {}
    for setting, values in results.items():
        suffix = "" if setting == "pretrained" else f"_{setting}"
        flat = flax.traverse_util.flatten_dict(dict(values), sep="_")
        for key, value in flat.items():
            metric = key.split("_")[-1]
            if metric.startswith("top") and isinstance(value, float):
                key = key.replace("%", "pct")
                scalars[f"eval/{protocol}_{key}{suffix}"] = value
    return scalars


def write_json(path: str, payload: Any) -> None:
    tmp = path + ".tmp"
    with open(tmp, "w") as f:
        json.dump(payload, f, indent=2, sort_keys=True)
    os.replace(tmp, path)  # atomic: a reader never sees half a file


def write_scalars(workdir: str, step: int | None, scalars: Mapping[str, float]) -> None:
    writer = metric_writers.create_default_writer(
        workdir, just_logging=jax.process_index() != 0, asynchronous=False)
    writer.write_scalars(0 if step is None else int(step), dict(scalars))
    writer.flush()
    writer.close()


def results_path(workdir: str, protocol: str) -> str:
    return os.path.join(workdir, f"eval_{protocol}.json")


def _baselines(protocols: Sequence[str], config, module, source) -> dict[str, dict]:
    """{protocol: {"random_init": ..., ["raw_pixels": ...]}}, computed once."""
    random_init = run_protocols(protocols, config, module, random_init_variables(config), source)
    baselines = {p: {"random_init": random_init[p]} for p in protocols}
    if "logreg" in protocols:
        baselines["logreg"]["raw_pixels"] = raw_pixels_logreg(config, source)
    return baselines


def evaluate(workdir: str, protocol: str, *, step: int | None = None, baselines: bool = True,
             overrides: Mapping[str, Any] | None = None, write: bool = True) -> dict:
    """Runs one protocol on a pretraining run's backbone (and its baselines); returns the record
    written to ``WORKDIR/eval_<protocol>.json``:

        {"protocol", "step" (None: backbone.msgpack), "dataset", "model", "backbone" (the config
         fields of the architecture), "settings" (config.eval), "seconds",
         "results": {"pretrained": {...}, "random_init": {...}, "raw_pixels": {...} (logreg)}}
    """
    start = time.perf_counter()
    check_protocol(protocol)
    config = load_run_config(workdir, overrides)
    variables, step = load_backbone_variables(workdir, config, step)
    source = load_labelled_source(config)
    module = build_backbone(config)
    results = {"pretrained": run_protocols([protocol], config, module, variables, source)[protocol]}
    if baselines:
        results.update(_baselines([protocol], config, module, source)[protocol])
    record = _record(protocol, step, config, results, time.perf_counter() - start)
    if write and jax.process_index() == 0:
        write_json(results_path(workdir, protocol), record)
        write_scalars(workdir, step, _scalars(protocol, results))
    return record


def _record(protocol: str, step: int | None, config, results: dict, seconds: float) -> dict:
    return {
        "protocol": protocol,
        "step": step,
        "dataset": config.dataset,
        "model": config.model,
        "backbone": {key: config[key] for key in checkpoint.BACKBONE_FIELDS},
        "settings": config.eval.to_dict(),
        "results": results,
        "seconds": round(seconds, 3),
    }


def evaluate_checkpoints(workdir: str, protocols: Sequence[str] = QUICK_PROTOCOLS, *,
                         baselines: bool = True,
                         overrides: Mapping[str, Any] | None = None,
                         steps: Sequence[int] | None = None) -> list[dict]:
    """Every retained checkpoint of a run, for accuracy-over-training curves.

    Returns one record per step, oldest first: {"step", "results": {protocol: {"pretrained",
    "random_init", ...}}} (the baselines are computed once and repeated). Writes them to
    ``WORKDIR/eval_checkpoints.json`` and the accuracies to TensorBoard at each step. Only
    config.keep_checkpoints checkpoints are retained by pretraining: raise it for a denser curve.
    steps: a subset of the retained steps (default all of them).
    """
    start = time.perf_counter()
    protocols = [check_protocol(p) for p in protocols]
    config = load_run_config(workdir, overrides)
    retained = checkpoint_steps(workdir)
    if not retained:
        raise NoCheckpointError(
            f"No checkpoints in {_checkpoint_dir(workdir)}. Pretrain with python -m bt_jax.train "
            f"--workdir={workdir} (checkpoints every config.checkpoint_every_steps steps, "
            "config.keep_checkpoints of them kept).")
    missing = sorted(set(steps or ()) - set(retained))
    if missing:
        raise NoCheckpointError(f"No checkpoints of steps {missing} in {_checkpoint_dir(workdir)}; "
                                f"retained: {retained}.")
    steps = sorted(steps) if steps else retained
    module = build_backbone(config)
    load_backbone_variables(workdir, config, steps[-1])  # an architecture error before any work
    source = load_labelled_source(config)
    shared = _baselines(protocols, config, module, source) if baselines else {}
    records = []
    for step in steps:
        variables, _ = load_backbone_variables(workdir, config, step)
        pretrained = run_protocols(protocols, config, module, variables, source)
        results = {p: {"pretrained": pretrained[p], **shared.get(p, {})} for p in protocols}
        records.append({"step": step, "results": results})
        logging.info("step %d: %s", step, summary_line(results))
        if jax.process_index() == 0:
            scalars = {}
            for p in protocols:
                scalars.update(_scalars(p, results[p]))
            write_scalars(workdir, step, scalars)
    if jax.process_index() == 0:
        write_json(os.path.join(workdir, "eval_checkpoints.json"), {
            "protocols": protocols, "dataset": config.dataset, "model": config.model,
            "checkpoints": records, "seconds": round(time.perf_counter() - start, 3)})
    return records


# ---------------------------------------------------------------------------------------------
# Command line.


@dataclasses.dataclass
class CommandLine:
    workdir: str
    protocol: str
    step: int | None
    baselines: bool
    all_checkpoints: bool
    overrides: dict[str, Any]


def parse_args(argv: Sequence[str]) -> tuple[CommandLine, list[str]]:
    """(this tool's flags, the arguments left for absl's own flags such as --verbosity).

    A FlagValues of its own, not absl's global FLAGS: bt_jax.train defines --workdir and
    --config there, and a process (the trainer, the tests) may import both modules.
    """
    argv = list(argv)
    values = flags.FlagValues()
    flags.DEFINE_string("workdir", None, "The pretraining run to evaluate (its --workdir).",
                        flag_values=values)
    flags.DEFINE_string("protocol", "knn", f"One of: {', '.join(PROTOCOLS)}.", flag_values=values)
    flags.DEFINE_integer("step", None, "Checkpoint step to evaluate (default: the latest).",
                         flag_values=values)
    flags.DEFINE_bool("baselines", True, "Also evaluate a random-init backbone (and raw pixels "
                      "for logreg).", flag_values=values)
    flags.DEFINE_bool("all_checkpoints", False, "Evaluate every retained checkpoint "
                      "(eval_checkpoints.json, TensorBoard curves).", flag_values=values)
    # The defaults stand in for the run's config only to parse --config.KEY=VALUE overrides;
    # they are applied over the run's config.json (load_run_config).
    try:
        config_flags.DEFINE_config_dict(
            "config", config_lib.get_config(), "Override the run's config: "
            "--config.eval.KEY=VALUE.", flag_values=values, lock_config=True, sys_argv=argv)
    except AttributeError as error:  # what config_flags raises for an unknown key
        raise app.UsageError(
            f"No config key {error.args[0]} in the --config overrides; the evaluation keys are "
            f"{', '.join('eval.' + key for key in config_lib.get_config().eval)}.") from None
    if any(arg in ("-h", "--help", "--helpshort", "-?") for arg in argv[1:]):
        print(values.get_help())
        sys.exit(0)
    rest = values(argv, known_only=True)
    if values["workdir"].value is None:
        raise app.UsageError("--workdir is required: the pretraining run to evaluate.")
    overrides = {name.split(".", 1)[1]: values[name].value for name in values
                 if name.startswith("config.") and values[name].present}
    return CommandLine(workdir=values["workdir"].value, protocol=values["protocol"].value,
                       step=values["step"].value, baselines=values["baselines"].value,
                       all_checkpoints=values["all_checkpoints"].value, overrides=overrides), rest


def run_command_line(args: CommandLine) -> list[dict]:
    """Runs what the command line asked for; prints a summary; returns the records."""
    if args.all_checkpoints:
        records = evaluate_checkpoints(args.workdir, [args.protocol], baselines=args.baselines,
                                       overrides=args.overrides)
        for record in records:
            print(f"step {record['step']}: {summary_line(record['results'])}")
        return records
    record = evaluate(args.workdir, args.protocol, step=args.step, baselines=args.baselines,
                      overrides=args.overrides)
    step = "backbone.msgpack" if record["step"] is None else f"step {record['step']}"
    print(f"{args.protocol} ({step}): {json.dumps(record['results'])}")
    print(summary_line({args.protocol: record["results"]}))
    print(f"written to {results_path(args.workdir, args.protocol)}")
    return [record]


def _parse_flags(argv: list[str]) -> CommandLine:
    try:
        args, rest = parse_args(argv)
    except (app.UsageError, flags.Error) as error:
        sys.stderr.write(f"error: {error}\nPass --help to see the flags.\n")
        sys.exit(1)
    app.parse_flags_with_usage(rest)  # absl's own flags (--verbosity, ...); unknown ones fail
    return args


class _OnlyOurInfo(std_logging.Filter):
    """orbax logs every restore at INFO; keep library warnings and our own messages."""

    def filter(self, record: std_logging.LogRecord) -> bool:
        return record.levelno >= std_logging.WARNING or "bt_jax" in record.pathname


def main(args: CommandLine) -> None:
    logging.get_absl_handler().addFilter(_OnlyOurInfo())
    try:
        run_command_line(args)
    except (EvaluationError, config_lib.ConfigError, FileNotFoundError) as error:
        raise SystemExit(f"error: {error}") from None


if __name__ == "__main__":
    app.run(main, flags_parser=_parse_flags)
