"""Evaluating a run: its config and backbone, the protocols beside their baselines, the files.

``evaluate(workdir, protocol)`` scores the latest (or ``step``) checkpoint, or the exported
backbone, of a pretraining run; ``evaluate_checkpoints`` every retained one; ``at_end`` is the
main job's closing evaluation. Every process of a multi-process job runs them together: the
representations and the classifier steps are computed on every device, and process 0 writes.
"""

from __future__ import annotations

import functools
import time
from collections.abc import Mapping, Sequence
from typing import Any

import jax
import ml_collections
import numpy as np
from absl import logging
from etils import epath

from bt_jax import checkpoint, data, files, metric_logging, parallel
from bt_jax import config as config_lib
from bt_jax import workdir as workdir_lib
from bt_jax.evaluate import baselines as baselines_lib
from bt_jax.evaluate import results as results_lib
from bt_jax.evaluate.context import (
    PROTOCOLS,
    QUICK,
    Backbone,
    Context,
    EvaluationError,
    UnlabelledSourceError,
    check_protocol,
)


class ArchitectureMismatchError(EvaluationError):
    """The saved backbone's variables do not fit the architecture the config describes."""


def load_run_config(
    workdir: epath.PathLike, overrides: Mapping[str, Any] | None = None
) -> ml_collections.ConfigDict:
    """The run's config.json (either layout) with ``overrides`` ({"eval.knn_k": 20, ...})."""
    config = workdir_lib.read_config(workdir)
    for key, value in (overrides or {}).items():
        config_lib.set_dotted(config, key, value)
    config_lib.validate(config)
    return config


def labelled_source(
    config: ml_collections.ConfigDict,
    *,
    pretraining: data.Source | None = None,
    required: bool = True,
) -> data.Source | None:
    """The labelled data to evaluate on: ``config.eval.dataset`` if set, else the pretraining
    dataset. Without labels: UnlabelledSourceError (``required``) or None."""
    if config.eval.dataset:
        source = data.load_source(config.eval.dataset, config.eval.data_dir or None)
        where = f"config.eval.dataset={config.eval.dataset!r}"
    else:
        source = pretraining or data.load_source(config.data.dataset, config.data.data_dir or None)
        where = f"the pretraining dataset {config.data.dataset!r}"
    if source.num_classes:
        return source
    if not required:
        return None
    raise UnlabelledSourceError(
        f"{where} has no labels, and every evaluation protocol trains or scores a classifier. "
        "Evaluate on a labelled dataset of the same image size: --config.eval.dataset=NAME "
        "[--config.eval.data_dir=DIR] (an image folder needs one sub-folder per class)."
    )


def _shapes(tree: Any) -> dict[str, tuple[int, ...]]:
    import flax

    flat = flax.traverse_util.flatten_dict(checkpoint.plain(tree), sep="/")
    return {key: tuple(np.shape(value)) for key, value in flat.items()}


def check_architecture(
    variables: Mapping[str, Any], config: ml_collections.ConfigDict, where: str
) -> None:
    """ArchitectureMismatchError unless ``variables`` has the shapes of the config's backbone
    (from ``jax.eval_shape`` of the initialisation: nothing is computed)."""
    expected = _shapes(jax.eval_shape(functools.partial(baselines_lib._init_backbone, config)))
    # Parameters before BatchNorm statistics: the first differences shown are the telling ones.
    expected = dict(sorted(expected.items(), key=lambda item: item[0].startswith("batch_stats")))
    got = _shapes(variables)
    problems = [
        f"{key} is {got[key]} there but {shape} for the config"
        for key, shape in expected.items()
        if key in got and got[key] != shape
    ]
    problems += [f"{key} is missing there" for key in expected if key not in got]
    problems += [
        f"{key} is there but not in the config's backbone" for key in got if key not in expected
    ]
    if problems:
        shown = "; ".join(problems[:3]) + (
            f"; and {len(problems) - 3} more" if len(problems) > 3 else ""
        )
        model = config.model
        raise ArchitectureMismatchError(
            f"The backbone in {where} is not the architecture the config describes "
            f"(model.name={model.name}, model.width={model.width}, model.stem={model.stem}): "
            f"{shown}. The workdir's config.json must be the one the run was trained with: "
            "restore it, or pass the run's values (--config.model.name=, --config.model.width=, "
            "--config.model.stem=)."
        )


