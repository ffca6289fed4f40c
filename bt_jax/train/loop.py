"""The pretraining loop, from a config and a workdir to a trained, exported, evaluated model.

A batch's path: ``bt_jax.data.pretrain_batches`` (this process's rows, uint8) ->
``parallel.global_batch`` (one global array) -> ``step.train_step`` under
``parallel.map_step`` (views finished on the device, model, loss, LARS) -> the new replicated
state, which ``bt_jax.checkpoint`` saves. :func:`train_and_evaluate` reads top to bottom: check
everything, restore, then the loop with its periodic actions, then export and evaluate.

Everything random comes from ``config.seed`` (initialisation, every augmentation, the per-step
key), so a run killed and restarted ends with the parameters of an uninterrupted run.
"""

from __future__ import annotations

import collections
import dataclasses
import functools
import sys
import time
from collections.abc import Callable, Iterator
from typing import Any

import jax
import ml_collections
import numpy as np
from absl import logging
from etils import epath

from bt_jax import checkpoint, cli, data, divergence, evaluate, files, parallel, probe
from bt_jax import config as config_lib
from bt_jax import interrupts as interrupts_lib
from bt_jax import state as state_lib
from bt_jax import step as step_lib
from bt_jax import workdir as workdir_lib
from bt_jax.data import photometric
from bt_jax.metric_logging import MetricLogger


class Stopped(Exception):
    """A signal stopped the run after saving a checkpoint; carries the exit status."""

    def __init__(self, status: int):
        super().__init__(status)
        self.status = status


def view_specs(data_config: ml_collections.ConfigDict) -> dict[str, data.ViewSpec]:
    """The two views' augmentations: the official recipe with the config's probabilities."""
    return {
        view: dataclasses.replace(data.VIEWS[view], blur_prob=blur, solarize_prob=solarize)
        for view, blur, solarize in zip(
            ("a", "b"), data_config.blur_probabilities, data_config.solarize_probabilities
        )
    }


def view_finisher(config: ml_collections.ConfigDict) -> Callable[[dict], dict]:
    """``batch -> {"view_a", "view_b"}`` on the device: the step's end of the input pipeline
    (normalisation, and the photometric ops when ``data.photometric == "device"``)."""
    return functools.partial(
        photometric.finish_views,
        seed=config.seed,
        views=view_specs(config.data),
        photometric=config.data.photometric,
    )


def prefetch(iterator: Iterator, size: int = 2) -> Iterator:
    """Keeps ``size`` batches in flight: transfers are asynchronous, so the next batches are
    copied to the devices while the current step runs."""
    queue = collections.deque()
    for item in iterator:
        queue.append(item)
        if len(queue) > size:
            yield queue.popleft()
    while queue:
        yield queue.popleft()


@dataclasses.dataclass
class Run:
    """What the checks established before anything is built or written."""

    config: ml_collections.ConfigDict
    workdir: epath.Path
    source: data.Source  # what pretraining reads
    eval_source: data.Source | None  # labelled, for the probe and the evaluation; None: none
    steps_per_epoch: int
    total_steps: int


def check(config: ml_collections.ConfigDict, workdir: epath.PathLike) -> Run:
    """Every check that can fail, before anything is written: the config, the data, the
    devices, the workdir (reachable, writable, resumable by this config, not in use)."""
    config_lib.validate(config)
    workdir = workdir_lib.check(workdir, config)
    source = data.load_source(config.data.dataset, config.data.data_dir or None)
    config_lib.check_run(config, device_count=jax.device_count(), num_train=source.num_train)
    eval_source = evaluate.labelled_source(config, pretraining=source, required=False)
    files.check_writable_directory(workdir, what="The workdir")
    steps_per_epoch = data.steps_per_epoch(source, config.batch_size)
    total_steps = steps_per_epoch * config.num_epochs
    if config.max_steps > 0:
        total_steps = min(total_steps, config.max_steps)
    return Run(config, workdir, source, eval_source, steps_per_epoch, total_steps)


def train_and_evaluate(
    config: ml_collections.ConfigDict,
    workdir: epath.PathLike,
    interrupts: interrupts_lib.Interrupts | None = None,
) -> Any:
    """Pretrains into ``workdir`` (resuming from its latest checkpoint), exports the model and
    runs the quick evaluation; returns the final replicated state.

    Raises Stopped after a signal (the checkpoint saved), DivergenceError when training
    diverges, and errors.Error subclasses for anything the user can fix.
    """
    own_interrupts = interrupts is None  # handlers installed for this call only
    if own_interrupts:
        interrupts = interrupts_lib.Interrupts(distributed=jax.process_count() > 1)
    try:
        return _train_and_evaluate(config, workdir, interrupts)
    finally:
        if own_interrupts:
            interrupts.restore()


