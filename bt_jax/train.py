"""Barlow Twins pretraining: the data-parallel step and the loop around it.

    python -m bt_jax.train                                   # the embedded default -> ./runs/default
    python -m bt_jax.train --config=experiments/configs/cifar10_resnet18.py --workdir=runs/c10 \
        --config.batch_size=256

The step is one per-device function, :func:`train_step`, over the named axis ``"batch"``: both
views through the model with cross-device BatchNorm, the loss over the all-gathered global batch,
``pmean`` of the gradients (exactly the single-device gradient on the global batch, see
``bt_jax.loss``), the LARS update. It is mapped over the devices in two interchangeable ways:

* ``jax.jit(jax.shard_map(...))`` over a 1-D mesh of every device (``parallelism="shard_map"``,
  the trainer's default). The state is an ordinary replicated global ``jax.Array`` tree, which
  orbax checkpoints directly on one host or many, and the batch a global array assembled from
  each process's share; pmap is in maintenance mode and since JAX 0.10 is itself built this way.
* ``jax.pmap`` (``parallelism="pmap"``): the classic form, with the state replicated per device.

Both give the same numbers (``tests/test_train.py``). Everything random comes from
``config.seed``: parameter initialisation, every augmentation (through ``bt_jax.data``) and the
per-step key (the seed folded with the step and the device index), so a run and its restart after
SIGKILL end with bit-identical parameters on the CPU.
"""

from __future__ import annotations

import collections
import dataclasses
import functools
import logging as std_logging
import os
import signal
import time
from typing import Any, Callable, Iterator

import flax
import flax.jax_utils
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax
from absl import app
from absl import flags
from absl import logging
from jax import lax
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P
from ml_collections import config_flags

from bt_jax import checkpoint
from bt_jax import config as config_lib
from bt_jax import data
from bt_jax import evaluate
from bt_jax import loss as loss_lib
from bt_jax import models
from bt_jax import optim
from bt_jax.metric_logging import MetricLogger

AXIS = "batch"
FLAGS = flags.FLAGS


class NonFiniteLossError(FloatingPointError):
    """The loss became NaN or infinite; the last good checkpoint is left as it was."""


@flax.struct.dataclass
class TrainState:
    step: jax.Array
    params: Any
    batch_stats: Any
    opt_state: Any
    # The online linear probe ({"kernel": [F, C], "bias": [C]}; empty without labels).
    probe_params: Any
    probe_opt_state: Any


def build_model(config: ml_collections.ConfigDict, axis_name: str | None = AXIS):
    """Backbone + projector with BatchNorm over the global batch (the official SyncBatchNorm)."""
    dtype = config_lib.compute_dtype(config)
    backbone = models.create(config.model, stem=config.stem, width=config.width,
                             zero_init_residual=config.zero_init_residual, dtype=dtype,
                             axis_name=axis_name)
    projector = models.Projector(config.projector, dtype=dtype, axis_name=axis_name)
    return models.BarlowTwinsModel(backbone, projector)


def probe_optimizer(config: ml_collections.ConfigDict) -> optax.GradientTransformation:
    """The online probe's own optimiser: plain SGD with momentum, nothing shared with LARS."""
    return optax.sgd(config.probe_learning_rate, momentum=0.9)


def init_state(config, model, tx: optax.GradientTransformation,
               num_classes: int | None = None) -> TrainState:
    """The initial state from ``config.seed``; pure, so jit places it wherever asked.

    num_classes: the online probe's classes; None (no labels, or ``online_probe=False``) trains
    no probe.
    """
    init_model = model.clone(
        backbone=model.backbone.clone(axis_name=None),
        projector=model.projector.clone(axis_name=None))
    images = jnp.zeros((2, config.image_size, config.image_size, 3), jnp.float32)
    variables = init_model.init(jax.random.key(config.seed), images, train=False)
    params = variables["params"]
    probe_params = {}
    if num_classes:
        num_features = model.backbone.num_features
        probe_params = {"kernel": jnp.zeros((num_features, num_classes), jnp.float32),
                        "bias": jnp.zeros((num_classes,), jnp.float32)}
    return TrainState(step=jnp.zeros((), jnp.int32), params=params,
                      batch_stats=variables["batch_stats"], opt_state=tx.init(params),
                      probe_params=probe_params,
                      probe_opt_state=probe_optimizer(config).init(probe_params))


