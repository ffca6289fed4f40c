"""Benchmark: the full pretraining step beside a minimal step of the same network (and PyTorch).

    python experiments/benchmarks/train_step.py --settings=cifar32 --batch=256 \\
        --projector=2048-2048-2048 --dtypes=float32
    python experiments/benchmarks/train_step.py --steps=bt_jax,minimal,bt_jax_two_calls,\\
        bt_jax_conv_xla,bt_jax_no_probe,reference --batch=64
    /work/bench-venv/bin/python experiments/benchmarks/train_step.py --against-pytorch \\
        --batch=256 --projector=2048-2048-2048

Steps (--steps, comma-separated; each a variant of one training step on random uint8 views):

* ``bt_jax``: the trainer's step, ``bt_jax.step.train_step`` under ``parallel.map_step``
  (jit of shard_map over every local device): views finished on the device, both views through
  the model in one call with per-view sync BatchNorm, the loss over the all-gathered batch, pmean
  of the gradients, the official LARS, the online probe, the state donated.
* ``minimal``: the same network (same model, same options) in the least step code: jit of
  value_and_grad, ``bt_jax.loss.barlow_twins_loss``, optax.lars; no shard_map, no collectives,
  no probe. What the network alone costs.
* ``bt_jax_two_calls``, ``bt_jax_conv_xla``, ``bt_jax_no_probe``, ``bt_jax_local_bn``: the
  trainer's step with one call per view, with XLA's own convolution gradients (``conv="xla"``),
  without the probe, with per-device BatchNorm statistics (the same values on one device).
* ``reference``: the minimal step of the network as it was before (one call per view,
  ``conv="xla"``): what the model options gain.
* ``pytorch`` (added by --against-pytorch): the official-style PyTorch step, torchvision
  resnet18 (cifar stem: 3x3/1 conv1, no max-pool; zero_init_residual) or resnet50 + the
  projector (Linear no bias, BatchNorm1d, ReLU), the loss on ``BatchNorm1d(affine=False)``
  embeddings, ``loss.backward()``, the official LARS step (weight decay and trust ratio for
  ndim != 1 only, momentum before the learning rate), float32, in this process.

The steps run in turn, one step each per round, for --repeats rounds after one warm-up round,
so that load from other processes falls on all alike; the table gives the median. "Images"
counts examples of the global batch (each seen in two views). ``ratio`` is each step's images/s
over the first step's; ``cores_busy`` the process's CPU seconds per wall second during the step
(how many of the CPU's cores the step kept busy, median). Peak memory is XLA's accounting of
the compiled step (arguments + outputs + temporaries, per device).

Imports no TensorFlow (an accelerator machine lent for measurements has none), nor PyTorch
unless --against-pytorch.
"""

from __future__ import annotations

import argparse
import functools
import resource
import statistics
import sys
import time
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import optax
from jax.sharding import PartitionSpec as P

from bt_jax import loss as loss_lib
from bt_jax import models, optim, parallel, probe
from bt_jax import state as state_lib
from bt_jax import step as step_lib
from bt_jax.data import photometric
from bt_jax.data import views as views_lib
from bt_jax.state import TrainState

SETTINGS = {
    # name: (model, stem, image size, default global batch)
    "cifar32": ("resnet18", "cifar", 32, 256),
    "imagenet224": ("resnet50", "imagenet", 224, 64),
}
LAMBD = 0.0051
NUM_CLASSES = 10
LEARNING_RATE_WEIGHTS, LEARNING_RATE_BIASES = 0.2, 0.0048  # official, per 256 examples
TORCH_HINT = (
    "--against-pytorch needs PyTorch, which bt_jax does not depend on: run this with "
    "/work/bench-venv/bin/python (torch + torchvision, CPU), or pip install torch "
    "torchvision in a separate environment."
)

