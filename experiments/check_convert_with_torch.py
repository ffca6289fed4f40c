"""bt_jax.convert against real PyTorch: the official main.py model, its checkpoint.pth, and back.

Needs torch and torchvision (not bt_jax dependencies), e.g. the benchmark venv:

    /work/bench-venv/bin/python experiments/check_convert_with_torch.py [--projector 8192-8192-8192]

1. Builds main.py's BarlowTwins (resnet50, DistributedDataParallel on a one-process gloo group;
   BatchNorm where main.py converts to SyncBatchNorm, which DDP accepts only on GPUs and whose
   state dict keys are the same), gives every parameter and BatchNorm statistic random values,
   takes one step of main.py's LARS (its filter function defined here in __main__, as in
   main.py) and saves `dict(epoch, model, optimizer)` exactly as main.py does.
2. `python -m bt_jax.convert checkpoint.pth model.msgpack --with-projector`; the Flax
   BarlowTwinsModel in inference mode gives the torch model's representation and embedding.
3. Back: `model.msgpack -> model.pth --with-projector --prefix module.` loads into the DDP model
   with load_state_dict(strict=True); `model.msgpack -> resnet50.pth` into torchvision's resnet50
   (fc an identity); main.py's final `resnet50.pth` converts to the same backbone.
Prints the largest differences; exits 1 if one is over the tolerance.
"""

from __future__ import annotations

import argparse
import os
import shutil
import subprocess
import sys
import tempfile

import jax
import numpy as np
import torch
import torch.distributed as dist
import torchvision
from torch import nn, optim

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, REPO)  # check this checkout's bt_jax, whichever one is installed

from bt_jax import convert as bt_convert  # noqa: E402
from bt_jax import models  # noqa: E402

# Relative to the largest magnitude; float32 through 50 layers and an 8192-wide MLP.
TOLERANCE = 1e-4


class BarlowTwins(nn.Module):
    """main.py's model, as published (the loss's forward is not needed here)."""

    def __init__(self, projector: str):
        super().__init__()
        self.backbone = torchvision.models.resnet50(zero_init_residual=True)
        self.backbone.fc = nn.Identity()
        sizes = [2048] + list(map(int, projector.split("-")))
        layers = []
        for i in range(len(sizes) - 2):
            layers.append(nn.Linear(sizes[i], sizes[i + 1], bias=False))
            layers.append(nn.BatchNorm1d(sizes[i + 1]))
            layers.append(nn.ReLU(inplace=True))
        layers.append(nn.Linear(sizes[-2], sizes[-1], bias=False))
        self.projector = nn.Sequential(*layers)
        self.bn = nn.BatchNorm1d(sizes[-1], affine=False)


class LARS(optim.Optimizer):
    """main.py's LARS constructor, so its state dict pickles the filter functions as checkpoint.pth
    does; the step is a plain momentum step (only the state matters here)."""

    def __init__(
        self,
        params,
        lr,
        weight_decay=0,
        momentum=0.9,
        eta=0.001,
        weight_decay_filter=None,
        lars_adaptation_filter=None,
    ):
        defaults = dict(
            lr=lr,
            weight_decay=weight_decay,
            momentum=momentum,
            eta=eta,
            weight_decay_filter=weight_decay_filter,
            lars_adaptation_filter=lars_adaptation_filter,
        )
        super().__init__(params, defaults)

    @torch.no_grad()
    def step(self):
        for g in self.param_groups:
            for p in g["params"]:
                if p.grad is None:
                    continue
                mu = self.state[p].setdefault("mu", torch.zeros_like(p))
                mu.mul_(g["momentum"]).add_(p.grad)
                p.add_(mu, alpha=-g["lr"])


def exclude_bias_and_norm(p):
    return p.ndim == 1


def randomise(model: nn.Module, seed: int) -> None:
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, tensor in model.state_dict().items():
            if name.endswith("num_batches_tracked"):
                tensor.fill_(1234)
            elif name.endswith("running_var"):
                tensor.copy_(torch.rand(tensor.shape, generator=generator) + 0.5)
            elif name.endswith("weight") and tensor.ndim > 1:  # activations of order 1
                fan_in = tensor[0].numel()
                tensor.copy_(torch.randn(tensor.shape, generator=generator) / fan_in**0.5)
            else:
                tensor.copy_(
                    torch.randn(tensor.shape, generator=generator) * 0.1 + (name.endswith("weight"))
                )


def convert(*args: str) -> str:
    env = dict(os.environ, PYTHONPATH=REPO, JAX_PLATFORMS="cpu")
    process = subprocess.run(
        [sys.executable, "-m", "bt_jax.convert", *args],
        cwd=REPO,
        env=env,
        capture_output=True,
        text=True,
    )
    if process.returncode != 0:
        raise SystemExit(f"convert {args} failed:\n{process.stderr}")
    return process.stdout.strip()


