"""The table between PyTorch state dict keys and Flax variable paths, and the checks on both.

One `Entry` per torch key: the Flax leaf it comes from (collection first, e.g.
("params", "layer1_0", "conv1", "kernel")) and the axis permutation that turns the Flax array into
the torch one; or, for a torch buffer Flax does not keep (`num_batches_tracked`, the official
model's loss BatchNorm), no Flax path and the value PyTorch starts with. The tables of a ResNet
and of the projector are built from a variable tree by `entries` with a module-naming function;
`compare` lists every missing, unexpected and mis-shaped key in one message, and
`from_torch`/`to_torch` move the arrays, refusing non-finite ones.

Works on arrays and on `jax.ShapeDtypeStruct`s alike where only shapes are needed.
"""

from __future__ import annotations

import functools
from collections.abc import Callable, Iterable, Iterator, Mapping
from typing import Any, NamedTuple

import numpy as np

from bt_jax import errors

StateDict = dict[str, np.ndarray]
Variables = dict[str, Any]

COLLECTIONS = ("params", "batch_stats")
CONV_PERM = (3, 2, 0, 1)  # Flax [kh, kw, I, O] -> torch [O, I, kh, kw]
DENSE_PERM = (1, 0)  # Flax [in, out] -> torch [out, in]
VECTOR_PERM = (0,)
_LISTED = 8  # keys named in one message; the rest are counted


class ConversionError(errors.Error, ValueError):
    """Weights or a file that do not fit the architecture; the message says which keys."""


class Entry(NamedTuple):
    """One torch key and where its array lives in the Flax variables."""

    torch_key: str
    flax_path: tuple[str, ...] | None  # collection first; None: a torch buffer Flax does not keep
    perm: tuple[int, ...] = ()  # torch array = np.transpose(flax array, perm)
    fill: np.ndarray | None = None  # torch-only entries: the value PyTorch starts with


def init_shapes(module: Any, stem: str) -> Variables:
    """`module.init`'s variables as `jax.ShapeDtypeStruct`s (traced once per module, cached)."""
    return unflatten(flatten(_init_shapes(module, stem)))  # a copy: callers may change theirs


@functools.lru_cache(maxsize=16)
def _init_shapes(module: Any, stem: str) -> Variables:
    import jax
    import jax.numpy as jnp

    size = 64 if stem == "imagenet" else 32  # any size the stem's downsampling leaves non-empty
    images = jnp.zeros((1, size, size, 3), jnp.float32)
    return jax.eval_shape(module.init, jax.random.PRNGKey(0), images)


def flatten(
    tree: Mapping[str, Any], prefix: tuple[str, ...] = ()
) -> Iterator[tuple[tuple[str, ...], Any]]:
    """(path, leaf) pairs of a nested mapping, depth first."""
    for key, value in tree.items():
        if isinstance(value, Mapping):
            yield from flatten(value, prefix + (key,))
        else:
            yield prefix + (key,), value


def unflatten(items: Iterable[tuple[tuple[str, ...], Any]]) -> dict:
    """The nested dict of (path, leaf) pairs."""
    tree: dict = {}
    for path, value in items:
        node = tree
        for key in path[:-1]:
            node = node.setdefault(key, {})
        node[path[-1]] = value
    return tree


class Shape(NamedTuple):
    """Stands for an array where only its shape is read (reading an architecture from shapes)."""

    shape: tuple[int, ...]


def shape_of(value: Any) -> tuple[int, ...]:
    return tuple(int(d) for d in np.shape(value))


def check_collections(variables: Mapping[str, Any], what: str) -> None:
    unknown = sorted(set(variables) - set(COLLECTIONS))
    if unknown:
        raise ConversionError(
            f"Unexpected variable collections {unknown} in {what}; "
            f"expected only {list(COLLECTIONS)}."
        )


def entries(
    variables: Mapping[str, Any],
    module_name: Callable[[tuple[str, ...]], str],
    torch_prefix: str = "",
    flax_prefix: tuple[str, ...] = (),
) -> list[Entry]:
    """The table of one module tree {"params": ..., "batch_stats": ...}.

    module_name: Flax module path (under the tree) -> torch module name, e.g. ("layer1_0", "conv1")
      -> "layer1.0.conv1". Kernels of rank 4 are convs, of rank 2 linears; `scale` marks a
      BatchNorm, whose `mean`/`var` must be in batch_stats. Anything else raises ConversionError.
    torch_prefix, flax_prefix: put before every torch key / after the collection of every Flax path.
    """
    stats = {path: leaf for path, leaf in flatten(variables.get("batch_stats", {}))}
    table = []
    norms = []
    for path, leaf in flatten(variables.get("params", {})):
        module, name = path[:-1], path[-1]
        full = ("params",) + flax_prefix + path
        tkey = torch_prefix + module_name(module)
        ndim = len(shape_of(leaf))
        if name == "kernel" and ndim in (4, 2):
            table.append(Entry(f"{tkey}.weight", full, CONV_PERM if ndim == 4 else DENSE_PERM))
        elif name == "scale":
            table.append(Entry(f"{tkey}.weight", full, VECTOR_PERM))
            norms.append(module)
        elif name == "bias":
            table.append(Entry(f"{tkey}.bias", full, VECTOR_PERM))
        else:
            raise ConversionError(
                f"Parameter {'/'.join(full)} (shape {shape_of(leaf)}) has no PyTorch counterpart."
            )
    for module in norms:
        tkey = torch_prefix + module_name(module)
        for flax_name, torch_name in (("mean", "running_mean"), ("var", "running_var")):
            path = module + (flax_name,)
            if path not in stats:
                raise ConversionError(
                    f"batch_stats/{'/'.join(flax_prefix + path)} is missing; "
                    f"BatchNorm {'/'.join(flax_prefix + module)} needs it."
                )
            table.append(
                Entry(f"{tkey}.{torch_name}", ("batch_stats",) + flax_prefix + path, VECTOR_PERM)
            )
            del stats[path]
        table.append(Entry(f"{tkey}.num_batches_tracked", None, fill=np.zeros((), np.int64)))
    if stats:
        raise ConversionError(
            "batch_stats entries without a BatchNorm: "
            f"{sorted('/'.join(flax_prefix + p) for p in stats)}."
        )
    return table


