"""The edge of every command line: one ``error: ...`` line for anything a user can fix.

    python -m bt_jax.train ... --verbose      # or BT_JAX_VERBOSE=1: tracebacks for bug reports

:func:`run` calls a CLI's main function and turns :class:`bt_jax.errors.Error`, I/O errors and
interrupts into one line on stderr and an exit status: 1 for an error, 130 for Ctrl-C. Anything
else is a bug: one line too, saying so and how to see the traceback.
"""

from __future__ import annotations

import ast
import gc
import importlib.util
import logging
import os
import sys
import threading
from collections.abc import Callable
from typing import NoReturn

from bt_jax import errors

VERBOSE_ENV = "BT_JAX_VERBOSE"
# Python's default (700, 10, 10) suits small scripts. A run's start-up allocates millions of
# long-lived objects (TensorFlow's and JAX's modules, the traced step), which every full
# collection then scans again: ~8% of a short run's CPU time and ~2 s of its start-up
# (`experiments/benchmarks/start_up.py`).
GC_THRESHOLDS = (10_000, 10, 10)


def verbose_requested(argv: list[str] | None = None) -> bool:
    """Whether ``--verbose`` is on the command line or ``BT_JAX_VERBOSE`` is set (not 0/false)."""
    argv = sys.argv if argv is None else argv
    env = os.environ.get(VERBOSE_ENV, "").strip().lower()
    return "--verbose" in argv or env not in ("", "0", "false", "no")


def strip_verbose(argv: list[str]) -> list[str]:
    """argv without ``--verbose`` (for parsers that do not define it)."""
    return [arg for arg in argv if arg != "--verbose"]


_STORAGE_FAILURES = (
    "No space left on device",
    "Disk quota exceeded",
    "Read-only file system",
    "Permission denied",
)


def describe(error: BaseException) -> str:
    """The one-line message for an error: its own text, or what an OSError was about."""
    if isinstance(error, errors.Error):
        message = str(error)
    elif isinstance(error, OSError):
        what = error.strerror or str(error)
        where = f" ({error.filename})" if error.filename else ""
        message = f"{what}{where}. Check the path, its permissions and the free space."
    elif any(mark in str(error) for mark in _STORAGE_FAILURES):
        # An OS error that a library (tensorstore, orbax) wrapped in its own type.
        message = f"{error}. Check the path, its permissions and the free space."
    else:
        message = (
            f"{type(error).__name__}: {error}. This is probably a bug in bt_jax; rerun "
            f"with --verbose (or {VERBOSE_ENV}=1) for the traceback and report it."
        )
    return " ".join(message.split())  # one line, whatever the message held


def bad_flags(error: BaseException, argv: list[str]) -> NoReturn:
    """A bad flag, config file or ``--config.KEY``: one line on stderr and exit status 2
    (re-raised with ``--verbose``)."""
    if verbose_requested(argv):
        raise error
    from absl import flags

    if isinstance(error, flags.Error):
        message = str(error)
    elif isinstance(error, (KeyError, AttributeError)) and error.args:
        # ml_collections: an override of a key the config does not have ("Did you mean ...").
        message = _unknown_key(str(error.args[0]))
    else:
        message = describe(error)
    sys.stderr.write(
        f"error: {' '.join(message.split())} (see --helpfull for the flags and "
        "--config.KEY names)\n"
    )
    sys.exit(2)


def _unknown_key(text: str) -> str:
    """ml_collections' "'widht'\\nDid you mean ..." (often repr-quoted twice) as one sentence."""
    for _ in range(2):
        try:
            text = str(ast.literal_eval(text))
        except (ValueError, SyntaxError):
            break
    key, _, hint = text.partition("\n")
    return f"unknown config key {key.strip(chr(39) + chr(34))!r}" + (f". {hint}" if hint else "")


def parse_flags(argv: list[str]) -> list[str]:
    """absl's parsing (``app.run(..., flags_parser=cli.parse_flags)``), bad input in one line."""
    from absl import flags

    try:
        return flags.FLAGS(argv)
    except Exception as error:  # noqa: BLE001 - flags, config files: anything is bad input
        bad_flags(error, argv)


def define_pod_flags(distributed_help: str) -> None:
    """The flags every pod command shares: --distributed and its arguments, --verbose."""
    from absl import flags

    flags.DEFINE_bool("distributed", False, distributed_help)
    flags.DEFINE_string("coordinator_address", None, "host:port of process 0.")
    flags.DEFINE_integer("num_processes", None, "Number of processes.")
    flags.DEFINE_integer("process_id", None, "This process's index.")
    flags.DEFINE_integer(
        "heartbeat_timeout_seconds",
        60,
        "With --distributed: a process that dies or freezes stops the others within about "
        "this long (JAX's default is 100).",
    )
    flags.DEFINE_bool("verbose", False, "Show tracebacks (for bug reports).")


