"""Where a training step's time goes: XLA's per-operation times from a profiler trace, by kind.

    python experiments/benchmarks/step_profile.py --steps=bt_jax,minimal --batch=64 \\
        --projector=2048-2048-2048
    python experiments/benchmarks/step_profile.py --steps=reference --top=20

For each step of ``train_step.py`` (same names), after a warm-up, one step per round runs under
``jax.profiler.trace``, the steps alternating within each round (--rounds); every XLA
operation the trace records (a CPU "thunk": a fusion, a library convolution or matrix product,
a collective, a copy) is matched to its instruction in the compiled program and counted under
a kind:

* ``conv forward``, ``conv backward``, ``conv kernel grad``: XLA convolutions (backward: the
  input gradient; kernel grad: XLA's own kernel gradient, a window spanning the feature map);
* ``matmul``: matrix products (the projector, the loss, and "tap_matmul" kernel gradients);
* ``collective``: all-reduce, all-gather and friends (on one device: copies at most);
* ``reduction``: fusions that reduce (BatchNorm statistics, sums);
* ``copy / transpose``: fusions that move data (copies, transposes, slices, pads), often with
  elementwise work fused in; ``elementwise / other``: the rest.

Thunks run concurrently on the CPU's threads, so the kinds add up to more than the step's wall
time; the table gives each kind's median over the rounds. Compare kinds across steps, in one run
(the machine's load changes between runs; on a shared 2-core VM one step of the same program
varies by ~20% from round to round).
"""

from __future__ import annotations

import argparse
import collections
import glob
import gzip
import json
import os
import re
import statistics
import sys
import tempfile
import time

import jax

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import train_step  # noqa: E402  (the steps, from the script beside this one)

KINDS = (
    "conv forward",
    "conv backward",
    "conv kernel grad",
    "matmul",
    "collective",
    "reduction",
    "copy / transpose",
    "elementwise / other",
)
_INSTRUCTION = re.compile(r"^\s*(?:ROOT )?%?([\w.\-]+) = (.*)$")
_COMPUTATION = re.compile(r"^(?:ENTRY )?%?([\w.\-]+) .*\{$")


def instructions(hlo_text: str) -> tuple[dict[str, str], dict[str, str]]:
    """({instruction name: its line}, {computation name: its body}) of a compiled program."""
    lines, bodies, current = {}, collections.defaultdict(list), None
    for line in hlo_text.splitlines():
        computation = _COMPUTATION.match(line)
        if computation:
            current = computation.group(1)
            continue
        instruction = _INSTRUCTION.match(line)
        if instruction:
            lines.setdefault(instruction.group(1), line.strip())
            if current:
                bodies[current].append(line)
    return lines, {name: "\n".join(body) for name, body in bodies.items()}


def kind_of(line: str, bodies: dict[str, str]) -> str:
    called = re.findall(r"calls=%?([\w.\-]+)", line)
    text = "\n".join([line] + [bodies.get(name, "") for name in called])
    convolution = re.search(r"= \w+\[([\d,]+)\][^\n]* convolution\([^\n]*", text)
    if convolution:
        out_side = int(convolution.group(1).split(",")[1])
        window = re.search(r"window=\{size=(\d+)", convolution.group(0))
        if window and int(window.group(1)) > out_side:  # the window spans the feature map
            return "conv kernel grad"
        return "conv backward" if "transpose(" in convolution.group(0) else "conv forward"
    if " dot(" in text:
        return "matmul"
    if re.search(r"all-reduce|all-gather|reduce-scatter|collective-permute|all-to-all", text):
        return "collective"
    if " reduce(" in text or "reduce-window" in text:
        return "reduction"
    if re.search(r"\b(copy|transpose|slice|dynamic-slice|pad|concatenate)\(", text):
        return "copy / transpose"
    return "elementwise / other"