def load_variables(
    workdir: epath.PathLike, config: ml_collections.ConfigDict, step: int | None = None
) -> tuple[dict, int | None]:
    """(backbone variables, the checkpoint step or None for backbone.msgpack), checked: the
    architecture fits the config and every value is finite."""
    steps = checkpoint.steps(workdir)
    where_checkpoints = checkpoint.directory(workdir)
    if step is not None and step not in steps:
        raise checkpoint.NoCheckpointError(
            f"There is no checkpoint of step {step} in {where_checkpoints} (steps there: "
            f"{steps or 'none'}). Pass one of those to --step, or leave --step out for the "
            "latest; raise config.checkpoint.keep when pretraining to keep more."
        )
    exported = epath.Path(workdir) / checkpoint.BACKBONE_FILE
    if steps:
        step = steps[-1] if step is None else step
        variables, where = checkpoint.read_variables(workdir, step), f"{where_checkpoints}/{step}"
    elif exported.exists():
        _, variables = checkpoint._read_export(exported, checkpoint.BACKBONE_FILE)
        where = str(exported)
    else:
        raise checkpoint.NoCheckpointError(
            f"Nothing to evaluate in {workdir}: no checkpoint in {where_checkpoints} and no "
            f"{checkpoint.BACKBONE_FILE}. Pretrain first (python -m bt_jax.train "
            f"--workdir={workdir}); a run saves a checkpoint every config.checkpoint.every_steps "
            "steps and exports the backbone at its end."
        )
    check_architecture(variables, config, where)
    checkpoint.check_finite(variables, where)
    return variables, step


def make_context(
    config: ml_collections.ConfigDict, source: data.Source, mesh: jax.sharding.Mesh | None = None
) -> Context:
    from bt_jax import state as state_lib

    module = state_lib.build_model(config, axis_name=None).backbone
    return Context(config, source, module, mesh or parallel.device_mesh())


def with_baselines(
    protocols: Sequence[str], context: Context, variables: Any, *, baselines: bool = True
) -> dict[str, dict]:
    """{protocol: {"pretrained": ..., "random_init": ..., "random_init_bn": ...,
    "random_fan_in_bn": ..., "raw_pixels": ... (logreg)}}; each backbone's representations
    extracted once for all the protocols."""
    pretrained = Backbone("pretrained", variables)
    results = {
        p: {"pretrained": PROTOCOLS[check_protocol(p)](context, pretrained)} for p in protocols
    }
    if not baselines:
        return results
    for name, build in baselines_lib.baseline_variables(context).items():
        baseline = Backbone(name, build())
        for protocol in protocols:
            results[protocol][name] = PROTOCOLS[protocol](context, baseline)
    if "logreg" in protocols:
        results["logreg"]["raw_pixels"] = baselines_lib.raw_pixels_logreg(context)
    return results


def _record(protocol: str, step: int | None, config, results: dict, seconds: float) -> dict:
    return {
        "protocol": protocol,
        "step": step,
        "dataset": config.eval.dataset or config.data.dataset,
        "model": config.model.to_dict(),
        "settings": config.eval.to_dict(),
        "results": results,
        "seconds": round(seconds, 3),
    }


def evaluate(
    workdir: epath.PathLike,
    protocol: str,
    *,
    step: int | None = None,
    baselines: bool = True,
    overrides: Mapping[str, Any] | None = None,
    recompute_bn: bool = False,
    write: bool = True,
    mesh: jax.sharding.Mesh | None = None,
) -> dict:
    """One protocol on a run's backbone and its baselines; the record written to
    ``WORKDIR/eval_<protocol>.json``: {"protocol", "step" (None: backbone.msgpack), "dataset",
    "model", "settings", "seconds", "results": {"pretrained", "random_init", ...}}.

    recompute_bn: re-estimate the pretrained backbone's BatchNorm statistics on training images
    first (as the BN baselines do).
    """
    start = time.perf_counter()
    check_protocol(protocol)
    config = load_run_config(workdir, overrides)
    source = labelled_source(config)
    variables, step = load_variables(workdir, config, step)
    context = make_context(config, source, mesh)
    if recompute_bn:
        variables = baselines_lib.recompute_batch_stats(context, variables)
    results = with_baselines([protocol], context, variables, baselines=baselines)[protocol]
    record = _record(protocol, step, config, results, time.perf_counter() - start)
    if write:
        results_lib.write(workdir, protocol, record, step, results_lib.scalars(protocol, results))
    return record


