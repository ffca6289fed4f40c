"""The etils.epath operations bt_jax uses, checked on an empty gs:// prefix.

Imported by test_gcs_emulator.py and by the subprocesses it starts with another epath backend
(so it imports nothing heavy).
"""

from __future__ import annotations

import os

import pytest
from etils import epath


def check_epath_round_trip(root: epath.Path, mkdir_writes_a_marker: bool) -> None:
    """The epath operations bt_jax uses, on ``root`` (an empty gs:// prefix)."""
    config = root / "run" / "config.json"
    config.parent.mkdir(parents=True, exist_ok=True)
    # Directories are name prefixes. TF's gfile writes an empty "run/" object; gcsfs nothing.
    assert config.parent.exists() == mkdir_writes_a_marker
    config.write_text('{"a": 1}')
    assert config.read_text() == '{"a": 1}'
    assert config.exists() and config.is_file()
    assert config.parent.exists() and config.parent.is_dir()
    assert config.stat().length == 8
    (root / "run" / "metrics.jsonl").write_bytes(b"1\n")
    (root / "run" / "ckpt" / "1" / "x").write_text("x")
    assert sorted(p.name for p in (root / "run").iterdir()) == [
        "ckpt",
        "config.json",
        "metrics.jsonl",
    ]
    assert sorted(p.name for p in (root / "run").glob("*.json*")) == [
        "config.json",
        "metrics.jsonl",
    ]
    assert [os.fspath(p) for p in (root / "run" / "ckpt").glob("*/x")] == [
        os.fspath(root / "run" / "ckpt" / "1" / "x")
    ]
    # replace onto an existing object: the destination has the new bytes, the source is gone.
    staged = root / "run" / "config.json.tmp"
    staged.write_text('{"a": 2}')
    staged.replace(config)
    assert config.read_text() == '{"a": 2}' and not staged.exists()
    (root / "run").rmtree()
    assert not (root / "run").exists() and list(root.glob("*")) == []
    with pytest.raises(FileNotFoundError):
        (root / "missing.txt").read_text()