def profile(runner: train_step.Runner) -> tuple[float, collections.Counter, list]:
    """(wall seconds of one step, {kind: thunk seconds}, the longest thunks)."""
    lines, bodies = instructions(runner.compiled.as_text())
    with tempfile.TemporaryDirectory() as directory:
        with jax.profiler.trace(directory, create_perfetto_trace=True):
            start = time.perf_counter()
            runner.step()
            wall = time.perf_counter() - start
        (path,) = glob.glob(os.path.join(directory, "**", "perfetto_trace.json.gz"), recursive=True)
        with gzip.open(path) as trace_file:
            trace = json.load(trace_file)
    events = trace["traceEvents"] if isinstance(trace, dict) else trace
    by_kind, by_thunk = collections.Counter(), collections.Counter()
    for event in events:
        name = event.get("name")
        # Loops and calls are timed as a whole and again by the operations inside: the latter.
        if (
            event.get("ph") == "X"
            and name in lines
            and not re.search(r" (while|conditional|call)\(", lines[name])
        ):
            seconds = event.get("dur", 0) / 1e6
            by_kind[kind_of(lines[name], bodies)] += seconds
            by_thunk[name] += seconds
    longest = [
        (seconds, name, kind_of(lines[name], bodies), lines[name].split(" = ", 1)[1][:120])
        for name, seconds in by_thunk.most_common()
    ]
    return wall, by_kind, longest


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    jax_steps = [n for n in train_step.STEPS if n != "pytorch"]
    parser.add_argument(
        "--steps", default="bt_jax,minimal", help=f"comma-separated, of {jax_steps}"
    )
    parser.add_argument("--setting", default="cifar32", choices=list(train_step.SETTINGS))
    parser.add_argument("--batch", type=int, default=64)
    parser.add_argument("--width", type=int, default=64)
    parser.add_argument("--projector", default="2048-2048-2048")
    parser.add_argument("--dtype", default="float32")
    parser.add_argument(
        "--image-size", type=int, default=None, help="override the setting's image side (tiny runs)"
    )
    parser.add_argument("--rounds", type=int, default=3, help="profiled steps of each variant")
    parser.add_argument("--top", type=int, default=0, help="also list the longest N operations")
    args = parser.parse_args()
    names = args.steps.split(",")
    for name in names:
        if name not in train_step.STEPS or name == "pytorch":
            parser.error(f"unknown step {name!r}")
    setup = train_step.Setup(
        args.setting, args.batch, args.width, args.projector, args.dtype, args.image_size
    )
    runners = {}
    for name in names:
        runners[name] = train_step.build(name, setup)
        runners[name].step()  # compile and warm up
    rounds = {name: [] for name in names}
    for _ in range(args.rounds):
        for name, runner in runners.items():
            rounds[name].append(profile(runner))
    # Per step: (median wall, {kind: median seconds}, the longest thunks of its last round).
    results = {
        name: (
            statistics.median(wall for wall, _, _ in profiles),
            {k: statistics.median(by_kind[k] for _, by_kind, _ in profiles) for k in KINDS},
            profiles[-1][2],
        )
        for name, profiles in rounds.items()
    }
    device = jax.devices()[0]
    print(
        f"# {device.platform}: {device.device_kind} x {jax.local_device_count()}; "
        f"{setup.model_name} {args.setting}, batch {setup.batch}, width {args.width}, "
        f"projector {args.projector}; thunk milliseconds of a step, by kind, median of "
        f"{args.rounds} alternating rounds"
    )
    print("| kind | " + " | ".join(names) + " |")
    print("|" + "---|" * (len(names) + 1))
    for kind in KINDS:
        print(f"| {kind} | " + " | ".join(f"{1e3 * results[n][1][kind]:.2f}" for n in names) + " |")
    print(
        "| all thunks | "
        + " | ".join(f"{1e3 * sum(results[n][1].values()):.2f}" for n in names)
        + " |"
    )
    print("| step wall time | " + " | ".join(f"{1e3 * results[n][0]:.2f}" for n in names) + " |")
    for name in names if args.top else ():
        print(f"\n{name}: the {args.top} longest operations (seconds)")
        for seconds, thunk, kind, line in results[name][2][: args.top]:
            print(f"  {seconds:7.3f}  {kind:20s} {thunk}  {line}")


if __name__ == "__main__":
    main()