def _train_and_evaluate(config, workdir, interrupts: interrupts_lib.Interrupts) -> Any:
    run = check(config, workdir)
    config, workdir = run.config, run.workdir
    # Every process has checked the lease before process 0 takes it (or the others would find
    # it taken); then the lease before the restore: a second run must not restore (or set
    # aside) what a live run writes.
    parallel.barrier("checked")
    lease = workdir_lib.Lease(workdir)
    if jax.process_index() == 0:
        lease.acquire()
        interrupts.on_exit.append(lease.release)
    try:
        return _train_holding_the_lease(run, interrupts)
    finally:
        if jax.process_index() == 0:
            lease.release()


def _train_holding_the_lease(run: Run, interrupts: interrupts_lib.Interrupts) -> Any:
    config, workdir = run.config, run.workdir
    mesh = parallel.device_mesh()
    model = state_lib.build_model(config)
    tx = state_lib.build_optimizer(config, run.steps_per_epoch)
    num_classes = (
        run.eval_source.num_classes
        if run.eval_source and config.probe.enabled and run.source.num_classes
        else None
    )
    state = state_lib.run_once(
        functools.partial(state_lib.init_state, config, model, tx, num_classes),
        out_shardings=parallel.replicated(mesh),
    )

    manager = checkpoint.open_manager(workdir, keep=config.checkpoint.keep)
    identity = config_lib.resume_identity(config)

    def unreadable(step: int, why: str) -> None:
        logging.warning(
            "The checkpoint of step %d cannot be restored (%s); trying the one "
            "before. It is moved to %s.",
            step,
            why,
            checkpoint.set_aside(workdir, step),
        )

    state, restored_step = checkpoint.restore(
        manager, state, identity=identity, on_unreadable=unreadable
    )
    manager.reload()
    start_step = 0 if restored_step is None else restored_step
    if restored_step is not None:
        logging.info("Resumed from step %d of %s.", restored_step, workdir)

    logger = None
    try:
        workdir_lib.record_start(workdir, config, start_step)
        interrupts.exit_message = (
            f"the config of this start is in {workdir}; no step was "
            "trained. Run the same command to start again"
        )
        logger = MetricLogger(
            workdir,
            total_steps=run.total_steps,
            initial_step=start_step,
            steps_per_epoch=run.steps_per_epoch,
            enabled=jax.process_index() == 0,
        )
        if start_step < run.total_steps:
            state = _loop(
                run, state, start_step, model, tx, mesh, manager, identity, logger, interrupts
            )
        _finish_saves(manager, run.total_steps)
        variables = state_lib.variables_of(state, part=None)
        checkpoint.export(workdir, config.model, parallel.to_host(variables))
        interrupts.enter(
            interrupts_lib.EVALUATION,
            f"training is complete and saved (step {run.total_steps}); rerun the "
            f"evaluation with python -m bt_jax.evaluate --workdir={workdir} "
            "--protocol=logreg",
        )
        if config.eval.at_end and run.eval_source is not None:
            evaluate.at_end(
                config,
                parallel.to_host(state_lib.variables_of(state)),
                run.eval_source,
                workdir,
                mesh,
                logger,
                run.total_steps,
            )
    finally:
        _close(manager, failing=sys.exc_info()[1] is not None)
        if logger is not None:
            logger.close()
    return state


