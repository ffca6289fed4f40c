"""bt_jax.convert's files and command line: round trips through every container; for each bad
input one `error:` line, exit status 1, no traceback, and nothing written."""

import os
import subprocess
import sys

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from convert_helpers import official_state_dict, random_variables

from bt_jax import checkpoint, convert, models
from bt_jax.convert import files

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
# A process where `import torch` fails whether or not torch is installed.
WITHOUT_TORCH = (
    "import sys; sys.modules['torch'] = None; "
    "from bt_jax import cli, convert; cli.run(convert.main)"
)


@pytest.fixture(scope="module")
def r18_state_dict():
    return convert.flax_to_torchvision(random_variables("resnet18", width=8))


def main(*args):
    """The command line in this process: its exit status (errors raise)."""
    return convert.main([str(a) for a in args])


def test_command_line_round_trip(tmp_path, r18_state_dict):
    np.savez(tmp_path / "tv.npz", **r18_state_dict)
    assert main(tmp_path / "tv.npz", tmp_path / "flax.msgpack") == 0
    variables = convert.load_variables(tmp_path / "flax.msgpack")
    chex.assert_trees_all_equal(variables, convert.torchvision_to_flax(r18_state_dict))
    assert main(tmp_path / "flax.msgpack", tmp_path / "back.npz") == 0
    chex.assert_trees_all_equal(convert.load_state_dict(tmp_path / "back.npz"), r18_state_dict)
    # Flax .npz ("/" keys) also works as either end.
    assert main(tmp_path / "tv.npz", tmp_path / "flax.npz") == 0
    chex.assert_trees_all_equal(convert.load_variables(str(tmp_path / "flax.npz")), variables)
    # And a prefix put before every torch key.
    assert main(tmp_path / "flax.npz", tmp_path / "prefixed.npz", "--prefix", "module.") == 0
    prefixed = {f"module.{k}": v for k, v in r18_state_dict.items()}
    chex.assert_trees_all_equal(convert.load_state_dict(tmp_path / "prefixed.npz"), prefixed)
    written = ["back.npz", "flax.msgpack", "flax.npz", "prefixed.npz", "tv.npz"]
    assert sorted(os.listdir(tmp_path)) == written  # no temporary file left


def test_command_line_prefix_and_errors(tmp_path, r18_state_dict, capsys):
    full = {f"module.backbone.{k}": v for k, v in r18_state_dict.items()}
    full["module.projector.0.weight"] = np.zeros((4, 64), np.float32)
    np.savez(tmp_path / "ckpt.npz", **full)
    with pytest.raises(convert.ConversionError, match="prefix"):
        main(tmp_path / "ckpt.npz", tmp_path / "out.msgpack")
    prefix = ["--prefix", "module.backbone."]
    assert main(tmp_path / "ckpt.npz", tmp_path / "out.msgpack", *prefix) == 0
    out = capsys.readouterr().out
    assert "Ignored 1 keys outside prefix" in out and "module.projector.0.weight" in out
    with pytest.raises(convert.ConversionError, match="already holds Flax variables"):
        main(tmp_path / "out.msgpack", tmp_path / "again.msgpack")


def test_with_projector_round_trip_through_files(tmp_path, capsys):
    sd = official_state_dict()
    np.savez(tmp_path / "official.npz", **sd)
    assert main(tmp_path / "official.npz", tmp_path / "model.msgpack", "--with-projector") == 0
    summary = capsys.readouterr().out
    assert "resnet18 (stem cifar, width 4, num_classes None) + projector 48-48-24" in summary
    dropped = ["module.bn.num_batches_tracked", "module.bn.running_mean", "module.bn.running_var"]
    assert f"Not carried: {dropped}" in summary
    variables = convert.load_variables(tmp_path / "model.msgpack")
    chex.assert_trees_all_equal(variables, convert.torch_to_flax_model(sd))
    args = ["--with-projector", "--prefix", "module."]
    assert main(tmp_path / "model.msgpack", tmp_path / "back.npz", *args) == 0
    back = convert.load_state_dict(tmp_path / "back.npz")
    assert sorted(back) == sorted(sd)
    kept = [k for k in sd if not k.endswith("num_batches_tracked") and k not in dropped]
    chex.assert_trees_all_equal({k: back[k] for k in kept}, {k: sd[k] for k in kept})
    # Without the flag the backbone alone, as before.
    assert main(tmp_path / "model.msgpack", tmp_path / "backbone.npz") == 0
    backbone = convert.load_state_dict(tmp_path / "backbone.npz")
    start = "module.backbone."
    assert sorted(backbone) == sorted(k[len(start) :] for k in sd if k.startswith(start))
    # A backbone alone is not a model.
    assert main(tmp_path / "backbone.npz", tmp_path / "backbone.msgpack") == 0
    with pytest.raises(convert.ConversionError, match="params/backbone and params/projector"):
        main(tmp_path / "backbone.msgpack", tmp_path / "x.npz", "--with-projector")


