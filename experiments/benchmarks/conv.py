"""Benchmark: forward + backward of each convolution of a ResNet, by form, against PyTorch.

    python experiments/benchmarks/conv.py                          # ResNet-18, cifar stem, 32 px
    python experiments/benchmarks/conv.py --batch=512 --repeats=5  # both views in one call
    /work/bench-venv/bin/python experiments/benchmarks/conv.py --against-pytorch
    python experiments/benchmarks/conv.py --forms=xla,tap_matmul,xla_nchw,shifted_matmul,patches \\
        --compiler-options=xla_cpu_use_onednn=true

One row per distinct convolution of the network (its input shape, kernel, stride; "count" is how
many the network has): the milliseconds of one forward pass and the gradients with respect to
input and kernel, for each form, the median over --repeats rounds in which every form runs once
in turn (so that load from other processes falls on all alike). "total" weights each row by its
count: the convolutions' share of one forward + backward pass of the backbone.

Forms: the model's own, ``bt_jax.models.conv`` ("xla": lax.conv_general_dilated throughout;
"tap_matmul": XLA's convolution forward and for the input gradient, the kernel gradient as
per-tap matrix products; "auto": what the model runs by default), and for the record:
"xla_nchw" (XLA's convolution in PyTorch's layout, transposes included), "shifted_matmul" (the
forward pass as one matrix product per kernel tap over shifted windows, autodiff for the rest),
"patches" (conv_general_dilated_patches, then one matrix product). Every form's gradients are
checked against "xla" before timing. "pytorch" (with --against-pytorch) is torch.nn.Conv2d,
NCHW as torchvision's ResNets, forward and backward on the same shapes in the same process.
"""

from __future__ import annotations

import argparse
import functools
import statistics
import sys
import time
from collections import Counter
from collections.abc import Callable

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
from jax import lax

from bt_jax import models
from bt_jax.models import conv as conv_lib

SETTINGS = {
    # name: (backbone, stem, image side)
    "cifar32": ("resnet18", "cifar", 32),
    "imagenet224": ("resnet50", "imagenet", 224),
}
RECORD_FORMS = ("xla_nchw", "shifted_matmul", "patches")
TORCH_HINT = (
    "--against-pytorch needs PyTorch, which bt_jax does not depend on: run this with "
    "/work/bench-venv/bin/python, or pip install torch in a separate environment."
)


def conv_shapes(backbone: str, stem: str, size: int, width: int, batch: int) -> Counter:
    """{(input shape [B, H, W, C], features, kernel, stride): count} of every conv of the
    backbone, read off an abstract forward pass."""
    model = models.create(backbone, stem=stem, width=width)
    shapes: Counter = Counter()

    def record(next_fun, args, kwargs, context):
        module = context.module
        if isinstance(module, conv_lib.Conv) and context.method_name == "__call__":
            shapes[(tuple(args[0].shape), module.features, module.kernel_size, module.stride)] += 1
        return next_fun(*args, **kwargs)

    images = jax.ShapeDtypeStruct((batch, size, size, 3), jnp.float32)
    with nn.intercept_methods(record):
        jax.eval_shape(functools.partial(model.init, train=False), jax.random.key(0), images)
    return shapes


def _shifted_matmul(x, kernel, stride, padding):
    kh, kw, channels, _ = kernel.shape
    x_pad = jnp.pad(x, ((0, 0), padding[0], padding[1], (0, 0)))
    out_h = (x_pad.shape[1] - kh) // stride + 1
    out_w = (x_pad.shape[2] - kw) // stride + 1
    out = 0
    for i in range(kh):
        for j in range(kw):
            window = lax.slice(
                x_pad,
                (0, i, j, 0),
                (x.shape[0], i + (out_h - 1) * stride + 1, j + (out_w - 1) * stride + 1, channels),
                (1, stride, stride, 1),
            )
            out = out + jnp.einsum("bhwc,co->bhwo", window, kernel[i, j])
    return out


def _patches(x, kernel, stride, padding):
    kh, kw, channels, features = kernel.shape
    # Patches come out feature-major: [B, Ho, Wo, C * kh * kw], channel slowest.
    cols = lax.conv_general_dilated_patches(
        x, (kh, kw), (stride, stride), padding, dimension_numbers=("NHWC", "HWIO", "NHWC")
    )
    return cols @ kernel.transpose(2, 0, 1, 3).reshape(channels * kh * kw, features)


def _xla_nchw(x, kernel, stride, padding):
    y = lax.conv_general_dilated(
        x.transpose(0, 3, 1, 2),
        kernel.transpose(3, 2, 0, 1),
        (stride, stride),
        padding,
        dimension_numbers=("NCHW", "OIHW", "NCHW"),
    )
    return y.transpose(0, 2, 3, 1)


def form_function(form: str) -> Callable:
    if form in conv_lib.FORMS:
        return lambda x, k, s, p: conv_lib.conv2d(x, k, s, p, form)
    return {"xla_nchw": _xla_nchw, "shifted_matmul": _shifted_matmul, "patches": _patches}[form]