# name: (kind, options)
STEPS = {
    "bt_jax": ("full", {}),
    "bt_jax_two_calls": ("full", {"views_in_one_call": False}),
    "bt_jax_conv_xla": ("full", {"conv": "xla"}),
    "bt_jax_no_probe": ("full", {"probe": False}),
    "bt_jax_local_bn": ("full", {"sync_bn": False}),
    "minimal": ("minimal", {}),
    "reference": ("minimal", {"conv": "xla", "views_in_one_call": False}),
    "pytorch": ("pytorch", {}),
}


# The trainer's own view finishing (photometric ops on the host: normalisation only);
# bt_jax.data loads TensorFlow only for the input pipeline, not for this.
finish_views = functools.partial(photometric.finish_views, seed=0, photometric="host")


class Setup:
    """What every step variant shares: the setting, the batch, the host data."""

    def __init__(
        self,
        setting: str,
        batch: int | None,
        width: int,
        projector: str,
        dtype: str,
        image_size: int | None = None,
        seed: int = 0,
    ):
        self.model_name, self.stem, self.size, default_batch = SETTINGS[setting]
        self.size = image_size or self.size
        self.setting, self.width, self.projector, self.dtype = setting, width, projector, dtype
        self.batch = batch or default_batch
        rng = np.random.default_rng(seed)
        shape = (self.batch, self.size, self.size, 3)
        self.data = {
            "view_a": rng.integers(0, 256, shape, dtype=np.uint8),
            "view_b": rng.integers(0, 256, shape, dtype=np.uint8),
            "label": rng.integers(0, NUM_CLASSES, self.batch).astype(np.int32),
        }

    def model(self, conv: str = "auto", axis_name: str | None = None):
        return models.create_model(
            self.model_name,
            projector=self.projector,
            stem=self.stem,
            width=self.width,
            dtype=self.dtype,
            axis_name=axis_name,
            conv=conv,
        )

    def init_variables(self, model) -> dict:
        init_model = model.clone(
            backbone=model.backbone.clone(axis_name=None),
            projector=model.projector.clone(axis_name=None),
        )
        images = jnp.zeros((2, self.size, self.size, 3), jnp.float32)
        # Compiled as the trainer compiles its step-0 state: a program that runs once.
        return state_lib.run_once(
            functools.partial(init_model.init, jax.random.key(0), images, train=False)
        )


class Runner:
    """One step variant: ``step()`` runs one step (carrying its state) and waits for it;
    ``compiled``: the compiled XLA program (None for PyTorch)."""

    def __init__(self, step: Callable[[], Any], compiled: Any = None):
        self.step, self.compiled = step, compiled
        self.peak_mib = float("nan") if compiled is None else _peak_mib(compiled)


def _peak_mib(compiled) -> float:
    memory = compiled.memory_analysis()
    if memory is None:
        return float("nan")
    return (
        memory.argument_size_in_bytes + memory.output_size_in_bytes + memory.temp_size_in_bytes
    ) / 2**20


def full_runner(
    setup: Setup,
    conv: str = "auto",
    views_in_one_call: bool = True,
    probe_enabled: bool = True,
    sync_bn: bool = True,
) -> Runner:
    """The trainer's step: bt_jax.step.train_step under parallel.map_step (shard_map)."""
    mesh = parallel.device_mesh(jax.local_devices())
    model = setup.model(conv, axis_name=parallel.AXIS if sync_bn else None)
    tx = optim.lars(global_batch=setup.batch, steps_per_epoch=100, num_epochs=10, warmup_epochs=1)
    probe_tx = optax.sgd(0.1, momentum=probe.MOMENTUM)
    variables = setup.init_variables(model)
    probe_params = probe.init_params(
        model.backbone.num_features, NUM_CLASSES if probe_enabled else None
    )
    state = TrainState.create(variables, tx, probe_params, probe_tx)
    state = jax.device_put(state, parallel.replicated(mesh))
    step_fn = functools.partial(
        step_lib.train_step,
        model=model,
        tx=tx,
        probe_tx=probe_tx,
        loss_options={"lambd": LAMBD, "method": "auto"},
        finish_views=finish_views,
        views_in_one_call=views_in_one_call,
    )
    # What parallel.map_step(step_fn, mesh) runs (it adds a barrier between processes), built
    # here so that the compiled step's memory analysis can be read.
    mapped = jax.jit(
        jax.shard_map(step_fn, mesh=mesh, in_specs=(P(), P(parallel.AXIS), P()), out_specs=P()),
        donate_argnums=(0,),
    )
    batch = parallel.global_batch(setup.data, mesh)
    key = jax.random.key(0)
    compiled = mapped.lower(state, batch, key).compile()
    holder = {"state": state}

    def step():
        holder["state"], metrics = compiled(holder["state"], batch, key)
        jax.block_until_ready(metrics)

    return Runner(step, compiled)


