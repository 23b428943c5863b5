"""Bookkeeping shared by the Hugging Face readers: lazy weight sources, used / missing weights,
stacking layers and experts, and filling a model (whole, or straight into its shardings).

A reader maps every moejax parameter path to a :class:`Source`: a :class:`Leaf` (one HF tensor and
the transform to moejax's layout, e.g. ``w.T.reshape(d, h, x)``) or a :class:`Stack` of sources on
a new leading axis (layers, experts). Nothing is read until a source is read, and a source reads
only the children a requested slice needs, so a device shard of ``[layers, E, d, f]`` expert
weights touches only its experts' tensors (memory-mapped; see ``safetensors_io``).
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from typing import Protocol

import jax
import numpy as np
from flax import nnx

from moejax.sharding import DEFAULT_RULES, Rules, state_shardings
from moejax.tree import path_key


def _identity(w):
    return w


class Source(Protocol):
    """A lazily read array: ``shape``, ``dtype`` and ``read(index, dtype)`` (:class:`Leaf`, :class:`Stack`)."""

    shape: tuple[int, ...]
    dtype: np.dtype

    def read(self, index: tuple = (), dtype=None) -> np.ndarray: ...


class Leaf:
    """One HF tensor seen through ``fn`` (HF layout -> moejax's). ``load()`` returns the tensor (a
    fresh memmap per call, so the pages read leave the process once the read is done);
    ``shape`` / ``dtype`` of the stored tensor give the transformed shape without reading."""

    def __init__(self, load: Callable[[], np.ndarray], fn: Callable, shape: tuple[int, ...], dtype, name: str = "?"):
        self.load, self.fn, self.name = load, fn, name
        try:
            out = jax.eval_shape(fn, jax.ShapeDtypeStruct(tuple(shape), np.dtype(dtype)))
        except (TypeError, ValueError) as e:
            raise ValueError(f"HF tensor {name!r} has shape {tuple(shape)}, which does not fit the model config "
                             f"({str(e).splitlines()[0][:200]}); a checkpoint of another size, or a damaged "
                             "config.json?") from None
        self.shape, self.dtype = tuple(out.shape), np.dtype(out.dtype)

    @property
    def names(self) -> list[str]:
        return [self.name]

    def read(self, index: tuple = (), dtype=None) -> np.ndarray:
        full = np.asarray(self.fn(np.asarray(self.load())))
        return np.array(full[tuple(index)], dtype=dtype or self.dtype, copy=True)


class Stack:
    """``children`` (equal shapes) stacked on a new leading axis, read child by child."""

    def __init__(self, children: Sequence[Source]):
        self.children = list(children)
        shapes = [c.shape for c in self.children]
        if len(set(shapes)) != 1:
            common = max(set(shapes), key=shapes.count)
            odd = next(c for c in self.children if c.shape != common)
            raise ValueError(f"HF tensor {odd.names[0]!r} converts to shape {odd.shape} where its siblings "
                             f"(e.g. {self.children[shapes.index(common)].names[0]!r}) convert to {common}: "
                             "transposed, or from another model?")
        self.shape = (len(self.children),) + self.children[0].shape
        self.dtype = np.result_type(*[c.dtype for c in self.children])

    @property
    def names(self) -> list[str]:
        return [n for c in self.children for n in c.names]

    def read(self, index: tuple = (), dtype=None) -> np.ndarray:
        index = tuple(index)
        first, rest = (index[0], index[1:]) if index else (slice(None), ())
        picked = self.children[first] if isinstance(first, slice) else [self.children[first]]
        out = None
        for j, child in enumerate(picked):
            part = child.read(rest, dtype or self.dtype)
            if out is None:
                out = np.empty((len(picked),) + part.shape, part.dtype)
            out[j] = part
        if out is None:
            out = np.empty((0,) + self.shape[1:], dtype or self.dtype)
        return out if isinstance(first, slice) else out[0]


class WeightReader:
    """Hands out HF weights by name (as lazy :class:`Leaf` sources) and remembers which were used
    or missing.

    ``check()`` raises a ValueError listing the missing and the unexpected (never read) weights,
    so a checkpoint of another model or size never loads silently.
    """

    def __init__(self, weights: Mapping[str, np.ndarray]):
        self.weights = weights
        self.used: set[str] = set()
        self.missing: list[str] = []
        self.stacks: dict[str, list] = {}

    def has(self, name: str) -> bool:
        return name in self.weights

    def get(self, name: str, fn: Callable = _identity) -> Leaf | None:
        """Weight ``name`` seen through ``fn`` (None, and recorded as missing, if absent)."""
        if name not in self.weights:
            self.missing.append(name)
            return None
        self.used.add(name)
        w = self.weights
        shape, dtype = (w.shape(name), w.dtype(name)) if hasattr(w, "shape") else \
            (np.shape(w[name]), np.asarray(w[name]).dtype)
        return Leaf(lambda: w[name], fn, shape, dtype, name)

    def alias(self, *names: str) -> None:
        """Names that may be present (tied copies) and are fine to skip."""
        self.used.update(names)

    def get_stacked(self, names: list[str], fn: Callable = _identity) -> Stack | None:
        """``names`` through ``fn`` stacked on a new leading axis (None if any is missing): experts."""
        ws = [self.get(n, fn) for n in names]
        return None if any(w is None for w in ws) else Stack(ws)

    def push(self, path: str, value: Source | None) -> None:
        """Append one layer's source to the list stacked under ``path`` by :meth:`finish`."""
        self.stacks.setdefault(path, []).append(value)

    def check(self) -> None:
        unused = sorted(set(self.weights) - self.used)
        if self.missing or unused:
            def show(xs):
                return f"{xs[:8]}{' ...' if len(xs) > 8 else ''}"

            raise ValueError(
                "checkpoint does not match the model config: "
                + (f"missing {len(self.missing)} weights: {show(self.missing)}; " if self.missing else "")
                + (f"unexpected {len(unused)} weights: {show(unused)}" if unused else ""))

    def finish(self, flat: dict) -> dict[str, Source]:
        """Check, then add the per-layer lists stacked on a leading layer axis to ``flat``."""
        self.check()
        for path, srcs in self.stacks.items():
            flat[path] = Stack(srcs)
        return flat


