"""The data errors a user can act on: each message names the file, key or value and what to do.

TF-free: importable wherever bt_jax.data is.
"""

from __future__ import annotations

from bt_jax import errors


class DataError(errors.Error, ValueError):
    """Bad data or a bad data argument. Also a ValueError: what callers caught before."""


class DataNotPreparedError(DataError, FileNotFoundError):
    """The data for a source is not on this machine; the message says how to get it."""