def minimal_runner(setup: Setup, conv: str = "auto", views_in_one_call: bool = True) -> Runner:
    """The same network in the least step code: jit(value_and_grad), optax.lars, no probe."""
    model = setup.model(conv)
    variables = setup.init_variables(model)
    tx = optax.lars(LEARNING_RATE_WEIGHTS * setup.batch / 256, weight_decay=1.5e-6, momentum=0.9)

    def step(params, batch_stats, opt_state, batch):
        views = finish_views(batch)

        def loss_fn(p):
            state_vars = {"params": p, "batch_stats": batch_stats}
            if views_in_one_call:
                both = jnp.concatenate([views["view_a"], views["view_b"]])
                (_, z), updates = model.apply(state_vars, both, views=2, mutable=["batch_stats"])
                z_a, z_b = jnp.split(z, 2)
            else:
                (_, z_a), updates = model.apply(
                    state_vars, views["view_a"], mutable=["batch_stats"]
                )
                (_, z_b), updates = model.apply(
                    {"params": p, **updates}, views["view_b"], mutable=["batch_stats"]
                )
            return loss_lib.barlow_twins_loss(z_a, z_b, lambd=LAMBD), updates["batch_stats"]

        (loss, batch_stats), grads = jax.value_and_grad(loss_fn, has_aux=True)(params)
        updates, opt_state = tx.update(grads, opt_state, params)
        return optax.apply_updates(params, updates), batch_stats, opt_state, loss

    batch = {key: jnp.asarray(setup.data[key]) for key in ("view_a", "view_b")}
    state = (variables["params"], variables["batch_stats"], tx.init(variables["params"]))
    compiled = jax.jit(step, donate_argnums=(0, 1, 2)).lower(*state, batch).compile()
    holder = {"state": state}

    def run():
        *new_state, loss = compiled(*holder["state"], batch)
        holder["state"] = tuple(new_state)
        jax.block_until_ready(loss)

    return Runner(run, compiled)