def test_exported_backbone_converts_to_torchvision(tmp_path):
    model_config = dict(
        name="resnet18",
        stem="cifar",
        width=8,
        zero_init_residual=True,
        projector="16-16",
        dtype="float32",
    )
    model = models.create_model(**model_config)
    variables = jax.device_get(
        model.init(jax.random.key(0), jnp.zeros((2, 16, 16, 3)), train=False)
    )
    checkpoint.export(tmp_path, model_config, variables)
    assert main(tmp_path / "backbone.msgpack", tmp_path / "resnet18.npz") == 0
    backbone = {key: variables[key]["backbone"] for key in ("params", "batch_stats")}
    chex.assert_trees_all_equal(
        convert.load_state_dict(tmp_path / "resnet18.npz"), convert.flax_to_torchvision(backbone)
    )


def test_writes_are_atomic(tmp_path):
    out = tmp_path / "out.npz"
    out.write_bytes(b"old")

    def fails_half_way(f):
        f.write(b"partial")
        raise OSError("No space left on device")

    with pytest.raises(OSError, match="No space"):
        files.write_atomically(out, fails_half_way)
    assert out.read_bytes() == b"old" and os.listdir(tmp_path) == ["out.npz"]
    files.write_atomically(out, lambda f: f.write(b"new"))
    assert out.read_bytes() == b"new" and os.listdir(tmp_path) == ["out.npz"]


# ---------------------------------------------------------------------------------------------
# Bad input through the real command line: one line, status 1, no traceback, nothing written.


def run_cli(*args, without_torch=False):
    env = dict(os.environ, JAX_PLATFORMS="cpu", TF_CPP_MIN_LOG_LEVEL="2")
    env.pop("BT_JAX_VERBOSE", None)
    command = [sys.executable] + (
        ["-c", WITHOUT_TORCH] if without_torch else ["-m", "bt_jax.convert"]
    )
    return subprocess.run(
        command + [str(a) for a in args],
        cwd=REPO,
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )


