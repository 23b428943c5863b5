"""Parameter roles by module type (never by parameter-name regexes) for freezing and reporting.

Roles: ``router`` (params of a :class:`moejax.moe.routing.Router`), ``experts`` (params of
:class:`moejax.moe.experts.Experts` inside an MoE layer), ``non_expert`` (everything else:
embeddings, attention, norms, dense FFNs).
"""

from __future__ import annotations

import jax
from flax import nnx

from moejax.moe.experts import Experts
from moejax.moe.routing import Router

ROLES = ("router", "experts", "non_expert")


def param_roles(model: nnx.Module) -> dict:
    """A pure dict shaped like ``nnx.to_pure_dict(nnx.state(model, nnx.Param))`` of role names."""
    owner: dict[int, str] = {}
    for _, node in nnx.iter_graph(model):
        role = "router" if isinstance(node, Router) else "experts" if isinstance(node, Experts) else None
        if role is None:
            continue
        for _, var in nnx.iter_graph(node):
            if isinstance(var, nnx.Param):
                owner.setdefault(id(var), role)
    state = nnx.state(model, nnx.Param)
    labels = nnx.to_pure_dict(state)
    flat = dict(nnx.to_flat_state(state))
    for path, var in flat.items():
        d = labels
        for p in path[:-1]:
            d = d[p]
        d[path[-1]] = owner.get(id(var), "non_expert")
    return labels


def freeze_labels(model: nnx.Module, freeze=()) -> dict:
    """``'train'`` / ``'freeze'`` per param for the roles listed in ``freeze``."""
    freeze = tuple(freeze or ())
    bad = [r for r in freeze if r not in ROLES]
    if bad:
        raise ValueError(f"unknown parameter roles {bad}; valid: {', '.join(ROLES)}")
    return jax.tree.map(lambda r: "freeze" if r in freeze else "train", param_roles(model))