def torch_runner(setup: Setup) -> Runner:
    """The official-style PyTorch step (facebookresearch/barlowtwins main.py), CPU, float32."""
    import torch
    import torchvision

    if setup.dtype != "float32":
        raise SystemExit("error: the PyTorch step runs in float32 only; use --dtypes=float32.")
    torch.manual_seed(0)
    backbone = getattr(torchvision.models, setup.model_name)(zero_init_residual=True)
    if setup.stem == "cifar":
        backbone.conv1 = torch.nn.Conv2d(3, setup.width, 3, 1, 1, bias=False)
        backbone.maxpool = torch.nn.Identity()
    if setup.width != 64:
        raise SystemExit(
            "error: torchvision's ResNets have width 64; use --width=64 with --against-pytorch."
        )
    features = backbone.fc.in_features
    backbone.fc = torch.nn.Identity()
    sizes = [features] + list(models.parse_spec(setup.projector))
    layers = []
    for i in range(len(sizes) - 2):
        layers += [
            torch.nn.Linear(sizes[i], sizes[i + 1], bias=False),
            torch.nn.BatchNorm1d(sizes[i + 1]),
            torch.nn.ReLU(inplace=True),
        ]
    layers.append(torch.nn.Linear(sizes[-2], sizes[-1], bias=False))
    projector = torch.nn.Sequential(*layers)
    bn = torch.nn.BatchNorm1d(sizes[-1], affine=False)
    network = torch.nn.ModuleList([backbone, projector, bn])
    batch = setup.batch

    def barlow_twins_loss(y1, y2):
        z1, z2 = projector(backbone(y1)), projector(backbone(y2))
        c = bn(z1).T @ bn(z2) / batch
        on_diag = torch.diagonal(c).add_(-1).pow_(2).sum()
        off_diag = c.flatten()[:-1].view(c.shape[0] - 1, c.shape[0] + 1)[:, 1:].flatten()
        return on_diag + LAMBD * off_diag.pow_(2).sum()

    weights = [p for p in network.parameters() if p.ndim != 1]
    biases = [p for p in network.parameters() if p.ndim == 1]
    groups = [
        {"params": weights, "lr": LEARNING_RATE_WEIGHTS * batch / 256},
        {"params": biases, "lr": LEARNING_RATE_BIASES * batch / 256},
    ]
    optimizer = _official_lars(torch)(groups, lr=0, weight_decay=1.5e-6)

    def normalized(key):
        x = torch.from_numpy(setup.data[key]).permute(0, 3, 1, 2).float().div_(255)
        mean = torch.tensor(views_lib.IMAGENET_MEAN).view(1, 3, 1, 1)
        std = torch.tensor(views_lib.IMAGENET_STD).view(1, 3, 1, 1)
        return (x - mean) / std

    network.train()

    def step():
        # The official loop's to(device) of uint8-decoded, normalised views: normalised here.
        y1, y2 = normalized("view_a"), normalized("view_b")
        optimizer.zero_grad()
        loss = barlow_twins_loss(y1, y2)
        loss.backward()
        optimizer.step()
        float(loss)

    return Runner(step)


def _official_lars(torch):
    """The official LARS (main.py), with its exclusion of 1-D parameters from weight decay and
    the trust ratio, momentum accumulated before the learning rate."""

    class LARS(torch.optim.Optimizer):
        def __init__(self, params, lr, weight_decay=0, momentum=0.9, eta=0.001):
            super().__init__(
                params, dict(lr=lr, weight_decay=weight_decay, momentum=momentum, eta=eta)
            )

        @torch.no_grad()
        def step(self):
            for g in self.param_groups:
                for p in g["params"]:
                    dp = p.grad
                    if dp is None:
                        continue
                    if p.ndim != 1:  # weight_decay_filter and lars_adaptation_filter
                        dp = dp.add(p, alpha=g["weight_decay"])
                        param_norm = torch.norm(p)
                        update_norm = torch.norm(dp)
                        one = torch.ones_like(param_norm)
                        q = torch.where(
                            param_norm > 0.0,
                            torch.where(
                                update_norm > 0, (g["eta"] * param_norm / update_norm), one
                            ),
                            one,
                        )
                        dp = dp.mul(q)
                    state = self.state[p]
                    if "mu" not in state:
                        state["mu"] = torch.zeros_like(p)
                    mu = state["mu"]
                    mu.mul_(g["momentum"]).add_(dp)
                    p.add_(mu, alpha=-g["lr"])

    return LARS


def build(name: str, setup: Setup) -> Runner:
    kind, options = STEPS[name]
    if kind == "full":
        return full_runner(
            setup,
            conv=options.get("conv", "auto"),
            views_in_one_call=options.get("views_in_one_call", True),
            probe_enabled=options.get("probe", True),
            sync_bn=options.get("sync_bn", True),
        )
    if kind == "minimal":
        return minimal_runner(
            setup,
            conv=options.get("conv", "auto"),
            views_in_one_call=options.get("views_in_one_call", True),
        )
    return torch_runner(setup)


def _cpu_seconds() -> float:
    """User + system CPU time of this process, all its threads."""
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return usage.ru_utime + usage.ru_stime


