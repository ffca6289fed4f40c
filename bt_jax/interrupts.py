"""SIGTERM and SIGINT at any moment of a run: a clean stop, one line saying where, never a crash.

What a signal does depends on the phase of the run:

* ``start-up`` (checks, data, compilation, restore): exit at once, saying what was written
  (nothing, or the config of this start); no traceback, no half-torn-down threads.
* ``training``: finish the current step, save a checkpoint, exit (0 for SIGTERM: a preemption
  the scheduler restarts; 130 for Ctrl-C). With several processes (``jax.distributed``) the
  processes must agree on the step: JAX's preemption sync manager does that. Its SIGTERM
  notifier, installed by ``jax.distributed.initialize``, is left in place (no Python handler
  replaces it), and ``multihost_utils.reached_preemption_sync_point(step)`` is asked every step;
  a Ctrl-C is forwarded to it as a SIGTERM to this process.
* ``evaluation`` (the end-of-run quick protocols, after the final checkpoint and the export):
  exit at once; the evaluation can be rerun with ``python -m bt_jax.evaluate``.
"""

from __future__ import annotations

import os
import signal
import sys
from collections.abc import Callable

from absl import logging

STARTUP, TRAINING, EVALUATION = "start-up", "training", "evaluation"
EXIT_STATUS = {signal.SIGTERM: 0, signal.SIGINT: 130}


class Interrupts:
    """Installs the handlers; the loop asks :meth:`stop_requested` once per step."""

    def __init__(self, *, distributed: bool):
        self.distributed = distributed
        self.phase = STARTUP
        self.signal: int | None = None
        self.on_exit: list[Callable[[], None]] = []  # cleanups before an immediate exit
        self.exit_message = "nothing was written"
        self._previous = {}
        # With jax.distributed, SIGTERM belongs to JAX's preemption notifier.
        signals = (signal.SIGINT,) if distributed else (signal.SIGINT, signal.SIGTERM)
        for signum in signals:
            try:
                self._previous[signum] = signal.signal(signum, self._handle)
            except ValueError:  # not the main thread: the caller owns the signals
                pass

    def _handle(self, signum: int, frame) -> None:
        del frame
        if self.phase == TRAINING:
            if self.signal is None:
                logging.warning(
                    "Signal %d: saving a checkpoint and stopping after this step.", signum
                )
            self.signal = signum
            if self.distributed and signum == signal.SIGINT:
                os.kill(os.getpid(), signal.SIGTERM)  # JAX's notifier: every process agrees
            return
        self._exit_now(signum)

    def _exit_now(self, signum: int) -> None:
        name = signal.Signals(signum).name
        where = {
            STARTUP: "during start-up",
            TRAINING: "at the end of training",
            EVALUATION: "during the end-of-run evaluation",
        }
        sys.stderr.write(f"stopped by {name} {where[self.phase]}: {self.exit_message}.\n")
        sys.stderr.flush()
        for cleanup in self.on_exit:
            try:
                cleanup()
            except Exception:  # noqa: BLE001 - exiting anyway
                pass
        # os._exit, not an exception: XLA compilation and tf.data threads may be running, and
        # unwinding through them is what crashed (a segfault at exit) before.
        os._exit(EXIT_STATUS.get(signum, 128 + signum))

    def hand_sigterm_to_jax(self) -> None:
        """Before ``jax.distributed.initialize``: SIGTERM becomes JAX's (its preemption notifier
        is installed by initialize); a Ctrl-C is then forwarded to it during training."""
        self.distributed = True
        if signal.SIGTERM in self._previous:
            signal.signal(signal.SIGTERM, signal.SIG_DFL)
            del self._previous[signal.SIGTERM]

    def enter(self, phase: str, exit_message: str = "") -> None:
        """Moves to ``phase``; a signal that came after the last step (too late to stop
        training) stops the run now that the next phase would start."""
        self.phase = phase
        if exit_message:
            self.exit_message = exit_message
        if phase == EVALUATION and self.signal is not None:
            self._exit_now(self.signal)

    def seed(self, start_step: int) -> bool:
        """Before the first step of a (resumed) run: with several processes, registers the start
        step with JAX's preemption sync (a notice that came before would otherwise wait for a
        step that already passed); True if a stop is already agreed."""
        if not self.distributed:
            return self.signal is not None
        return self.stop_requested(start_step)

    def stop_requested(self, step: int) -> bool:
        """Whether to save and stop after ``step``; with several processes, True on every
        process at the same step."""
        if self.distributed:
            from jax.experimental import multihost_utils

            return bool(multihost_utils.reached_preemption_sync_point(step))
        return self.signal is not None

    @property
    def exit_status(self) -> int:
        """0 after a SIGTERM (a preemption), 130 after a Ctrl-C."""
        if self.signal is None:
            return 0  # with jax.distributed, JAX's notifier saw the SIGTERM, not us
        return EXIT_STATUS.get(self.signal, 128 + self.signal)

    def restore(self) -> None:
        for signum, handler in self._previous.items():
            signal.signal(signum, handler)