def initialize_distributed_if_asked(interrupts) -> None:
    """``jax.distributed.initialize`` when --distributed or --coordinator_address is given;
    from then on SIGTERM goes to JAX's preemption notifier (bt_jax.interrupts)."""
    from absl import flags

    from bt_jax import parallel

    values = flags.FLAGS
    if not (values.distributed or values.coordinator_address):
        return
    interrupts.hand_sigterm_to_jax()
    parallel.initialize_distributed(
        values.coordinator_address,
        values.num_processes,
        values.process_id,
        values.heartbeat_timeout_seconds,
    )


def refuse_arguments(argv: list[str]) -> None:
    """absl's leftover positional arguments: exit 2 in one line."""
    if len(argv) > 1:
        sys.stderr.write(f"error: unexpected arguments {argv[1:]}; flags are --name=value.\n")
        sys.exit(2)


def _exit(status: int) -> NoReturn:
    """sys.exit for success; os._exit after an error, once the error line is out.

    With several JAX processes, an error on one host must not wait in jax.distributed's
    shutdown barrier (300 s, then every process aborts and the status is lost); the other hosts
    stop when they miss its heartbeat. On one host, the interpreter's shutdown after a failed
    asynchronous save makes the storage libraries' threads print tracebacks ("Event loop is
    closed") under the error line; the run's own files are closed by then.
    """
    if status:
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(status)
    sys.exit(status)


class LibraryLogFilter(logging.Filter):
    """Libraries (orbax above all) log every save at INFO: keep their warnings and errors, drop
    the rest, and (unless verbose) their tracebacks: the error line says what went wrong."""

    def __init__(self, verbose: bool = False):
        super().__init__()
        self.verbose = verbose

    def filter(self, record: logging.LogRecord) -> bool:
        ours = "bt_jax" in record.pathname
        if not ours and not self.verbose:
            record.exc_info, record.exc_text, record.stack_info = None, None, None
        return ours or record.levelno >= logging.WARNING


def _one_line_thread_error(args: threading.ExceptHookArgs) -> None:
    """A background thread's failure (e.g. an asynchronous checkpoint write when the disk is
    full) as one warning line; the main thread reports what it means for the run."""
    if args.exc_type is SystemExit:
        return
    name = args.thread.name if args.thread is not None else "a background thread"
    sys.stderr.write(f"warning: {name} failed: {describe(args.exc_value)}\n")


class _OnceEachUnraisable:
    """``sys.unraisablehook`` while a CLI runs: native libraries report failed callbacks through
    it (tensorstore, when an asynchronous write ends after orbax closed its event loop: once per
    pending write, a thousand tracebacks when the disk fills). One warning line for each
    distinct message instead; the main thread's ``error:`` line says what it means for the run.
    """

    def __init__(self):
        self.seen: set[str] = set()

    def __call__(self, unraisable) -> None:
        message = f"{unraisable.exc_type.__name__}: {unraisable.exc_value}"
        if message not in self.seen:
            self.seen.add(message)
            sys.stderr.write(f"warning: a library callback failed: {message}\n")


def collect_less() -> None:
    """Fewer garbage collections for a process that imports the heavy libraries (call it
    first); :func:`freeze_imports` once they are loaded."""
    gc.set_threshold(*GC_THRESHOLDS)


def skip_keras() -> None:
    """TensorFlow loads Keras at import (and Keras scikit-learn and SciPy's statistics): ~2 s
    of CPU in every process, for nothing bt_jax uses (tf.data and tf.summary need no Keras).
    TensorFlow skips it when told to use the separate ``tf_keras`` package (Keras 2) and that
    package is not installed; ``tf.keras`` then cannot be imported in this process. For
    bt_jax's own command lines, before TensorFlow loads; a value already set is kept."""
    if "tensorflow" in sys.modules or importlib.util.find_spec("tf_keras") is not None:
        return
    os.environ.setdefault("TF_USE_LEGACY_KERAS", "1")


def freeze_imports() -> None:
    """Every object alive now (the imported modules) is left out of later collections: they
    live as long as the process."""
    gc.freeze()


def run(main: Callable[[], int | None], *, verbose: bool | None = None) -> NoReturn:
    """Runs ``main()`` and exits with its status; errors become one ``error:`` line."""
    verbose = verbose_requested() if verbose is None else verbose
    if not verbose:
        threading.excepthook = _one_line_thread_error
        sys.unraisablehook = _OnceEachUnraisable()
    try:
        status = main()
    except SystemExit:
        raise
    except KeyboardInterrupt:
        if verbose:
            raise
        sys.stderr.write("error: interrupted (Ctrl-C).\n")
        _exit(130)
    except Exception as error:  # noqa: BLE001 - the edge: everything becomes one line
        if verbose:
            raise
        sys.stderr.write(f"error: {describe(error)}\n")
        _exit(1)
    sys.exit(status or 0)
