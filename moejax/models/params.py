"""Exact parameter accounting from abstract shapes (nothing allocated).

Components are read from module types and logical axes, never from parameter names:
routed experts (params of a MoE layer's experts), router, attention, embeddings (params with a
``vocab`` axis), dense FFN, norms. Active parameters per token count a MoE layer's routed experts
at ``min(top_k, num_experts) / num_experts`` (merged experts: at most one per choice; recursively
for hierarchical MoE). Per-device bytes on a mesh are :mod:`moejax.layout`'s job.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any

import numpy as np
from flax import nnx

from moejax.models.build import abstract_model
from moejax.models.encdec import RelativeBias
from moejax.models.layers import Attention, Embed, LayerNorm, RMSNorm
from moejax.models.mla import MLAttention
from moejax.moe import MoeLayer
from moejax.moe.experts import DenseFFN
from moejax.tree import var_value


@dataclasses.dataclass
class ParamReport:
    total: int
    active: float
    by_component: dict[str, int]
    bytes_total: int

    def as_table(self) -> str:
        rows = [f"| total | {self.total:,} | {self.total / 1e9:.3f}B |",
                f"| active per token | {int(round(self.active)):,} | {self.active / 1e9:.3f}B |"]
        rows += [f"| {k} | {v:,} | {v / 1e9:.3f}B |" for k, v in sorted(self.by_component.items())]
        return "| parameters | count | |\n|---|---|---|\n" + "\n".join(rows)


def _own_params(module: nnx.Module):
    for name, value in vars(module).items():
        if isinstance(value, nnx.Param):
            yield name, value


def _size(var) -> int:
    return int(math.prod(var_value(var).shape))


def count(model: nnx.Module) -> ParamReport:
    """Count every parameter of ``model`` (abstract or concrete)."""
    by: dict[str, int] = {}
    active = 0.0
    total = 0
    nbytes = 0
    seen: set[int] = set()

    def add(comp: str, var, frac: float):
        nonlocal active, total, nbytes
        if id(var) in seen:
            return
        seen.add(id(var))
        n = _size(var)
        by[comp] = by.get(comp, 0) + n
        total += n
        nbytes += n * np.dtype(var_value(var).dtype).itemsize
        active += n * frac

    types = {Attention: "attention", MLAttention: "attention", RelativeBias: "attention", Embed: "embeddings",
             DenseFFN: "dense_ffn", RMSNorm: "norms", LayerNorm: "norms"}

    def walk(module: nnx.Module, frac: float, inherited: str | None):
        if isinstance(module, MoeLayer):
            walk(module.router, frac, "router")
            if module.shared is not None:
                walk(module.shared, frac, "shared_experts")
            for _, var in _own_params(module):            # the shared experts' gate
                add("shared_experts", var, frac)
            mc = module.cfg
            walk(module.experts, frac * min(mc.top_k, mc.num_experts) / mc.num_experts, "experts")
            return
        # inside an MoE layer the part decides (router, experts, shared experts); elsewhere the type
        comp = inherited if inherited in ("router", "experts", "shared_experts") else types.get(type(module), inherited)
        for _, var in _own_params(module):
            axes = var.get_metadata().get("logical_axes") or ()
            add(comp or ("embeddings" if "vocab" in axes else "other"), var, frac)
        for value in vars(module).values():
            children = list(value) if isinstance(value, (list, tuple, nnx.List)) else [value]
            for child in children:
                if isinstance(child, nnx.Module):
                    walk(child, frac, comp)

    walk(model, 1.0, None)
    return ParamReport(total=total, active=active, by_component=by, bytes_total=nbytes)


def report(cfg_or_factory: Any) -> ParamReport:
    """Count a registered config (or a module factory) abstractly."""
    return count(abstract_model(cfg_or_factory))