def probe_logits(probe_params: dict, representation: jax.Array) -> jax.Array:
    """representation: [n, F] -> logits [n, C]."""
    return representation @ probe_params["kernel"] + probe_params["bias"]


def probe_step(probe_params, probe_opt_state, representation, labels, *, probe_tx, axis_name):
    """One SGD step of the online probe on stop-gradient representations, over the global batch.

    labels: [n] int32, -1 where unknown (those examples are left out).
    """
    representation = lax.stop_gradient(representation.astype(jnp.float32))
    known = labels >= 0
    count = jnp.maximum(lax.psum(jnp.sum(known), axis_name), 1)

    def loss_fn(p):
        logits = probe_logits(p, representation)
        losses = optax.softmax_cross_entropy_with_integer_labels(logits, jnp.maximum(labels, 0))
        # psum makes the loss the global mean, so the same pmean recipe as the main loss applies.
        return lax.psum(jnp.sum(jnp.where(known, losses, 0.0)), axis_name) / count, logits

    (loss, logits), grads = jax.value_and_grad(loss_fn, has_aux=True)(probe_params)
    grads = lax.pmean(grads, axis_name)
    updates, probe_opt_state = probe_tx.update(grads, probe_opt_state, probe_params)
    correct = jnp.sum(jnp.where(known, jnp.argmax(logits, -1) == labels, False))
    accuracy = lax.psum(correct, axis_name) / count
    return optax.apply_updates(probe_params, updates), probe_opt_state, {
        "probe_loss": loss, "probe_train_accuracy": accuracy}


def train_step(state: TrainState, batch: dict, rng: jax.Array, *, model, tx, lambd: float,
               loss_method: str, probe_tx: optax.GradientTransformation | None = None,
               axis_name: str = AXIS) -> tuple[TrainState, dict]:
    """One update, per device, inside ``shard_map`` or ``pmap`` over ``axis_name``.

    batch: {"view_a": [n, H, W, 3], "view_b": [n, H, W, 3], "label": [n] (with a probe)}, this
    device's n examples.
    rng: the step's key; folded with the device index here for any stochastic layer.
    probe_tx: the online probe's optimiser; the probe trains when the state has one.
    Returns the new state and {"loss", "invariance", "redundancy"[, "probe_loss",
    "probe_train_accuracy"]}, the same on every device.
    """
    rng = jax.random.fold_in(rng, lax.axis_index(axis_name))

    def loss_fn(params):
        # One call per view, as the official code: each view's BatchNorm statistics are its own,
        # and the running averages are updated twice per step.
        variables = {"params": params, "batch_stats": state.batch_stats}
        (representation_a, z_a), updates = model.apply(
            variables, batch["view_a"], train=True, mutable=["batch_stats"],
            rngs={"dropout": rng})
        variables = {"params": params, **updates}
        (_, z_b), updates = model.apply(variables, batch["view_b"], train=True,
                                        mutable=["batch_stats"], rngs={"dropout": rng})
        loss, terms = loss_lib.barlow_twins_loss(z_a, z_b, lambd=lambd, axis_name=axis_name,
                                                 method=loss_method, return_terms=True)
        return loss, (terms, updates["batch_stats"], representation_a)

    (loss, (terms, batch_stats, representation_a)), grads = jax.value_and_grad(
        loss_fn, has_aux=True)(state.params)
    grads = lax.pmean(grads, axis_name)
    updates, opt_state = tx.update(grads, state.opt_state, state.params)
    params = optax.apply_updates(state.params, updates)
    metrics = {"loss": loss, "invariance": terms.invariance, "redundancy": terms.redundancy}
    probe_params, probe_opt_state = state.probe_params, state.probe_opt_state
    if probe_params:
        probe_params, probe_opt_state, probe_metrics = probe_step(
            probe_params, probe_opt_state, representation_a, batch["label"],
            probe_tx=probe_tx, axis_name=axis_name)
        metrics.update(probe_metrics)
    new_state = TrainState(step=state.step + 1, params=params, batch_stats=batch_stats,
                           opt_state=opt_state, probe_params=probe_params,
                           probe_opt_state=probe_opt_state)
    return new_state, metrics