def write_bad_input(case, tmp_path, r18_state_dict):
    """Files for one bad input; returns (command line arguments, without_torch, fragments)."""
    out = tmp_path / "out.msgpack"
    if case == "text_as_npz":
        (tmp_path / "weights.npz").write_text("these are not weights\n")
        return (
            [tmp_path / "weights.npz", out],
            False,
            ["weights.npz is not a .npz archive (no zip header)"],
        )
    if case == "truncated_npz":
        np.savez(tmp_path / "weights.npz", **r18_state_dict)
        data = (tmp_path / "weights.npz").read_bytes()
        (tmp_path / "weights.npz").write_bytes(data[: len(data) // 2])
        return (
            [tmp_path / "weights.npz", out],
            False,
            ["is not a readable .npz archive (BadZipFile", "truncated or damaged"],
        )
    if case == "missing_in":
        return [tmp_path / "nope.npz", out], False, ["nope.npz does not exist"]
    if case == "missing_out_directory":
        # IN lacks a key too: the OUT check comes first, before any conversion.
        np.savez(
            tmp_path / "weights.npz",
            **{k: v for k, v in r18_state_dict.items() if k != "bn1.weight"},
        )
        missing = tmp_path / "no" / "such"
        return (
            [tmp_path / "weights.npz", missing / "out.msgpack"],
            False,
            [f"Output directory {missing} does not exist"],
        )
    if case == "unknown_out_extension":
        np.savez(tmp_path / "weights.npz", **r18_state_dict)
        return [tmp_path / "weights.npz", tmp_path / "out.h5"], False, ["unknown extension '.h5'"]
    if case == "pth_in_without_torch":
        (tmp_path / "weights.pth").write_bytes(b"\x80\x02}q\x00.")
        return [tmp_path / "weights.pth", out], True, ["needs PyTorch", "bt_jax[torch]", ".npz"]
    if case == "pth_out_without_torch":
        convert.save_variables(convert.torchvision_to_flax(r18_state_dict), tmp_path / "flax.npz")
        return [tmp_path / "flax.npz", tmp_path / "weights.pth"], True, ["needs PyTorch"]
    if case == "nan_weights":
        sd = official_state_dict()
        sd["module.projector.3.weight"][:2, :] = np.nan
        np.savez(tmp_path / "official.npz", **sd)
        return (
            [tmp_path / "official.npz", out, "--with-projector"],
            False,
            [
                "Refusing to write non-finite weights: module.projector.3.weight "
                "(params/projector/linear1/kernel) "
                "has 96 NaN/inf values out of 2304"
            ],
        )
    if case == "missing_key":
        np.savez(
            tmp_path / "weights.npz",
            **{k: v for k, v in r18_state_dict.items() if k != "layer3.1.bn2.bias"},
        )
        return [tmp_path / "weights.npz", out], False, ["missing keys: ['layer3.1.bn2.bias']"]
    if case == "wrong_projector_shape":
        sd = official_state_dict()
        sd["module.projector.1.running_var"] = np.ones(7, np.float32)
        np.savez(tmp_path / "official.npz", **sd)
        return (
            [tmp_path / "official.npz", out, "--with-projector"],
            False,
            ["module.projector.1.running_var has shape (7,), needs (48,)"],
        )
    raise ValueError(case)


BAD_INPUTS = [
    "text_as_npz",
    "truncated_npz",
    "missing_in",
    "missing_out_directory",
    "unknown_out_extension",
    "pth_in_without_torch",
    "pth_out_without_torch",
    "nan_weights",
    "missing_key",
    "wrong_projector_shape",
]


@pytest.mark.parametrize("case", BAD_INPUTS)
def test_bad_input_is_one_line_and_writes_nothing(case, tmp_path, r18_state_dict):
    args, without_torch, fragments = write_bad_input(case, tmp_path, r18_state_dict)
    before = {p: p.read_bytes() for p in tmp_path.rglob("*") if p.is_file()}
    process = run_cli(*args, without_torch=without_torch)
    assert process.returncode == 1, process.stderr
    lines = process.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), process.stderr
    for fragment in fragments:
        assert fragment in lines[0]
    assert "Traceback" not in process.stderr and process.stdout == ""
    assert {p: p.read_bytes() for p in tmp_path.rglob("*") if p.is_file()} == before


def test_bad_input_keeps_an_existing_out(tmp_path):
    sd = official_state_dict()
    sd["module.projector.0.weight"][0, 0] = np.inf
    np.savez(tmp_path / "official.npz", **sd)
    (tmp_path / "out.msgpack").write_bytes(b"the previous conversion")
    process = run_cli(tmp_path / "official.npz", tmp_path / "out.msgpack", "--with-projector")
    assert process.returncode == 1 and "has 1 NaN/inf values" in process.stderr
    assert (tmp_path / "out.msgpack").read_bytes() == b"the previous conversion"
    assert sorted(os.listdir(tmp_path)) == ["official.npz", "out.msgpack"]


def test_verbose_shows_the_traceback(tmp_path):
    process = run_cli(tmp_path / "nope.npz", tmp_path / "out.msgpack", "--verbose")
    assert process.returncode == 1
    assert "Traceback" in process.stderr and "ConversionError: Input file" in process.stderr
