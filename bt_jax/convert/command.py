"""The command line: `python -m bt_jax.convert IN OUT [--with-projector] [--arch A] [--prefix P]`.

The direction follows IN: a PyTorch state dict (`.pth`/`.pt`, or `.npz` with torch keys) becomes
Flax variables (OUT `.msgpack` or `.npz`); Flax variables (`.msgpack`, or `.npz` with "/" keys)
become a PyTorch state dict (OUT `.pth`, `.pt` or `.npz`). Everything that can be checked without
converting (IN exists and has a known extension, OUT's extension and directory, PyTorch for
`.pth`) is checked first; nothing is written unless the whole conversion succeeded.
"""

from __future__ import annotations

import argparse

from etils import epath

from bt_jax import cli
from bt_jax.convert import files, model, resnet
from bt_jax.convert.layout import ConversionError

WRITABLE = files.FLAX_SUFFIXES + files.TORCH_SUFFIXES


def check_paths(src: str, dst: str) -> tuple[epath.Path, epath.Path]:
    """IN and OUT as epath Paths, after the checks that need no conversion."""
    src_path, dst_path = epath.Path(src), epath.Path(dst)
    if not src_path.exists():
        raise ConversionError(f"Input file {src} does not exist.")
    if src_path.is_dir():
        raise ConversionError(f"Input {src} is a directory; pass the weights file in it.")
    if src_path.suffix not in files.READABLE:
        raise ConversionError(
            f"Cannot read {src}: unknown extension {src_path.suffix!r}; "
            f"use one of {list(files.READABLE)}."
        )
    if dst_path.suffix not in WRITABLE:
        raise ConversionError(
            f"Cannot write {dst}: unknown extension {dst_path.suffix!r}; use .msgpack or .npz for "
            "Flax variables, .pth, .pt or .npz for a PyTorch state dict."
        )
    # Object stores have no directories to check; a missing bucket is reported by the write.
    if files.is_local(dst_path):
        if dst_path.is_dir():
            raise ConversionError(
                f"Output {dst} is a directory; pass a file name, e.g. {dst_path / 'out.msgpack'}."
            )
        parent = dst_path.parent
        if not parent.is_dir():
            raise ConversionError(
                f"Output directory {parent} does not exist; create it (mkdir -p {parent}) or "
                "choose another OUT."
            )
    if src_path.suffix in files.TORCH_SUFFIXES or dst_path.suffix in files.TORCH_SUFFIXES:
        files.import_torch()
    return src_path, dst_path


def _strip_prefix(state_dict: dict, prefix: str, src: epath.Path) -> tuple[dict, str]:
    outside = [k for k in state_dict if not k.startswith(prefix)]
    stripped = {k[len(prefix) :]: v for k, v in state_dict.items() if k.startswith(prefix)}
    if not stripped:
        raise ConversionError(f"No key of {src} starts with prefix {prefix!r}.")
    note = f" Ignored {len(outside)} keys outside prefix {prefix!r}, e.g. {outside[:3]}."
    return stripped, note if outside else ""


def convert_file(
    src: str,
    dst: str,
    arch: str | None = None,
    prefix: str | None = None,
    with_projector: bool = False,
) -> str:
    """Converts SRC to DST: the direction from SRC's content, the container from DST's extension.

    Returns a one-paragraph summary of what was written.

    with_projector: the whole official model (backbone + projector) instead of the backbone alone.
    prefix: reading PyTorch weights, the prefix to strip (backbone alone: keys outside it are
      ignored; whole model: what precedes "backbone.", found by itself when None); writing them,
      the prefix to put before every key (None: none).
    """
    src_path, dst_path = check_paths(src, dst)
    kind, tree, note = files.read(src_path)
    if kind == "flax":
        if dst_path.suffix not in (".npz",) + files.TORCH_SUFFIXES:
            raise ConversionError(
                f"{src} already holds Flax variables; write PyTorch weights to .pth, .pt or .npz."
            )
        if with_projector:
            state_dict = model.flax_model_to_torch(tree, prefix=prefix or "")
            what = "Flax BarlowTwinsModel variables -> official Barlow Twins state dict"
            note += f" {prefix or ''}bn.* (the loss BatchNorm) has PyTorch's initial statistics."
        else:
            if "backbone" in tree.get("params", {}):
                tree = resnet.backbone_variables(tree)
            state_dict = resnet.flax_to_torchvision(tree)
            if prefix:
                state_dict = {prefix + k: v for k, v in state_dict.items()}
            what = "Flax variables -> torchvision state dict"
        files.save_state_dict(state_dict, dst_path)
        return f"{what}: {len(state_dict)} keys written to {dst}.{note}"
    if dst_path.suffix in files.TORCH_SUFFIXES:
        raise ConversionError(
            f"{src} holds PyTorch weights; write Flax variables to .msgpack or .npz."
        )
    if with_projector:
        prefix = model.detect_prefix(tree) if prefix is None else prefix
        variables = model.torch_to_flax_model(tree, prefix=prefix, arch=arch)
        info, spec = model.infer_model(tree, prefix, arch)
        dropped = sorted(k for k in tree if k.startswith(prefix + model.LOSS_BN + "."))
        if dropped:
            note += (
                f" Not carried: {dropped} (the loss BatchNorm's running statistics, which neither "
                "the official training nor bt_jax reads)."
            )
        files.save_variables(variables, dst_path)
        return (
            "Official Barlow Twins state dict -> Flax BarlowTwinsModel variables of "
            f"{resnet.describe(info)} + projector {spec} written to {dst}.{note}"
        )
    if prefix:
        tree, stripped_note = _strip_prefix(tree, prefix, src_path)
        note += stripped_note
    info = resnet.infer_architecture(tree, arch)
    variables = resnet.torchvision_to_flax(tree, name=arch)
    files.save_variables(variables, dst_path)
    summary = f"torchvision state dict -> Flax variables of {resnet.describe(info)}"
    return f"{summary} written to {dst}.{note}"


def main(argv: list[str] | None = None) -> int:
    """The command line; errors propagate (run through bt_jax.cli.run for one `error:` line)."""
    parser = argparse.ArgumentParser(
        prog="python -m bt_jax.convert",
        description=(
            "Convert ResNet weights (and, with --with-projector, the official Barlow Twins "
            "projector) between a PyTorch state dict (.pth/.pt/.npz) and Flax variables "
            "(.msgpack/.npz)."
        ),
    )
    parser.add_argument("src", metavar="IN", help="PyTorch .pth/.pt/.npz, or Flax .msgpack/.npz")
    parser.add_argument("dst", metavar="OUT", help="Flax .msgpack/.npz, or PyTorch .pth/.pt/.npz")
    parser.add_argument(
        "--with-projector",
        action="store_true",
        help="the whole official model (backbone.*, projector.*, bn.*) <-> BarlowTwinsModel",
    )
    parser.add_argument(
        "--arch",
        default=None,
        help="PyTorch input: the expected backbone (resnet18 ... resnet152); default: its keys",
    )
    parser.add_argument(
        "--prefix",
        default=None,
        help="reading PyTorch keys: strip this ('module.backbone.' for a backbone; with "
        "--with-projector 'module.' is found by itself); writing them: put it before every key",
    )
    parser.add_argument(
        "--verbose",
        action="store_true",
        help=f"show the traceback of an error (or {cli.VERBOSE_ENV}=1)",
    )
    args = parser.parse_args(argv)
    print(
        convert_file(
            args.src,
            args.dst,
            arch=args.arch,
            prefix=args.prefix,
            with_projector=args.with_projector,
        )
    )
    return 0
