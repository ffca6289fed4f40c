"""Where training metrics go: TensorBoard (CLU's writers), ``metrics.jsonl`` and a progress bar.

Only process 0 writes; the others get a logger that does nothing, so the trainer calls it
unconditionally.
"""

from __future__ import annotations

import json
import os
from typing import Mapping

import numpy as np
import tqdm
from clu import metric_writers

METRICS_FILE = "metrics.jsonl"


class MetricLogger:
    """Scalars to TensorBoard and one JSON line per logged step; images to TensorBoard."""

    def __init__(self, workdir: str, *, total_steps: int, initial_step: int, enabled: bool):
        self.enabled = enabled
        if not enabled:
            return
        os.makedirs(workdir, exist_ok=True)
        self._writer = metric_writers.create_default_writer(workdir, asynchronous=False)
        # Append: a resumed run continues the same file.
        self._jsonl = open(os.path.join(workdir, METRICS_FILE), "a")
        self._progress = tqdm.tqdm(total=total_steps, initial=initial_step, unit="step",
                                   dynamic_ncols=True, mininterval=1.0)

    def scalars(self, step: int, values: Mapping[str, float]) -> None:
        if not self.enabled:
            return
        values = {key: float(value) for key, value in values.items()}
        self._writer.write_scalars(step, values)
        self._jsonl.write(json.dumps({"step": step, **values}) + "\n")
        self._jsonl.flush()
        if "loss" in values:
            self._progress.set_postfix(loss=f"{values['loss']:.4g}", refresh=False)

    def advance(self, steps: int = 1) -> None:
        if self.enabled:
            self._progress.update(steps)

    def correlation_image(self, step: int, matrix: np.ndarray) -> None:
        """matrix: [k, k] cross-correlation, entries in [-1, 1], drawn as a grayscale image."""
        if not self.enabled:
            return
        image = np.clip((np.asarray(matrix, np.float32) + 1.0) / 2.0, 0.0, 1.0)
        self._writer.write_images(step, {"cross_correlation": image[None, :, :, None]})

    def close(self) -> None:
        if not self.enabled:
            return
        self._progress.close()
        self._writer.flush()
        self._writer.close()
        self._jsonl.close()