def jax_runner(form: str, shape, compiler_options: dict) -> tuple[Callable, tuple]:
    """(run() -> gradients, for the check; its arguments) for one conv shape and form."""
    (batch, height, width, channels), features, kernel_size, stride = shape
    pad = kernel_size // 2
    padding = ((pad, pad), (pad, pad))
    conv = form_function(form)
    rng = np.random.default_rng(0)
    x = jnp.asarray(rng.standard_normal((batch, height, width, channels)), jnp.float32)
    kernel = jnp.asarray(
        rng.standard_normal((kernel_size, kernel_size, channels, features))
        / np.sqrt(kernel_size * kernel_size * channels),
        jnp.float32,
    )
    out_shape = jax.eval_shape(lambda: conv(x, kernel, stride, padding)).shape
    g = jnp.asarray(rng.standard_normal(out_shape), jnp.float32)

    def forward_backward(x, kernel, g):
        y, vjp = jax.vjp(lambda x_, k_: conv(x_, k_, stride, padding), x, kernel)
        return vjp(g)

    compiled = (
        jax.jit(forward_backward)
        .lower(x, kernel, g)
        .compile(compiler_options=compiler_options or None)
    )
    return lambda: compiled(x, kernel, g), (x, kernel, g)


def torch_runner(shape) -> Callable:
    import torch

    (batch, height, width, channels), features, kernel_size, stride = shape
    conv = torch.nn.Conv2d(channels, features, kernel_size, stride, kernel_size // 2, bias=False)
    x = torch.randn(batch, channels, height, width, requires_grad=True)
    with torch.no_grad():
        g = torch.randn_like(conv(x))

    def run():
        x.grad = None
        conv.weight.grad = None
        conv(x).backward(g)
        return x.grad

    return run


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--setting", default="cifar32", choices=list(SETTINGS))
    parser.add_argument(
        "--batch",
        type=int,
        default=256,
        help="images per call (a view of global batch 256: 256; both views: 512)",
    )
    parser.add_argument("--width", type=int, default=64)
    parser.add_argument(
        "--forms",
        default="xla,tap_matmul,auto",
        help=f"of {list(conv_lib.FORMS) + list(RECORD_FORMS)}",
    )
    parser.add_argument("--repeats", type=int, default=3, help="timed rounds (after one warm-up)")
    parser.add_argument(
        "--against-pytorch",
        action="store_true",
        help="add torch.nn.Conv2d (needs torch: " + TORCH_HINT + ")",
    )
    parser.add_argument(
        "--compiler-options",
        default="",
        help="XLA options for the JAX forms, KEY=VALUE,... e.g. xla_cpu_use_onednn=true",
    )
    args = parser.parse_args()
    forms = args.forms.split(",")
    for form in forms:
        if form not in conv_lib.FORMS + RECORD_FORMS:
            parser.error(f"unknown form {form!r}")
    options = {}
    for item in filter(None, args.compiler_options.split(",")):
        key, _, value = item.partition("=")
        options[key] = {"true": True, "false": False}.get(value, value)
    if args.against_pytorch:
        try:
            import torch
        except ImportError:
            sys.exit("error: " + TORCH_HINT)
        forms_and_torch = forms + ["pytorch"]
        torch_note = f"; torch {torch.__version__}, {torch.get_num_threads()} threads"
    else:
        forms_and_torch = forms
        torch_note = ""
    backbone, stem, size = SETTINGS[args.setting]
    shapes = conv_shapes(backbone, stem, size, args.width, args.batch)
    device = jax.devices()[0]
    print(
        f"# {device.platform}: {device.device_kind}; {backbone} ({stem} stem, {size} px, "
        f"width {args.width}), batch {args.batch}; forward + both gradients, ms, median of "
        f"{args.repeats} alternating rounds{torch_note}; XLA options {options or 'default'}"
    )
    columns = ["input", "kernel", "out", "stride", "count"] + [f"{f} ms" for f in forms_and_torch]
    if args.against_pytorch:
        columns += [f"pytorch/{f}" for f in forms]
    print("| " + " | ".join(columns) + " |")
    print("|" + "---|" * len(columns))
    totals = dict.fromkeys(forms_and_torch, 0.0)
    for shape, count in shapes.items():
        runners = {}
        reference = jax.block_until_ready(jax_runner("xla", shape, options)[0]())
        for form in forms:
            run, _ = jax_runner(form, shape, options)
            grads = jax.block_until_ready(run())
            for got, want in zip(grads, reference):
                scale = float(jnp.max(jnp.abs(want)))
                error = float(jnp.max(jnp.abs(got - want))) / scale
                if error > 1e-4:
                    sys.exit(
                        f"error: form {form} differs from xla by {error:.1e} (relative) on {shape}"
                    )
            runners[form] = lambda run=run: jax.block_until_ready(run())
        if args.against_pytorch:
            runners["pytorch"] = torch_runner(shape)
        times = {name: [] for name in runners}
        for round_ in range(args.repeats + 1):
            for name, run in runners.items():
                start = time.perf_counter()
                run()
                if round_:  # round 0 warms up
                    times[name].append(time.perf_counter() - start)
        ms = {name: 1e3 * statistics.median(values) for name, values in times.items()}
        for name in ms:
            totals[name] += count * ms[name]
        (batch, height, width, channels), features, kernel_size, stride = shape
        row = [
            f"{batch}x{height}x{width}x{channels}",
            f"{kernel_size}x{kernel_size}",
            str(features),
            str(stride),
            str(count),
        ] + [f"{ms[f]:.1f}" for f in forms_and_torch]
        if args.against_pytorch:
            row += [f"{ms['pytorch'] / ms[f]:.2f}" for f in forms]
        print("| " + " | ".join(row) + " |", flush=True)
    row = ["total", "", "", "", str(sum(shapes.values()))] + [
        f"{totals[f]:.1f}" for f in forms_and_torch
    ]
    if args.against_pytorch:
        row += [f"{totals['pytorch'] / totals[f]:.2f}" for f in forms]
    print("| " + " | ".join(row) + " |")


if __name__ == "__main__":
    main()
