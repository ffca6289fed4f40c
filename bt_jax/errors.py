"""The errors a user can act on. Every command line prints them as one line, never a traceback.

Each module raises its own subclass of :class:`Error` (``ConfigError``, ``DataError``, ...), whose
message says what was wrong, the value, and what to do. :func:`bt_jax.cli.run` catches them at
the edge of every command line; ``--verbose`` (or ``BT_JAX_VERBOSE=1``) shows the traceback for
a bug report.
"""

from __future__ import annotations


class Error(Exception):
    """A problem with the input, the data, the workdir or the machine that the user can fix."""
