"""Logical axis names -> device mesh: rules, activation constraints, sharded param creation.

Every parameter carries a ``logical_axes`` metadata tuple (e.g. ``('expert', 'embed', 'mlp')``);
one rules table maps logical names to mesh axes. Nothing here reads global device counts: the
mesh is either passed explicitly or taken from JAX's own ``jax.set_mesh`` context.

This module imports nothing from the rest of moejax, so every layer (the MoE layer included) may
use it.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from typing import Any

import jax
import numpy as np
from flax import nnx
from jax.sharding import Mesh, NamedSharding, PartitionSpec

MeshAxes = str | tuple[str, ...] | None
Rules = tuple[tuple[str, MeshAxes], ...]

#: The default logical -> mesh axis table (see DESIGN.md). ``batch`` is split over the data, fsdp
#: and expert axes for activations; after the MoE all-to-all the groups live on ``data`` and
#: ``fsdp`` (``expert_group``) and the expert axis of the buffers on ``expert``. ``embed`` goes to
#: ``fsdp``: with an ``fsdp`` mesh axis every parameter with a d_model dimension, and its optimizer
#: state, is sharded over it as well (ZeRO-3 / FSDP; XLA gathers each scanned layer's slice where it
#: is used), expert weights keeping the ``expert`` axis. Activations never shard ``embed``: their
#: ``batch`` dimension comes first and takes ``fsdp`` (a mesh axis is used once per array). Without
#: an ``fsdp`` axis (or at size 1) the rules are exactly data x expert x model parallelism.
DEFAULT_RULES: Rules = (
    ("batch", ("data", "fsdp", "expert")),
    ("expert_group", ("data", "fsdp")),
    ("length", None),
    ("embed", "fsdp"),
    ("mlp", "model"),
    ("heads", "model"),
    ("kv", None),
    ("vocab", "model"),
    ("expert", "expert"),
    ("expert_inner", None),
    ("layers", None),
    ("capacity", None),
    ("unmodeled", None),
)

#: Standard mesh axis names, outermost first.
MESH_AXES = ("data", "fsdp", "expert", "model")


def _rules_dict(rules: Rules) -> dict[str, MeshAxes]:
    return dict(rules)


def rule_mesh_axes(rules: Rules = DEFAULT_RULES) -> tuple[str, ...]:
    """The mesh axis names ``rules`` map logical axes to, in first-use order."""
    out: list[str] = []
    for _, axes in rules:
        for a in (axes,) if isinstance(axes, str) else (axes or ()):
            if a not in out:
                out.append(a)
    return tuple(out)


def check_mesh_axes(shape: dict[str, int], rules: Rules = DEFAULT_RULES) -> None:
    """ValueError naming any axis of a mesh ``shape`` that ``rules`` never use (a misspelt
    ``'experts'`` would otherwise leave every array replicated over that axis)."""
    known = rule_mesh_axes(rules)
    bad = [a for a in shape if a not in known]
    if bad:
        import difflib

        hints = [f"{a!r} (did you mean {m[0]!r}?)" if (m := difflib.get_close_matches(a, known, 1)) else repr(a)
                 for a in bad]
        raise ValueError(f"mesh axis {', '.join(hints)} is not used by the logical axis rules; valid mesh axes: "
                         f"{', '.join(known)}")


def logical_to_spec(
    logical_axes: Sequence[str | None], rules: Rules = DEFAULT_RULES, mesh: Any = None
) -> PartitionSpec:
    """Map logical axis names to a ``PartitionSpec``.

    Unknown logical names raise. Mesh axes that the given mesh does not have (or has with size 1)
    are dropped, so one rules table works for any mesh; a mesh axis is used at most once.
    """
    table = _rules_dict(rules)
    mesh_names = None if mesh is None else dict(mesh.shape)
    used: set[str] = set()
    out = []
    for name in logical_axes:
        if name is None:
            out.append(None)
            continue
        if name not in table:
            raise ValueError(
                f"unknown logical axis {name!r}; the rules table knows {sorted(table)}"
            )
        axes = table[name]
        if axes is None:
            out.append(None)
            continue
        axes = (axes,) if isinstance(axes, str) else tuple(axes)
        kept = []
        for a in axes:
            if mesh_names is not None and (a not in mesh_names or mesh_names[a] == 1):
                continue
            if a in used:
                continue
            kept.append(a)
            used.add(a)
        out.append(None if not kept else (kept[0] if len(kept) == 1 else tuple(kept)))
    return PartitionSpec(*out)


def spec_divisor(spec: PartitionSpec, mesh: Any, dim: int, *, skip: Sequence[str] = ()) -> int:
    """Number of shards dimension ``dim`` is split into under ``spec`` on ``mesh``, not counting
    the mesh axes named in ``skip``."""
    if dim >= len(spec) or spec[dim] is None:
        return 1
    axes = (spec[dim],) if isinstance(spec[dim], str) else spec[dim]
    return math.prod(dict(mesh.shape)[a] for a in axes if a not in skip)


def check_divisible(
    shape: Sequence[int], logical_axes: Sequence[str | None], mesh: Any, rules: Rules = DEFAULT_RULES,
    what: str = "array",
) -> PartitionSpec:
    """Return the spec for ``shape``; raise a clear ValueError if a dim does not divide its shards."""
    if len(logical_axes) != len(shape):
        raise ValueError(
            f"{what}: logical axes {tuple(logical_axes)} do not match its rank-{len(shape)} shape "
            f"{tuple(shape)}"
        )
    spec = logical_to_spec(logical_axes, rules, mesh)
    for d, (n, name) in enumerate(zip(shape, logical_axes)):
        shards = spec_divisor(spec, mesh, d)
        if n % shards:
            raise ValueError(
                f"{what}: dimension {d} ({name!r}) has size {n}, which is not divisible by the "
                f"{shards} shards of mesh axes {spec[d]!r} (mesh {dict(mesh.shape)}); use a size "
                f"that is a multiple of {shards} or a mesh with fewer {spec[d]!r} devices"
            )
    return spec


def constrain(x: jax.Array, logical_axes: Sequence[str | None], rules: Rules = DEFAULT_RULES) -> jax.Array:
    """``with_sharding_constraint`` by logical names under the current ``jax.set_mesh`` mesh.

    A no-op when no mesh is set, so library code runs unchanged on one device. Axes that do not
    divide their shards are left unconstrained rather than padded.
    """
    mesh = jax.sharding.get_abstract_mesh()
    if mesh is None or mesh.empty:
        return x
    spec = logical_to_spec(logical_axes, rules, mesh)
    parts = []
    for d, p in enumerate(spec):
        parts.append(p if x.shape[d] % spec_divisor(spec, mesh, d) == 0 else None)
    return jax.lax.with_sharding_constraint(x, PartitionSpec(*parts))


def current_mesh_axis_size(axis: str) -> int:
    """Size of ``axis`` in the current ``jax.set_mesh`` mesh (1 when absent or no mesh)."""
    mesh = jax.sharding.get_abstract_mesh()
    if mesh is None or mesh.empty:
        return 1
    return dict(mesh.shape).get(axis, 1)


def variable_logical_axes(var: nnx.Variable) -> tuple[str | None, ...] | None:
    """The ``logical_axes`` metadata of an NNX variable (None if it has none)."""
    meta = var.get_metadata() if hasattr(var, "get_metadata") else {}
    return meta.get("logical_axes")


def state_specs(state: nnx.State, mesh: Any, rules: Rules = DEFAULT_RULES) -> nnx.State:
    """Map each variable of an (abstract) NNX state to its ``PartitionSpec``.

    Variables without ``logical_axes`` metadata (RNG counters, scalars) are replicated.
    Raises ValueError naming the parameter when a dimension is not divisible by its shards.
    """

    def one(path, var):
        axes = variable_logical_axes(var)
        value = var.get_value() if hasattr(var, "get_value") else var.value
        shape = getattr(value, "shape", ())
        if axes is None:
            return PartitionSpec()
        name = "/".join(str(p) for p in path)
        return check_divisible(shape, axes, mesh, rules, what=f"parameter {name}")

    return jax.tree_util.tree_map_with_path(
        lambda p, v: one(p, v), state, is_leaf=lambda x: isinstance(x, nnx.Variable)
    )


def state_shardings(state: nnx.State, mesh: Mesh, rules: Rules = DEFAULT_RULES) -> nnx.State:
    """Like :func:`state_specs` but returns ``NamedSharding``s on ``mesh``."""
    specs = state_specs(state, mesh, rules)
    return jax.tree.map(
        lambda s: NamedSharding(mesh, s), specs, is_leaf=lambda x: isinstance(x, PartitionSpec)
    )


def create_sharded(factory: Callable[[], nnx.Module], mesh: Mesh, rules: Rules = DEFAULT_RULES) -> nnx.Module:
    """Build ``factory()`` with every parameter born directly in its sharding (never replicated).

    The module is first traced abstractly (``nnx.eval_shape``) to read shapes and logical axes,
    then initialised inside ``jax.jit`` with ``out_shardings`` from the rules.
    """
    abstract = nnx.eval_shape(factory)
    graphdef, abstract_state = nnx.split(abstract)
    shardings = state_shardings(abstract_state, mesh, rules)

    init = jax.jit(lambda: nnx.split(factory())[1], out_shardings=shardings)
    with jax.set_mesh(mesh):
        state = init()
    return nnx.merge(graphdef, state)


def make_mesh(shape: dict[str, int] | Sequence[tuple[str, int]], devices: Sequence[Any] | None = None) -> Mesh:
    """A mesh with named axes, e.g. ``make_mesh({'data': 2, 'expert': 4})``.

    Raises ValueError when the product of the axis sizes differs from the device count.
    """
    items = list(shape.items()) if isinstance(shape, dict) else list(shape)
    names = tuple(n for n, _ in items)
    sizes = tuple(int(s) for _, s in items)
    devices = list(jax.devices() if devices is None else devices)
    if math.prod(sizes) != len(devices):
        raise ValueError(
            f"mesh {dict(items)} needs {math.prod(sizes)} devices but {len(devices)} are available"
        )
    return Mesh(np.asarray(devices).reshape(sizes), names)


def stack_modules(factory: Callable[[nnx.Rngs], nnx.Module], n: int, rngs: nnx.Rngs, axis_name: str,
                  rename: dict[str, str] | None = None) -> nnx.Module:
    """``n`` copies of ``factory(rngs)`` with params stacked on a new leading ``axis_name`` axis.

    The logical axes of every variable get ``axis_name`` prepended (after renaming any axis listed
    in ``rename``, e.g. an inner ``expert`` axis that must not reuse the outer one's mesh axis).
    Each copy owns RNG state seeded from its split ``params`` key, stacked with it.
    """

    @nnx.split_rngs(splits=n)
    @nnx.vmap(in_axes=(0,), out_axes=0)
    def make(r):
        return factory(nnx.Rngs(r.params()))

    stacked = make(rngs)
    rename = rename or {}
    for _, var in nnx.iter_graph(stacked):
        if isinstance(var, nnx.Variable):
            axes = var.get_metadata().get("logical_axes")
            if axes is not None:
                var.set_metadata("logical_axes", (axis_name,) + tuple(rename.get(a, a) for a in axes))
    return stacked
