"""Where training metrics go: TensorBoard, a metrics history that object storage can hold, and
progress on stderr.

* TensorBoard (``tf.summary``): written in the workdir on a local disk; for a workdir on object
  storage, written to a local staging folder and uploaded as a new event file at each
  checkpoint and at the end (object stores have no append; TensorBoard reads every event file of
  a folder in order).
* ``WORKDIR/metrics/``: one JSON line per logged step. Object storage has no append either, so
  the history is written in chunks: ``metrics/steps-<first>-<last>.jsonl`` when a checkpoint is
  saved (the chunk and the checkpoint hold the same steps, so a resumed run never logs a step
  twice), and ``metrics/latest.jsonl``, rewritten at every log step with what came since.
  :func:`read_metrics` returns the whole history as one list.
* Progress: a live bar (tqdm) in a terminal; otherwise (pod logs, files) one line per log step:
  step, epoch, loss, images/s and ETA.

Only process 0 writes; the other processes get a logger that does nothing.
"""

from __future__ import annotations

import json
import shutil
import sys
import tempfile
import time
from collections.abc import Mapping

import numpy as np
from absl import logging
from etils import epath

from bt_jax import files

METRICS_DIR = "metrics"
LATEST = "latest.jsonl"
LEGACY_METRICS_FILE = "metrics.jsonl"  # runs written before the chunked history


def _chunk_name(first: int, last: int) -> str:
    return f"steps-{first:09d}-{last:09d}.jsonl"


def read_metrics(workdir: epath.PathLike) -> list[dict]:
    """Every logged record of a run, sorted by step, one per (step, key set).

    Reads the chunks, the latest part, and a ``metrics.jsonl`` of older runs. A step logged
    again after a resume (its values are recomputed identically) appears once.
    """
    workdir = epath.Path(workdir)
    paths = sorted((workdir / METRICS_DIR).glob("steps-*.jsonl"))
    if (workdir / METRICS_DIR / LATEST).exists():
        paths.append(workdir / METRICS_DIR / LATEST)
    if (workdir / LEGACY_METRICS_FILE).exists():
        paths.insert(0, workdir / LEGACY_METRICS_FILE)
    records: dict[tuple, dict] = {}
    for path in paths:
        for line in path.read_text().splitlines():
            if line.strip():
                record = json.loads(line)
                records[(record["step"], tuple(sorted(record)))] = record
    return sorted(records.values(), key=lambda r: r["step"])


class _EventWriter:
    """TensorBoard event files through ``tf.summary``, as CLU's SummaryWriter writes them.

    Not CLU's own: its module imports TensorBoard's hparams plugin, which needs ``tf.keras``,
    and the command lines load TensorFlow without Keras (``bt_jax.cli.skip_keras``).
    """

    def __init__(self, logdir: str):
        import tensorflow as tf

        self._summary = tf.summary
        self._writer = tf.summary.create_file_writer(logdir)

    def write_scalars(self, step: int, values: Mapping[str, float]) -> None:
        with self._writer.as_default(step=step):
            for key, value in values.items():
                self._summary.scalar(key, value)

    def write_images(self, step: int, images: Mapping[str, np.ndarray]) -> None:
        """images: name -> [N, H, W, C] in [0, 1]."""
        with self._writer.as_default(step=step):
            for key, value in images.items():
                self._summary.image(key, value, max_outputs=len(value))

    def flush(self) -> None:
        self._writer.flush()

    def close(self) -> None:
        self._writer.close()


class _TensorBoard:
    """The event writer in the workdir, or staged locally and uploaded for object storage."""

    def __init__(self, workdir: epath.Path):
        self.workdir = workdir
        self.remote = files.is_remote(workdir)
        self._staging = tempfile.mkdtemp(prefix="bt_jax_tb_") if self.remote else None
        self._open()

    def _open(self):
        self.writer = _EventWriter(self._staging if self.remote else str(self.workdir))

    def upload(self) -> None:
        """Sends what was written since the last upload as new event file(s) (remote only)."""
        self.writer.flush()
        if not self.remote:
            return
        self.writer.close()
        for path in epath.Path(self._staging).iterdir():
            (self.workdir / path.name).write_bytes(path.read_bytes())
            path.unlink()
        self._open()

    def close(self) -> None:
        self.upload()
        self.writer.close()
        if self._staging:
            shutil.rmtree(self._staging, ignore_errors=True)