def evaluate_checkpoints(
    workdir: epath.PathLike,
    protocols: Sequence[str] = QUICK,
    *,
    baselines: bool = True,
    overrides: Mapping[str, Any] | None = None,
    steps: Sequence[int] | None = None,
    mesh: jax.sharding.Mesh | None = None,
) -> list[dict]:
    """Every retained checkpoint (or ``steps`` of them), for accuracy-over-training curves.

    Returns one record per step, oldest first: {"step", "results": {protocol: {"pretrained",
    "random_init", ...}}} (the baselines computed once and repeated). Writes them to
    ``WORKDIR/eval_checkpoints.json`` and the accuracies to TensorBoard at each step.
    """
    start = time.perf_counter()
    protocols = [check_protocol(p) for p in protocols]
    config = load_run_config(workdir, overrides)
    retained = checkpoint.steps(workdir)
    if not retained:
        raise checkpoint.NoCheckpointError(
            f"No checkpoints in {checkpoint.directory(workdir)}. Pretrain with python -m "
            f"bt_jax.train --workdir={workdir} (checkpoints every config.checkpoint.every_steps "
            "steps, config.checkpoint.keep of them kept)."
        )
    missing = sorted(set(steps or ()) - set(retained))
    if missing:
        raise checkpoint.NoCheckpointError(
            f"No checkpoints of steps {missing} in {checkpoint.directory(workdir)}; retained: "
            f"{retained}."
        )
    steps = sorted(steps) if steps else retained
    load_variables(workdir, config, steps[-1])  # an architecture error before any work
    context = make_context(config, labelled_source(config), mesh)
    records, baseline_results = [], None
    for step in steps:
        variables, _ = load_variables(workdir, config, step)
        results = with_baselines(
            protocols, context, variables, baselines=baselines and baseline_results is None
        )
        if baseline_results is None:
            baseline_results = {
                p: {k: v for k, v in r.items() if k != "pretrained"} for p, r in results.items()
            }
        results = {
            p: {"pretrained": results[p]["pretrained"], **baseline_results[p]} for p in protocols
        }
        records.append({"step": step, "results": results})
        logging.info("step %d: %s", step, results_lib.summary_line(results))
        tensorboard = {}
        for p in protocols:
            tensorboard.update(results_lib.scalars(p, results[p]))
        metric_logging.write_scalars(workdir, step, tensorboard)
    if jax.process_index() == 0:
        files.write_json(
            epath.Path(workdir) / "eval_checkpoints.json",
            {
                "protocols": protocols,
                "dataset": config.eval.dataset or config.data.dataset,
                "model": config.model.to_dict(),
                "checkpoints": records,
                "seconds": round(time.perf_counter() - start, 3),
            },
        )
    return records


def at_end(
    config: ml_collections.ConfigDict,
    variables: Any,
    source: data.Source,
    workdir: epath.PathLike,
    mesh: jax.sharding.Mesh,
    logger,
    step: int,
) -> dict:
    """The main job's closing evaluation: the quick protocols (logreg, kNN) on the trained
    backbone beside the baselines (unless ``config.eval.baselines`` is off); printed, written
    to ``eval_quick.json`` and logged."""
    context = make_context(config, source, mesh)
    results = with_baselines(QUICK, context, variables, baselines=config.eval.baselines)
    line = results_lib.summary_line(results)
    if jax.process_index() == 0:
        print(f"step {step}: {line}", flush=True)
    logging.info("Evaluation at step %d: %s", step, line)
    record = _record("quick", step, config, results, 0.0)
    del record["seconds"]
    tensorboard = {}
    for protocol in QUICK:
        tensorboard.update(results_lib.scalars(protocol, results[protocol]))
    if jax.process_index() == 0:
        files.write_json(results_lib.results_path(workdir, "quick"), record)
    logger.scalars(step, tensorboard)
    return results