def _loop(
    run: Run,
    state: Any,
    start_step: int,
    model,
    tx,
    mesh,
    manager,
    identity: dict,
    logger: MetricLogger,
    interrupts: interrupts_lib.Interrupts,
) -> Any:
    """Steps ``start_step + 1 .. total_steps`` with their periodic actions; the final state."""
    config = run.config
    finish_views = view_finisher(config)
    step_fn = parallel.map_step(
        functools.partial(
            step_lib.train_step,
            model=model,
            tx=tx,
            probe_tx=probe.optimizer(config.probe),
            loss_options=dict(config.loss),
            finish_views=finish_views,
        ),
        mesh,
        config.parallelism,
    )
    correlation_fn = parallel.map_step(
        functools.partial(
            step_lib.correlation_block,
            model=model,
            size=config.logging.correlation_image_dims,
            finish_views=finish_views,
        ),
        mesh,
        config.parallelism,
        donate=False,
    )
    learning_rates = jax.jit(
        functools.partial(state_lib.learning_rates, config, run.steps_per_epoch)
    )
    embedding_dim = int(config.model.projector.split("-")[-1])
    batches = prefetch(
        parallel.global_batch(local, mesh)
        for local in data.pretrain_batches(
            run.source,
            global_batch=config.batch_size,
            image_size=config.data.image_size,
            seed=config.seed,
            start_step=start_step,
            min_crop_scale=config.data.min_crop_scale,
            views=view_specs(config.data),
            photometric=config.data.photometric,
        )
    )
    base_key = jax.random.key(config.seed)
    pending: list[tuple[int, dict]] = []  # metrics still on the devices, fetched at log time
    timer = {"data": 0.0, "start": time.perf_counter(), "steps": 0}
    current = {"state": state, "batch": None, "step": start_step}

    def log(step: int) -> None:
        """Fetches the pending metrics (long computed by now), checks every step's, writes
        their mean."""
        if not pending:
            return
        fetched = [(s, parallel.to_host(m)) for s, m in pending]
        pending.clear()
        for s, metrics in fetched:
            divergence.check_metrics(s, metrics, embedding_dim, lambda: _last_good(manager))
        means = {key: float(np.mean([m[key] for _, m in fetched])) for key in fetched[-1][1]}
        elapsed = time.perf_counter() - timer["start"]
        logger.scalars(
            step,
            {
                **means,
                **{key: float(value) for key, value in learning_rates(step - 1).items()},
                "images_per_second": timer["steps"] * config.batch_size / max(elapsed, 1e-9),
                "data_wait_seconds": timer["data"],
            },
        )
        timer.update(data=0.0, start=time.perf_counter(), steps=0)

    def epoch_end(step: int) -> None:
        _, block = correlation_fn(current["state"], current["batch"], base_key)
        logger.correlation_image(step, parallel.to_host(block))
        if current["state"].probe_params:
            accuracy = probe.test_accuracy(
                model.backbone,
                current["state"],
                run.eval_source,
                image_size=config.data.image_size,
                resize_size=config.data.eval_resize,
                mesh=mesh,
            )
            logger.scalars(step, {"probe_test_accuracy": accuracy})

    def save(step: int) -> None:
        log(step)
        largest = float(parallel.to_host(divergence.largest_magnitude(current["state"])))
        divergence.check_state(step, largest, lambda: _last_good(manager))
        try:
            checkpoint.save(manager, step, current["state"], identity)
        except Exception as error:  # noqa: BLE001 - disk full, permissions, storage errors
            raise _save_failed(manager, step, error) from None
        logger.checkpoint_saved(step)

    def act(action: Callable[[int], None], step: int) -> None:
        try:
            action(step)
        except OSError as error:  # a full disk fails the metrics' write first, too
            raise _save_failed(manager, step, error, "Writing the logs") from None

    # (every so many steps, what, also at the last step)
    actions: list[tuple[int, Callable[[int], None], bool]] = [
        (config.logging.every_steps, log, True),
        (run.steps_per_epoch, epoch_end, False),
        (config.checkpoint.every_steps, save, True),
    ]
    interrupts.enter(interrupts_lib.TRAINING)
    if interrupts.seed(start_step):
        logging.warning(
            "Stopped by a signal before step %d; the checkpoint of step %d is the "
            "latest. Run the same command to resume.",
            start_step + 1,
            start_step,
        )
        raise Stopped(interrupts.exit_status)
    for step in range(start_step + 1, run.total_steps + 1):
        wait_start = time.perf_counter()
        batch = next(batches)
        timer["data"] += time.perf_counter() - wait_start
        new_state, metrics = step_fn(current["state"], batch, jax.random.fold_in(base_key, step))
        current.update(state=new_state, batch=batch, step=step)
        pending.append((step, metrics))
        timer["steps"] += 1
        logger.advance()
        for every, action, at_last_step in actions:
            if step % every == 0 or (at_last_step and step == run.total_steps):
                act(action, step)
        if step < run.total_steps and interrupts.stop_requested(step):
            act(save, step)
            _finish_saves(manager, step)
            logging.warning(
                "Stopped by a signal at step %d; the checkpoint is saved. Run the "
                "same command to resume.",
                step,
            )
            raise Stopped(interrupts.exit_status)
    return current["state"]


def _save_failed(
    manager, step: int, error: Exception, what: str = "Saving the checkpoint"
) -> checkpoint.CheckpointError:
    """One line: what failed, why, and which checkpoint is the last complete one."""
    try:
        manager.wait_until_finished()
    except Exception:  # noqa: BLE001 - the save in flight failed too; reported below
        pass
    manager.reload()
    latest = manager.latest_step()
    kept = (
        f"the last complete checkpoint is step {latest}"
        if latest is not None
        else "no checkpoint is complete"
    )
    return checkpoint.CheckpointError(
        f"{what} of step {step} failed: {cli.describe(error)} Training stopped; "
        f"{kept}. Free space or fix the storage, then run the same command to resume."
    )


def _close(manager, failing: bool) -> None:
    """Closes the manager. Orbax's close raises a failed background save's error again: after a
    failure it must not replace the one-line error already on its way (it names the last
    complete checkpoint)."""
    try:
        manager.close()
    except Exception:  # noqa: BLE001 - the error in flight says what went wrong
        if not failing:
            raise


def _finish_saves(manager, step: int) -> None:
    """Waits for the background saves; a failure is reported like a failed save."""
    try:
        manager.wait_until_finished()
    except Exception as error:  # noqa: BLE001 - disk full, permissions, storage errors
        raise _save_failed(manager, step, error) from None


def _last_good(manager) -> str:
    manager.wait_until_finished()
    latest = manager.latest_step()
    return (
        f"the last good checkpoint (step {latest}) is intact"
        if latest is not None
        else "no checkpoint was saved"
    )
