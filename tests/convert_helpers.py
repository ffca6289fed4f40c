"""Weights for the converter's tests: random values in a model's shapes; main.py's state dict."""

import numpy as np

from bt_jax import convert
from bt_jax.convert import layout


def random_like(template, seed=0):
    """Random float32 values in the template's shapes; variances positive, as a running average."""
    rng = np.random.default_rng(seed)
    items = []
    for path, leaf in layout.flatten(template):
        value = rng.standard_normal(leaf.shape).astype(np.float32)
        if path[-1] == "kernel":  # activations of order 1 through a deep random network
            value /= np.sqrt(np.prod(leaf.shape[:-1]))
        items.append((path, np.abs(value) + 0.5 if path[-1] == "var" else value))
    return layout.unflatten(items)


def random_variables(name, seed=0, **kw):
    """Backbone variables with random values, from the shape template (no init, no compile)."""
    return random_like(convert.expected_shapes(name, **kw), seed)


def random_model_variables(name="resnet18", spec="48-48-24", seed=0, width=4, stem="cifar"):
    """BarlowTwinsModel variables (backbone + projector) with random values."""
    return random_like(convert.expected_model_shapes(name, stem, width, spec), seed)


def official_state_dict(spec="48-48-24", width=4, seed=0, prefix="module."):
    """main.py's BarlowTwins state dict (resnet18 backbone, cifar stem), the projector built by
    hand in PyTorch's layout: Linear weight [out, in], BatchNorm1d at 3i + 1, ReLU at 3i + 2."""
    backbone = convert.flax_to_torchvision(
        random_variables("resnet18", seed, width=width, stem="cifar")
    )
    sd = {f"backbone.{k}": v for k, v in backbone.items()}
    rng = np.random.default_rng(seed + 1)
    sizes = [8 * width] + [int(s) for s in spec.split("-")]
    for i, (n_in, n_out) in enumerate(zip(sizes[:-1], sizes[1:])):
        sd[f"projector.{3 * i}.weight"] = (
            rng.standard_normal((n_out, n_in)) / np.sqrt(n_in)
        ).astype(np.float32)
        if i < len(sizes) - 2:
            bn = f"projector.{3 * i + 1}"
            sd[f"{bn}.weight"] = rng.uniform(0.5, 1.5, n_out).astype(np.float32)
            sd[f"{bn}.bias"] = rng.standard_normal(n_out).astype(np.float32)
            sd[f"{bn}.running_mean"] = rng.standard_normal(n_out).astype(np.float32)
            sd[f"{bn}.running_var"] = rng.uniform(0.5, 2.0, n_out).astype(np.float32)
            sd[f"{bn}.num_batches_tracked"] = np.array(1000, np.int64)
    sd["bn.running_mean"] = rng.standard_normal(sizes[-1]).astype(np.float32)
    sd["bn.running_var"] = rng.uniform(0.5, 2.0, sizes[-1]).astype(np.float32)
    sd["bn.num_batches_tracked"] = np.array(1000, np.int64)
    return {prefix + k: v for k, v in sd.items()}