def measure(names: list[str], setup: Setup, repeats: int) -> list[dict]:
    """Builds every step, then times them in turn, one step each per round; a row per step."""
    runners, compile_seconds = {}, {}
    for name in names:
        start = time.perf_counter()
        runners[name] = build(name, setup)
        runners[name].step()  # the warm-up round
        compile_seconds[name] = time.perf_counter() - start
    times = {name: [] for name in names}
    cores_busy = {name: [] for name in names}  # process CPU seconds per wall second
    for _ in range(repeats):
        for name, runner in runners.items():
            cpu_start, start = _cpu_seconds(), time.perf_counter()
            runner.step()
            times[name].append(time.perf_counter() - start)
            cores_busy[name].append((_cpu_seconds() - cpu_start) / times[name][-1])
    rows = []
    for name in names:
        seconds = statistics.median(times[name])
        rows.append(
            {
                "step": name,
                "setting": setup.setting,
                "model": setup.model_name,
                "batch": setup.batch,
                "dtype": setup.dtype,
                "ms_per_step": 1e3 * seconds,
                "images_per_second": setup.batch / seconds,
                "cores_busy": statistics.median(cores_busy[name]),
                "peak_mib": runners[name].peak_mib,
                "first_step_seconds": compile_seconds[name],
            }
        )
    base = rows[0]["images_per_second"]
    for row in rows:
        row["ratio"] = row["images_per_second"] / base
    return rows


COLUMNS = [
    "step",
    "setting",
    "model",
    "batch",
    "dtype",
    "ms_per_step",
    "images_per_second",
    "ratio",
    "cores_busy",
    "peak_mib",
    "first_step_seconds",
]


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--settings", default="cifar32", help=f"comma-separated, of {list(SETTINGS)}"
    )
    parser.add_argument(
        "--batch", type=int, default=None, help="global batch (default per setting)"
    )
    parser.add_argument("--repeats", type=int, default=3, help="timed rounds after one warm-up")
    parser.add_argument("--width", type=int, default=64)
    parser.add_argument("--projector", default="8192-8192-8192")
    parser.add_argument("--dtypes", default="float32")
    parser.add_argument(
        "--image-size", type=int, default=None, help="override the setting's image side (tiny runs)"
    )
    parser.add_argument(
        "--steps",
        default="bt_jax,minimal",
        help=f"comma-separated, of {list(STEPS)}; the first is the ratios' base",
    )
    parser.add_argument(
        "--against-pytorch",
        action="store_true",
        help=f"add the official-style PyTorch step (needs torch: {TORCH_HINT})",
    )
    args = parser.parse_args(argv)
    names = args.steps.split(",")
    for name in names:
        if name not in STEPS:
            parser.error(f"unknown step {name!r}; choose from {list(STEPS)}")
    for setting in args.settings.split(","):
        if setting not in SETTINGS:
            parser.error(f"unknown setting {setting!r}; choose from {list(SETTINGS)}")
    torch_note = ""
    if args.against_pytorch or "pytorch" in names:
        try:
            import torch
        except ImportError:
            sys.exit("error: " + TORCH_HINT)
        if "pytorch" not in names:
            names.append("pytorch")
        torch_note = f"; torch {torch.__version__} with {torch.get_num_threads()} threads"
    device = jax.devices()[0]
    print(
        f"# {device.platform}: {device.device_kind} x {jax.local_device_count()}; width "
        f"{args.width}, projector {args.projector}; median of {args.repeats} alternating "
        f"rounds after one warm-up{torch_note}"
    )
    print("| " + " | ".join(COLUMNS) + " |")
    print("|" + "---|" * len(COLUMNS))
    for setting in args.settings.split(","):
        for dtype in args.dtypes.split(","):
            setup = Setup(setting, args.batch, args.width, args.projector, dtype, args.image_size)
            for row in measure(names, setup, args.repeats):
                print("| " + " | ".join(_cell(row[c]) for c in COLUMNS) + " |", flush=True)


def _cell(value) -> str:
    if isinstance(value, float):
        return f"{value:.2f}" if value < 10 else f"{value:.1f}"
    return str(value)


if __name__ == "__main__":
    main()