def relative(a: np.ndarray, b: np.ndarray) -> float:
    return float(np.max(np.abs(a - b)) / np.max(np.abs(b)))


def main() -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("--projector", default="8192-8192-8192")
    args = parser.parse_args()
    workdir = tempfile.mkdtemp(prefix="bt_jax_convert_check_")
    try:
        return check(args.projector, workdir)
    finally:
        shutil.rmtree(workdir)  # 1.3 GiB of checkpoints at the official size


def check(projector: str, workdir: str) -> int:
    dist.init_process_group("gloo", init_method=f"file://{workdir}/pg", rank=0, world_size=1)

    model = BarlowTwins(projector)
    randomise(model, 0)
    weights = [p for p in model.parameters() if p.ndim != 1]
    biases = [p for p in model.parameters() if p.ndim == 1]
    model = nn.parallel.DistributedDataParallel(model)
    optimizer = LARS(
        [{"params": weights}, {"params": biases}],
        lr=1e-6,
        weight_decay=1.5e-6,
        weight_decay_filter=exclude_bias_and_norm,
        lars_adaptation_filter=exclude_bias_and_norm,
    )
    model.eval()
    images = torch.randn(4, 3, 64, 64, generator=torch.Generator().manual_seed(1))
    model.module.projector(model.module.backbone(images)).square().mean().backward()
    optimizer.step()
    checkpoint = os.path.join(workdir, "checkpoint.pth")
    torch.save(
        dict(epoch=7, model=model.state_dict(), optimizer=optimizer.state_dict()), checkpoint
    )
    torch.save(model.module.backbone.state_dict(), os.path.join(workdir, "resnet50.pth"))
    size = os.path.getsize(checkpoint) / 2**20
    print(f"checkpoint.pth: {len(model.state_dict())} model keys, {size:.0f} MiB")

    with torch.no_grad():
        representation = model.module.backbone(images).numpy()
        embedding = model.module.projector(torch.from_numpy(representation)).numpy()

    print(convert(checkpoint, os.path.join(workdir, "model.msgpack"), "--with-projector"))
    variables = bt_convert.load_variables(os.path.join(workdir, "model.msgpack"))
    flax_model = models.BarlowTwinsModel(models.create("resnet50"), models.Projector(projector))
    nhwc = images.numpy().transpose(0, 2, 3, 1)
    flax_rep, flax_emb = jax.jit(lambda v: flax_model.apply(v, nhwc, train=False))(variables)
    errors = {
        "representation (checkpoint.pth -> Flax)": relative(np.asarray(flax_rep), representation),
        "embedding (checkpoint.pth -> Flax)": relative(np.asarray(flax_emb), embedding),
    }

    print(
        convert(
            os.path.join(workdir, "model.msgpack"),
            os.path.join(workdir, "model.pth"),
            "--with-projector",
            "--prefix",
            "module.",
        )
    )
    reloaded = nn.parallel.DistributedDataParallel(BarlowTwins(projector)).eval()
    reloaded.load_state_dict(torch.load(os.path.join(workdir, "model.pth")), strict=True)
    original = model.state_dict()
    carried = [
        k
        for k in original
        if not k.endswith("num_batches_tracked") and not k.startswith("module.bn.")
    ]
    back = reloaded.state_dict()
    errors["model.pth -> torch, weights and statistics"] = max(
        float((back[k] - original[k]).abs().max()) for k in carried
    )

    print(convert(os.path.join(workdir, "model.msgpack"), os.path.join(workdir, "backbone.pth")))
    backbone = torchvision.models.resnet50()
    backbone.fc = nn.Identity()
    backbone.load_state_dict(torch.load(os.path.join(workdir, "backbone.pth")), strict=True)
    with torch.no_grad():
        errors["backbone.pth -> torchvision representation"] = relative(
            backbone.eval()(images).numpy(), representation
        )

    print(convert(os.path.join(workdir, "resnet50.pth"), os.path.join(workdir, "resnet50.msgpack")))
    released = bt_convert.load_variables(os.path.join(workdir, "resnet50.msgpack"))
    rep = jax.jit(lambda v: models.create("resnet50").apply(v, nhwc, train=False))(released)
    errors["main.py's resnet50.pth -> Flax representation"] = relative(
        np.asarray(rep), representation
    )

    width = max(len(k) for k in errors)
    print(f"\n{'check':<{width}}  max difference (relative to the largest value; copies: absolute)")
    for name, value in errors.items():
        print(f"{name:<{width}}  {value:.2e}")
    dist.destroy_process_group()
    return 0 if all(v <= TOLERANCE for v in errors.values()) else 1


if __name__ == "__main__":
    sys.exit(main())
