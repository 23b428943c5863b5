"""Pytree path helpers shared by checkpoints, upcycling, distillation, optimizer-state sharding and
the compression tools: one spelling of a parameter's path, flat ``{path: leaf}`` dicts, and nested
pure-dict access.

This module imports nothing from the rest of moejax, so every layer may use it.
"""

from __future__ import annotations

from collections.abc import Iterable

import jax


def path_key(path) -> tuple[str, ...]:
    """A ``jax.tree_util`` key path as a tuple of strings (dict keys, sequence indices, attributes)."""
    return tuple(str(getattr(k, "key", getattr(k, "idx", getattr(k, "name", k)))) for k in path)


def path_str(path) -> str:
    """``path_key`` joined with ``/`` (e.g. ``'decoder/stack/blocks/0/ffn/experts/wi/value'``)."""
    return "/".join(path_key(path))


def flatten(tree, key=path_key) -> dict:
    """``{key(path): leaf}`` for every leaf of ``tree``."""
    return {key(p): v for p, v in jax.tree_util.tree_flatten_with_path(tree)[0]}


def unflatten(like, flat: dict, key=path_key):
    """The tree of ``like``'s structure with each leaf taken from ``flat[key(path)]``."""
    leaves, treedef = jax.tree_util.tree_flatten_with_path(like)
    return jax.tree_util.tree_unflatten(treedef, [flat[key(p)] for p, _ in leaves])


def get_path(tree, path: Iterable):
    """``tree[p0][p1]...`` for a nested dict (e.g. an ``nnx.to_pure_dict`` of params)."""
    for k in path:
        tree = tree[k]
    return tree


def var_value(var):
    """The value (array or ShapeDtypeStruct) of an ``nnx.Variable``, across flax 0.12.x."""
    return var.get_value() if hasattr(var, "get_value") else var.value