def correlation_block(state: TrainState, batch: dict, rng: jax.Array, *, model, size: int,
                      axis_name: str = AXIS) -> jax.Array:
    """The leading [size, size] block of C on this batch (training-mode BatchNorm, nothing
    updated), for the picture of C approaching the identity. Every device computes the same
    matrix, returned stacked: [1, size, size] per device."""
    variables = {"params": state.params, "batch_stats": state.batch_stats}
    (_, z_a), _ = model.apply(variables, batch["view_a"], train=True, mutable=["batch_stats"])
    (_, z_b), _ = model.apply(variables, batch["view_b"], train=True, mutable=["batch_stats"])
    size = min(size, z_a.shape[-1])
    return loss_lib.cross_correlation(z_a[:, :size], z_b[:, :size], axis_name=axis_name)[None]


@jax.jit
def all_finite(tree) -> jax.Array:
    return jnp.all(jnp.asarray([jnp.all(jnp.isfinite(x)) for x in jax.tree.leaves(tree)]))


class ProbeEvaluator:
    """Accuracy of the online probe on the test split (evaluation transform), once an epoch.

    Runs on this process's first device from a host copy of the backbone and probe: the test
    split is small next to an epoch, and this keeps it out of the data-parallel step.
    """

    def __init__(self, config: ml_collections.ConfigDict, source):
        self.config, self.source = config, source
        backbone = build_model(config, axis_name=None).backbone

        def predict(variables, images):
            representation = backbone.apply(
                {"params": variables["params"], "batch_stats": variables["batch_stats"]},
                images, train=False)
            return jnp.argmax(probe_logits(variables["probe"], representation), axis=-1)

        self._predict = jax.jit(predict)

    def __call__(self, state: TrainState) -> float:
        variables = jax.device_get({"params": state.params["backbone"],
                                    "batch_stats": state.batch_stats["backbone"],
                                    "probe": state.probe_params})
        correct = total = 0
        for images, labels in data.eval_batches(
                self.source, split="test", batch_size=256, image_size=self.config.image_size,
                resize_size=self.config.eval_resize):
            correct += int(np.sum(np.asarray(self._predict(variables, images)) == labels))
            total += len(labels)
        return correct / max(total, 1)


def device_mesh() -> jax.sharding.Mesh:
    """A 1-D mesh over every device of every process, in process order."""
    return jax.make_mesh((jax.device_count(),), (AXIS,),
                         axis_types=(jax.sharding.AxisType.Auto,))


def shard_map_step(fn: Callable, mesh: jax.sharding.Mesh, donate: bool = True,
                   out_specs=P()) -> Callable:
    """fn(state, batch, rng) per device -> jit(shard_map): replicated state, batch split."""
    mapped = jax.shard_map(fn, mesh=mesh, in_specs=(P(), P(AXIS), P()), out_specs=out_specs)
    return jax.jit(mapped, donate_argnums=(0,) if donate else ())


def pmap_step(fn: Callable, donate: bool = True) -> Callable:
    """fn(state, batch, rng) per device -> pmap: state replicated per device, batch [L, n, ...]."""
    return jax.pmap(fn, axis_name=AXIS, in_axes=(0, 0, None),
                    donate_argnums=(0,) if donate else ())