def tied_head(config_tied: bool, weights: Mapping | None, head: str, embedding: str) -> bool:
    """Whether the output projection is the embedding, as transformers 5 decides: the config says
    tied and the checkpoint holds no ``head`` that differs from ``embedding`` (T5 configs written
    by transformers 5 always say tied; a differing stored head is then used, untied)."""
    if not config_tied or weights is None or head not in weights or embedding not in weights:
        return config_tied
    return bool(np.array_equal(np.asarray(weights[head]), np.asarray(weights[embedding])))


def _param_path(path) -> str:
    """A params-tree key path as a moejax parameter path (``stack/blocks/0/ffn/experts/wi``)."""
    keys = path_key(path)
    return "/".join(keys[:-1] if keys and keys[-1] == "value" else keys)


def _match(shapes: dict[str, tuple], flat: Mapping[str, Source]) -> None:
    extra, absent = sorted(set(flat) - set(shapes)), sorted(set(shapes) - set(flat))
    if extra or absent:
        raise ValueError(f"parameter mismatch: not in model {extra}; not in checkpoint {absent}")
    for name, src in flat.items():
        if tuple(src.shape) != tuple(shapes[name]):
            hf = getattr(src, "names", None)
            what = f" (from HF tensor {hf[0]!r}{' ...' if len(hf) > 1 else ''})" if hf else ""
            raise ValueError(f"{name}{what}: checkpoint shape {tuple(src.shape)} != model shape {tuple(shapes[name])}; "
                             "a checkpoint of another size, or a damaged config.json?")


def load_into(model: nnx.Module, flat: Mapping[str, Source]) -> nnx.Module:
    """Read every source of ``flat`` into ``model``'s params (shapes must match exactly; each
    parameter keeps its dtype)."""
    params = nnx.state(model, nnx.Param)
    leaves, treedef = jax.tree_util.tree_flatten_with_path(params)
    _match({_param_path(p): np.shape(v) for p, v in leaves}, flat)
    values = [jax.numpy.asarray(flat[_param_path(p)].read((), np.dtype(v.dtype))) for p, v in leaves]
    nnx.update(model, jax.tree_util.tree_unflatten(treedef, values))
    return model


def sharded_params(abstract_params: nnx.State, flat: Mapping[str, Source], mesh: jax.sharding.Mesh | None,
                   rules: Rules = DEFAULT_RULES) -> nnx.State:
    """The params of an abstract model (``nnx.split(nnx.eval_shape(...), nnx.Param, ...)``) filled
    from ``flat``, each parameter built straight in its sharding under ``rules`` (on the default
    device without ``mesh``) by ``jax.make_array_from_callback``: each device's shard is read from
    the sources on its own, one parameter after the other, so the host holds one parameter's
    shards at a time, never the model. Each parameter keeps the abstract model's dtype."""
    leaves, treedef = jax.tree_util.tree_flatten_with_path(abstract_params)
    _match({_param_path(p): tuple(v.shape) for p, v in leaves}, flat)
    if mesh is not None:
        shardings = jax.tree.leaves(state_shardings(abstract_params, mesh, rules),
                                    is_leaf=lambda x: isinstance(x, jax.sharding.Sharding))
    else:
        shardings = [jax.sharding.SingleDeviceSharding(jax.devices()[0])] * len(leaves)
    arrays = []
    for (path, aval), sharding in zip(leaves, shardings, strict=True):
        src, dt, shape = flat[_param_path(path)], np.dtype(aval.dtype), tuple(aval.shape)
        arrays.append(_fill(shape, sharding, lambda idx, src=src, dt=dt: src.read(idx, dt)))
    return jax.tree_util.tree_unflatten(treedef, arrays)


def _fill(shape: tuple[int, ...], sharding, read) -> jax.Array:
    """``jax.make_array_from_callback`` placing each shard on its device as soon as it is read
    (and reading a replicated shard once), so the host holds one shard at a time."""
    by_index: dict[tuple, list] = {}
    for device, idx in sharding.addressable_devices_indices_map(shape).items():
        key = tuple((s.start, s.stop, s.step) if isinstance(s, slice) else s for s in idx)
        by_index.setdefault(key, [idx, []])[1].append(device)
    placed = {}
    for idx, devices in by_index.values():
        host = read(idx)
        for device in devices:
            placed[device] = jax.device_put(host, device)
        del host
    order = [placed[d] for d in sharding.addressable_devices_indices_map(shape)]
    return jax.make_array_from_single_device_arrays(shape, sharding, order)
