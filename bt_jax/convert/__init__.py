"""Weights between PyTorch (torchvision, the official Barlow Twins code) and Flax.

    variables = torchvision_to_flax(state_dict)          # a ResNet: {"params", "batch_stats"}
    state_dict = flax_to_torchvision(variables)
    variables = torch_to_flax_model(checkpoint["model"])  # backbone + projector: BarlowTwinsModel's
    state_dict = flax_model_to_torch(variables, prefix="module.")

    python -m bt_jax.convert IN OUT [--with-projector] [--arch resnet50] [--prefix module.backbone.]

A state dict is a flat dict of NumPy arrays keyed as PyTorch names them; the architecture (and
the projector spec) is read from its keys and shapes, and every key and shape is checked against
it in both directions (`ConversionError` naming the missing, unexpected and mis-shaped keys).
Non-finite weights are refused, naming the first key and its count.

BatchNorm `running_var` is copied unchanged both ways. PyTorch keeps a running average of the
unbiased batch variance (times n / (n - 1)), Flax of the biased one; n (values per channel in a
batch: batch x H x W in the backbone, the global batch in the projector, 2048 officially) is not
in the weights, and the factor (1.0005 at 2048) is far below training noise. Running statistics
only matter in inference mode.

Modules: `layout` (the key/path table and the checks), `resnet` (torchvision ResNets), `model`
(the official model with its projector), `files` (reading and writing through etils.epath),
`command` (the command line). Reading or writing `.pth` needs PyTorch (`pip install
'bt_jax[torch]'`); nothing else here does.
"""

from bt_jax.convert.command import convert_file, main
from bt_jax.convert.files import load_state_dict, load_variables, save_state_dict, save_variables
from bt_jax.convert.layout import ConversionError, StateDict, Variables
from bt_jax.convert.model import (
    expected_model_shapes,
    flax_model_to_torch,
    infer_projector_spec,
    torch_to_flax_model,
)
from bt_jax.convert.resnet import (
    backbone_variables,
    expected_shapes,
    flax_to_torchvision,
    infer_architecture,
    torchvision_to_flax,
)

__all__ = [
    "ConversionError",
    "StateDict",
    "Variables",
    "backbone_variables",
    "convert_file",
    "expected_model_shapes",
    "expected_shapes",
    "flax_model_to_torch",
    "flax_to_torchvision",
    "infer_architecture",
    "infer_projector_spec",
    "load_state_dict",
    "load_variables",
    "main",
    "save_state_dict",
    "save_variables",
    "torch_to_flax_model",
    "torchvision_to_flax",
]