class Placement:
    """Moves state and batches between the host and the chosen parallel form."""

    def __init__(self, parallelism: str):
        self.parallelism = parallelism
        if parallelism == "shard_map":
            self.mesh = device_mesh()
            self._replicated = NamedSharding(self.mesh, P())
            self._batch = NamedSharding(self.mesh, P(AXIS))

    def map(self, fn: Callable, donate: bool = True, out_specs=P()) -> Callable:
        """out_specs (shard_map): P() for values the same on every device, P(AXIS) to stack
        per-device values (pmap always stacks)."""
        if self.parallelism == "shard_map":
            return shard_map_step(fn, self.mesh, donate, out_specs)
        return pmap_step(fn, donate)

    def init(self, fn: Callable[[], TrainState]) -> TrainState:
        if self.parallelism == "shard_map":
            return jax.jit(fn, out_shardings=self._replicated)()
        return flax.jax_utils.replicate(jax.jit(fn)())

    def batch(self, local: dict) -> dict:
        """local: numpy {key: [local_devices, n, ...]} -> device arrays of the global batch."""
        if self.parallelism == "shard_map":
            return {key: jax.make_array_from_process_local_data(
                self._batch, value.reshape((-1,) + value.shape[2:]))
                for key, value in local.items()}
        # pmap's layout: the leading axis split over the local devices.
        local_devices = jax.sharding.Mesh(np.array(jax.local_devices()), ("local",))
        return jax.device_put(local, NamedSharding(local_devices, P("local")))

    def checkpointable(self, state: TrainState) -> TrainState:
        """The form checkpoints hold: the replicated global state (pmap: the first device's)."""
        return state if self.parallelism == "shard_map" else flax.jax_utils.unreplicate(state)

    def from_checkpoint(self, state: TrainState) -> TrainState:
        if self.parallelism == "shard_map":
            return state
        return flax.jax_utils.replicate(state)

    def scalar(self, value: jax.Array) -> jax.Array:
        return value if self.parallelism == "shard_map" else value[0]


def prefetch(iterator: Iterator, size: int = 2) -> Iterator:
    """Keeps `size` batches in flight: device transfers are asynchronous, so the next batches
    are copied while the current step runs."""
    queue = collections.deque()
    for item in iterator:
        queue.append(item)
        if len(queue) > size:
            yield queue.popleft()
    while queue:
        yield queue.popleft()


class _PreemptionFlag:
    """SIGTERM / SIGINT set a flag; the loop saves a checkpoint and exits at the next step."""

    def __init__(self):
        self.raised = False
        self._previous = {}
        for signum in (signal.SIGTERM, signal.SIGINT):
            try:
                self._previous[signum] = signal.signal(signum, self._handle)
            except ValueError:  # Not the main thread: leave signals to the caller.
                pass

    def _handle(self, signum, frame):
        logging.warning("Signal %d: saving a checkpoint and stopping after this step.", signum)
        self.raised = True

    def restore(self):
        for signum, handler in self._previous.items():
            signal.signal(signum, handler)


def _preempted(flag: _PreemptionFlag) -> bool:
    """All processes stop at the same step: agree on whether any of them was signalled."""
    if jax.process_count() == 1:
        return flag.raised
    from jax.experimental import multihost_utils
    return bool(np.any(multihost_utils.process_allgather(np.array(flag.raised))))


def view_specs(config: ml_collections.ConfigDict) -> dict:
    """The two views' augmentations: the official recipe with the config's probabilities."""
    return {view: dataclasses.replace(data.VIEWS[view], blur_prob=blur, solarize_prob=solarize)
            for view, blur, solarize in zip(("a", "b"), config.blur_probabilities,
                                            config.solarize_probabilities)}


def evaluate_at_end(config, variables, source, workdir, logger, step) -> dict:
    """The quick protocols (logistic-regression probe, kNN) on the trained backbone and on a
    random-init one, printed and written to ``eval_quick.json``."""
    backbone = build_model(config, axis_name=None).backbone
    results = evaluate.evaluate_quick(config, backbone, variables, source)
    line = evaluate.summary_line(results)
    print(f"step {step}: {line}", flush=True)
    logging.info("Evaluation at step %d: %s", step, line)
    evaluate.write_json(os.path.join(workdir, "eval_quick.json"),
                        {"protocol": "quick", "step": step, "dataset": config.dataset,
                         "model": config.model, "results": results})
    logger.scalars(step, {
        f"eval/{protocol}_top1{'' if setting == 'pretrained' else '_' + setting}": value["top1"]
        for protocol, settings in results.items() for setting, value in settings.items()
        if "top1" in value})
    return results