def torch_shapes(table: Iterable[Entry], variables: Mapping[str, Any]) -> dict[str, Shape]:
    """{torch key: Shape} of the table over these variables (arrays or shape structs)."""
    flat = dict(flatten(variables))
    shapes = {}
    for entry in table:
        if entry.flax_path is None:
            shapes[entry.torch_key] = Shape(shape_of(entry.fill))
        else:
            flax_shape = shape_of(flat[entry.flax_path])
            shapes[entry.torch_key] = Shape(tuple(flax_shape[i] for i in entry.perm))
    return shapes


def listing(keys: list[str]) -> str:
    """At most _LISTED keys, then how many in all: a readable line even for a wholly wrong file."""
    if len(keys) <= _LISTED:
        return str(keys)
    return f"{str(keys[:_LISTED])[:-1]}, ...] ({len(keys)} in all)"


def compare(
    found: Mapping[str, Any], expected: Mapping[str, Any], optional: Iterable[str] = ()
) -> list[str]:
    """Missing, unexpected and mis-shaped keys, one clause each; empty when they match.

    found, expected: key -> array, shape struct or `Shape`.
    """
    found = {k: shape_of(v) for k, v in found.items()}
    expected = {k: shape_of(v) for k, v in expected.items()}
    optional = set(optional)
    missing = sorted(k for k in expected if k not in found and k not in optional)
    unexpected = sorted(k for k in found if k not in expected)
    problems = []
    if missing:
        problems.append(f"missing keys: {listing(missing)}")
    if unexpected:
        problems.append(f"unexpected keys: {listing(unexpected)}")
    wrong = [k for k in expected if k in found and found[k] != expected[k]]
    for k in wrong[:_LISTED]:
        problems.append(f"{k} has shape {found[k]}, needs {expected[k]}")
    if len(wrong) > _LISTED:
        problems.append(f"{len(wrong) - _LISTED} more keys have the wrong shape")
    return problems


def compare_flax(variables: Mapping[str, Any], template: Mapping[str, Any]) -> list[str]:
    """`compare` over the "/"-joined leaf paths of two variable trees."""
    return compare(
        {"/".join(p): v for p, v in flatten(variables)},
        {"/".join(p): v for p, v in flatten(template)},
    )


def _non_finite(value: np.ndarray) -> int:
    if not np.issubdtype(value.dtype, np.floating):
        return 0
    return int(value.size - np.count_nonzero(np.isfinite(value)))


def _refuse_non_finite(bad: list[tuple[str, int, int]]) -> None:
    if not bad:
        return
    name, count, size = bad[0]
    more = f"; {len(bad) - 1} more arrays hold some too" if len(bad) > 1 else ""
    raise ConversionError(
        f"Refusing to write non-finite weights: {name} has {count} NaN/inf values out of "
        f"{size}{more}. "
        "The source holds a diverged model; convert an earlier checkpoint."
    )


def from_torch(state_dict: Mapping[str, Any], table: Iterable[Entry]) -> Variables:
    """Flax variables out of a state dict whose keys and shapes `compare` accepted.

    Arrays become float32 (a float64 source may overflow to inf: caught with the rest); any
    NaN/inf raises ConversionError naming the first key and its count.
    """
    items = []
    bad = []
    for entry in table:
        if entry.flax_path is None:
            continue
        with np.errstate(over="ignore"):  # float64 beyond float32's range: inf, refused below
            value = np.asarray(state_dict[entry.torch_key], np.float32)
        count = _non_finite(value)
        if count:
            bad.append((f"{entry.torch_key} ({'/'.join(entry.flax_path)})", count, value.size))
        inverse = tuple(int(i) for i in np.argsort(entry.perm))
        items.append((entry.flax_path, np.ascontiguousarray(np.transpose(value, inverse))))
    _refuse_non_finite(bad)
    return unflatten(items)


def to_torch(variables: Mapping[str, Any], table: Iterable[Entry]) -> StateDict:
    """The state dict of the table: Flax arrays permuted to torch's layout (float32), fills copied.

    Any NaN/inf raises ConversionError naming the first Flax path, its torch key and its count.
    """
    flat = dict(flatten(variables))
    out: StateDict = {}
    bad = []
    for entry in table:
        if entry.flax_path is None:
            out[entry.torch_key] = np.array(entry.fill)
            continue
        value = np.asarray(flat[entry.flax_path], np.float32)
        count = _non_finite(value)
        if count:
            bad.append((f"{'/'.join(entry.flax_path)} ({entry.torch_key})", count, value.size))
        out[entry.torch_key] = np.ascontiguousarray(np.transpose(value, entry.perm))
    _refuse_non_finite(bad)
    return out
