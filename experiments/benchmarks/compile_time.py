"""Where compilation time goes: the step-0 state at two XLA levels, or a whole compilation cache.

    python experiments/benchmarks/compile_time.py                # init_state: default vs level 1
    python experiments/benchmarks/compile_time.py --cache=.pytest_cache/jax_compilation

The first compiles the default config's ``init_state`` at XLA's default backend optimisation
level and at ``bt_jax.state.CPU_INIT_COMPILER_OPTIONS``, once each, and says whether the two
programs give the same bits. The second sums the compile time that JAX's persistent cache
records in each entry (whole seconds), by program name: after a cold test run, what the suite
spent compiling.
"""

from __future__ import annotations

import argparse
import collections
import functools
import pathlib
import re
import time


def summarise_cache(directory: pathlib.Path, top: int) -> None:
    from jax._src import compilation_cache

    seconds, entries = collections.Counter(), collections.Counter()
    for path in directory.iterdir():
        if not path.name.endswith("-cache"):
            continue
        raw = compilation_cache.decompress_executable(path.read_bytes())
        _, compile_seconds = compilation_cache.extract_executable_and_time(raw)
        name = re.sub(r"-[0-9a-f]{20,}.*", "", path.name)
        seconds[name] += compile_seconds
        entries[name] += 1
    print("| program | entries | compile s |\n| --- | --- | --- |")
    for name, total in seconds.most_common(top):
        print(f"| {name} | {entries[name]} | {total} |")
    print(f"| all | {sum(entries.values())} | {sum(seconds.values())} |")


def compare_init_levels() -> None:
    import jax
    import numpy as np

    from bt_jax import config as config_lib
    from bt_jax import state as state_lib

    config = config_lib.get_config()
    model = state_lib.build_model(config, axis_name=None)
    tx = state_lib.build_optimizer(config, steps_per_epoch=5)
    lowered = jax.jit(functools.partial(state_lib.init_state, config, model, tx)).lower()
    # Once each: a second compile of the same program in one process is served from memory.
    seconds, outputs = {}, {}
    for name, options in (("default", None), ("level 1", state_lib.CPU_INIT_COMPILER_OPTIONS)):
        start = time.perf_counter()
        compiled = lowered.compile(options)
        seconds[name] = time.perf_counter() - start
        outputs[name] = jax.device_get(compiled())
    same = all(
        np.array_equal(a, b)
        for a, b in zip(jax.tree.leaves(outputs["default"]), jax.tree.leaves(outputs["level 1"]))
    )
    print(f"init_state of the default config ({jax.devices()[0].device_kind}):")
    print("| XLA backend level | compile s |\n| --- | --- |")
    for name, value in seconds.items():
        print(f"| {name} | {value:.2f} |")
    print(f"default / level 1: {seconds['default'] / seconds['level 1']:.1f}x; same bits: {same}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--cache", type=pathlib.Path, help="a JAX compilation cache directory")
    parser.add_argument("--top", type=int, default=15)
    args = parser.parse_args()
    if args.cache:
        summarise_cache(args.cache, args.top)
    else:
        compare_init_levels()


if __name__ == "__main__":
    main()