def train_and_evaluate(config: ml_collections.ConfigDict, workdir: str) -> TrainState:
    """Pretrains into ``workdir``, resuming from its latest checkpoint; returns the final state
    in its checkpointable (replicated global) form."""
    config_lib.validate(config, device_count=jax.device_count())
    source = data.load_source(config.dataset, config.data_dir or None)
    steps_per_epoch = data.steps_per_epoch(source, config.batch_size)
    total_steps = steps_per_epoch * config.num_epochs
    if config.max_steps > 0:
        total_steps = min(total_steps, config.max_steps)
    checkpoint.check_resumable(workdir, config)
    checkpoint.write_config(workdir, config)

    model = build_model(config)
    tx = optim.create_optimizer(config, steps_per_epoch)
    num_classes = source.num_classes if config.online_probe else None
    place = Placement(config.parallelism)
    state = place.init(functools.partial(init_state, config, model, tx, num_classes))
    manager = checkpoint.checkpoint_manager(workdir, config)
    if manager.latest_step() is not None:
        state = place.from_checkpoint(checkpoint.restore(manager, place.checkpointable(state)))
        logging.info("Resumed from step %d of %s.", manager.latest_step(), workdir)
    start_step = int(jax.device_get(place.scalar(state.step)))

    step_fn = place.map(functools.partial(
        train_step, model=model, tx=tx, lambd=config.lambd, loss_method=config.loss_method,
        probe_tx=probe_optimizer(config)))
    probe_accuracy = ProbeEvaluator(config, source) if num_classes else None
    correlation_fn = place.map(functools.partial(
        correlation_block, model=model, size=config.correlation_image_dims), donate=False,
        out_specs=P(AXIS))
    learning_rates = jax.jit(functools.partial(optim.current_learning_rates, config,
                                               steps_per_epoch))
    base_key = jax.random.key(config.seed)
    batches = prefetch(place.batch(b) for b in data.pretrain_batches(
        source, global_batch=config.batch_size, image_size=config.image_size, seed=config.seed,
        start_step=start_step, min_crop_scale=config.min_crop_scale, views=view_specs(config)))

    logger = MetricLogger(workdir, total_steps=total_steps, initial_step=start_step,
                          enabled=jax.process_index() == 0)
    preemption = _PreemptionFlag()
    pending: list[tuple[int, dict]] = []  # Metrics still on the device: fetched at log time.
    last_good = start_step
    timer = {"data": 0.0, "start": time.perf_counter(), "steps": 0}

    def flush() -> None:
        """Fetches pending metrics (long computed by now), checks them, writes them."""
        nonlocal pending, last_good
        if not pending:
            return
        fetched = jax.device_get(pending)
        pending = []
        for step, metrics in fetched:
            if not np.isfinite(metrics["loss"]):
                raise NonFiniteLossError(
                    f"The loss is {metrics['loss']} at step {step}. Training stopped; the last "
                    f"good checkpoint (step {manager.latest_step()}) is intact. Lower the "
                    "learning rate, or use dtype=float32 if you trained in reduced precision.")
            last_good = step
        elapsed = time.perf_counter() - timer["start"]
        images = timer["steps"] * config.batch_size
        logger.scalars(step, {
            **{key: float(value) for key, value in metrics.items()},
            **{key: float(value) for key, value in learning_rates(step - 1).items()},
            "images_per_second": images / max(elapsed, 1e-9),
            "data_wait_seconds": timer["data"],
        })
        timer.update(data=0.0, start=time.perf_counter(), steps=0)

    try:
        for step in range(start_step + 1, total_steps + 1):
            wait_start = time.perf_counter()
            batch = next(batches)
            timer["data"] += time.perf_counter() - wait_start
            rng = jax.random.fold_in(base_key, step)
            state, metrics = step_fn(state, batch, rng)
            pending.append((step, jax.tree.map(place.scalar, metrics)))
            timer["steps"] += 1
            logger.advance()
            at_epoch_end = step % steps_per_epoch == 0
            at_checkpoint = step % config.checkpoint_every_steps == 0 or step == total_steps
            if step % config.log_every_steps == 0 or at_checkpoint or at_epoch_end:
                flush()
            if at_epoch_end:
                matrices = np.asarray(jax.device_get(correlation_fn(state, batch, rng)))
                logger.correlation_image(step, matrices.reshape((-1,) + matrices.shape[-2:])[0])
                if probe_accuracy is not None:
                    logger.scalars(step, {"probe_test_accuracy": probe_accuracy(
                        place.checkpointable(state))})
            stop = _preempted(preemption) if (
                jax.process_count() == 1 or step % config.log_every_steps == 0) else False
            if at_checkpoint or stop:
                flush()
                if not bool(all_finite(state.params)):
                    raise NonFiniteLossError(
                        f"The parameters are not finite after step {step}. Training stopped; "
                        f"the last good checkpoint (step {manager.latest_step()}) is intact. "
                        "Lower the learning rate.")
                checkpoint.save(manager, step, place.checkpointable(state))
            if stop:
                logging.warning("Stopped by a signal at step %d; the checkpoint is saved. Run the "
                                "same command to resume.", step)
                break
        else:
            flush()
            final = place.checkpointable(state)
            variables = {"params": final.params["backbone"],
                         "batch_stats": final.batch_stats["backbone"]}
            checkpoint.export_backbone(os.path.join(workdir, checkpoint.BACKBONE_FILE), config,
                                       variables)
            if config.eval.at_end and source.num_classes and jax.process_index() == 0:
                evaluate_at_end(config, variables, source, workdir, logger, total_steps)
    finally:
        preemption.restore()
        logger.close()
        manager.close()
    return place.checkpointable(state)