class _Progress:
    """tqdm in a terminal; a periodic one-line log otherwise."""

    def __init__(self, total_steps: int, initial_step: int, steps_per_epoch: int):
        self.total, self.step, self.steps_per_epoch = total_steps, initial_step, steps_per_epoch
        self.start_step, self.start_time = initial_step, time.perf_counter()
        self._bar = None
        if sys.stderr.isatty():
            import tqdm

            self._bar = tqdm.tqdm(
                total=total_steps,
                initial=initial_step,
                unit="step",
                dynamic_ncols=True,
                mininterval=1.0,
            )

    def advance(self) -> None:
        self.step += 1
        if self._bar is not None:
            self._bar.update(1)

    def report(self, values: Mapping[str, float]) -> None:
        if self._bar is not None:
            if "loss" in values:
                self._bar.set_postfix(loss=f"{values['loss']:.4g}", refresh=False)
            return
        if "loss" not in values:
            return
        done = self.step - self.start_step
        elapsed = time.perf_counter() - self.start_time
        eta = elapsed / max(done, 1) * (self.total - self.step)
        epoch = self.step / max(self.steps_per_epoch, 1)
        rate = values.get("images_per_second", float("nan"))
        sys.stderr.write(
            f"step {self.step}/{self.total} (epoch {epoch:.2f}) loss {values['loss']:.6g} "
            f"images/s {rate:.1f} ETA {_duration(eta)}\n"
        )
        sys.stderr.flush()

    def close(self) -> None:
        if self._bar is not None:
            self._bar.close()


def _duration(seconds: float) -> str:
    seconds = int(max(seconds, 0))
    hours, rest = divmod(seconds, 3600)
    return f"{hours}h{rest // 60:02d}m" if hours else f"{rest // 60}m{rest % 60:02d}s"


class MetricLogger:
    """Scalars to TensorBoard and the metrics history; the C image; progress."""

    def __init__(
        self,
        workdir: epath.PathLike,
        *,
        total_steps: int,
        initial_step: int,
        steps_per_epoch: int,
        enabled: bool,
    ):
        self.enabled = enabled
        if not enabled:
            return
        self.workdir = epath.Path(workdir)
        self.metrics_dir = self.workdir / METRICS_DIR
        self.metrics_dir.mkdir(parents=True, exist_ok=True)
        self._drop_after(initial_step)
        self._pending: list[dict] = []  # records since the last chunk
        self._tensorboard = _TensorBoard(self.workdir)
        self._progress = _Progress(total_steps, initial_step, steps_per_epoch)

    def _drop_after(self, step: int) -> None:
        """A resumed run (perhaps from an earlier checkpoint than the latest, when that one was
        unreadable) recomputes every step after ``step``: their old chunks go."""
        for path in self.metrics_dir.glob("steps-*.jsonl"):
            if int(path.stem.split("-")[1]) > step:
                path.unlink()

    def scalars(self, step: int, values: Mapping[str, float]) -> None:
        if not self.enabled:
            return
        values = {key: float(value) for key, value in values.items()}
        self._tensorboard.writer.write_scalars(step, values)
        self._pending.append({"step": int(step), **values})
        files.write_text(
            self.metrics_dir / LATEST, "".join(json.dumps(r) + "\n" for r in self._pending)
        )
        self._progress.report(values)

    def advance(self) -> None:
        if self.enabled:
            self._progress.advance()

    def correlation_image(self, step: int, matrix: np.ndarray) -> None:
        """matrix: [k, k] cross-correlation, entries in [-1, 1], drawn as a grayscale image."""
        if not self.enabled:
            return
        image = np.clip((np.asarray(matrix, np.float32) + 1.0) / 2.0, 0.0, 1.0)
        self._tensorboard.writer.write_images(step, {"cross_correlation": image[None, :, :, None]})

    def checkpoint_saved(self, step: int) -> None:
        """Closes a chunk of the history at a checkpoint: the records up to ``step``."""
        if not self.enabled:
            return
        done = [r for r in self._pending if r["step"] <= step]
        if done:
            files.write_text(
                self.metrics_dir / _chunk_name(done[0]["step"], step),
                "".join(json.dumps(r) + "\n" for r in done),
            )
        self._pending = [r for r in self._pending if r["step"] > step]
        files.write_text(
            self.metrics_dir / LATEST, "".join(json.dumps(r) + "\n" for r in self._pending)
        )
        self._tensorboard.upload()

    def close(self) -> None:
        if not self.enabled:
            return
        self._progress.close()
        try:
            self._tensorboard.close()
        except Exception as error:  # noqa: BLE001 - losing the tail of the events is not fatal
            logging.warning("TensorBoard events could not be written: %s", error)


def write_scalars(workdir: epath.PathLike, step: int, scalars: Mapping[str, float]) -> None:
    """Scalars to the workdir's TensorBoard from outside a training run (evaluation results);
    one new event file (uploaded, for object storage). Process 0 only."""
    import jax

    if jax.process_index() != 0:
        return
    tensorboard = _TensorBoard(epath.Path(workdir))
    tensorboard.writer.write_scalars(int(step), {k: float(v) for k, v in scalars.items()})
    tensorboard.close()