# ---------------------------------------------------------------------------------------------
# Command line.

def define_flags() -> None:
    """The command line; defined only when this module runs as a program, so that importing
    bt_jax.train (tests, notebooks, bt_jax.evaluate) never reads sys.argv."""
    config_flags.DEFINE_config_file(
        "config", os.path.join(os.path.dirname(__file__), "config.py"),
        "A config file with get_config() (experiments/configs/*.py); override keys with "
        "--config.KEY=VALUE.", lock_config=True)
    flags.DEFINE_string("workdir", "runs/default", "Where checkpoints and logs go.")
    flags.DEFINE_bool(
        "distributed", False, "Call jax.distributed.initialize() (multi-host); arguments come "
        "from the cluster environment or the flags below.")
    flags.DEFINE_string("coordinator_address", None, "host:port of process 0.")
    flags.DEFINE_integer("num_processes", None, "Number of processes.")
    flags.DEFINE_integer("process_id", None, "This process's index.")


def initialize_distributed() -> None:
    """jax.distributed.initialize; on CPU the cross-process collectives go through gloo."""
    # Only the CPU backend reads this; harmless where the devices are accelerators.
    jax.config.update("jax_cpu_collectives_implementation", "gloo")
    jax.distributed.initialize(coordinator_address=FLAGS.coordinator_address,
                               num_processes=FLAGS.num_processes, process_id=FLAGS.process_id)


class _OnlyOurInfo(std_logging.Filter):
    """Libraries (orbax above all) log every save at INFO; keep their warnings, drop the rest."""

    def filter(self, record: std_logging.LogRecord) -> bool:
        return record.levelno >= std_logging.WARNING or "bt_jax" in record.pathname


def main(argv) -> None:
    if len(argv) > 1:
        raise app.UsageError(f"Unexpected arguments: {argv[1:]}")
    logging.get_absl_handler().addFilter(_OnlyOurInfo())
    if FLAGS.distributed or FLAGS.coordinator_address:
        initialize_distributed()
    logging.info("JAX processes: %d, devices: %d (%d local).", jax.process_count(),
                 jax.device_count(), jax.local_device_count())
    try:
        train_and_evaluate(FLAGS.config, FLAGS.workdir)
    except (config_lib.ConfigError, checkpoint.IncompatibleCheckpointError,
            NonFiniteLossError) as error:
        raise SystemExit(f"error: {error}") from None


if __name__ == "__main__":
    define_flags()
    app.run(main)
