"""Exact parameter accounting from abstract shapes (nothing allocated), and per-device bytes.

Components are read from module types and logical axes, never from parameter names:
routed experts (params of a MoE layer's experts), router, attention, embeddings (params with a
``vocab`` axis), dense FFN, norms. Active parameters per token count a MoE layer's routed experts
at ``min(top_k, num_experts) / num_experts`` (merged experts: at most one per choice) (recursively for hierarchical MoE).
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any

import jax
import numpy as np
from flax import nnx

from moejax.models.encdec import RelativeBias, T5Attention
from moejax.models.layers import Attention, Embed, Mlp, RMSNorm
from moejax.moe import MoeLayer, Router
from moejax.moe.experts import DenseFFN
from moejax.sharding import DEFAULT_RULES, Rules, logical_to_spec, spec_divisor


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


def build_model(cfg, rngs: nnx.Rngs | None = None) -> nnx.Module:
    """The model class a config describes (Decoder or EncoderDecoder)."""
    from moejax.models.decoder import Decoder
    from moejax.models.encdec import EncDecConfig, EncoderDecoder

    cls = EncoderDecoder if isinstance(cfg, EncDecConfig) else Decoder
    return cls(cfg, rngs=rngs or nnx.Rngs(0))


def abstract_model(factory) -> nnx.Module:
    """Build ``factory()`` with shapes only (``nnx.eval_shape``: no memory allocated)."""
    return nnx.eval_shape(factory)


def _own_params(module: nnx.Module):
    for name, value in vars(module).items():
        if isinstance(value, nnx.Param):
            yield name, value


def _val(var):
    """The value (array or ShapeDtypeStruct) of a variable, across flax 0.12.x."""
    return var.get_value() if hasattr(var, "get_value") else var.value


def _size(var) -> int:
    return int(math.prod(_val(var).shape))


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
        nbytes += n * np.dtype(_val(var).dtype).itemsize
        active += n * frac

    types = {Attention: "attention", T5Attention: "attention", RelativeBias: "attention", Embed: "embeddings",
             Mlp: "dense_ffn", RMSNorm: "norms", Router: "router", DenseFFN: "shared_experts"}

    def walk(module: nnx.Module, frac: float, inherited: str | None):
        if isinstance(module, MoeLayer):
            walk(module.router, frac, "router")
            if module.shared is not None:
                walk(module.shared, frac, "shared_experts")
            walk(module.experts, frac * min(module.cfg.top_k, module.cfg.num_experts) / module.cfg.num_experts, "experts")
            return
        comp = types.get(type(module), inherited)
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


def bytes_per_device(model: nnx.Module, mesh_shape: dict[str, int], rules: Rules = DEFAULT_RULES,
                     optimizer_slots: float = 2.0, optimizer_dtype_bytes: int = 4) -> dict[str, float]:
    """Bytes per device of params and optimizer state on a mesh of the given shape.

    Uses a ``jax.sharding.AbstractMesh`` (no devices needed). ``optimizer_slots`` = 2 for
    Adam(W) (two f32 moments per param); a factored Adafactor needs far less.
    """
    mesh = jax.sharding.AbstractMesh(tuple(mesh_shape.values()), tuple(mesh_shape.keys()))
    params = 0.0
    opt = 0.0
    replicated: list[str] = []
    for path, var in nnx.to_flat_state(nnx.state(model, nnx.Param)):
        axes = var.get_metadata().get("logical_axes")
        shape = _val(var).shape
        n = math.prod(shape)
        shards = 1
        if axes is not None:
            spec = logical_to_spec(axes, rules, mesh)
            shards = math.prod(spec_divisor(spec, mesh, d) for d in range(len(shape)))
        if shards == 1 and n >= 1 << 24:  # >= 16M elements left whole on every device
            replicated.append("/".join(map(str, path)))
        params += n * np.dtype(_val(var).dtype).itemsize / shards
        opt += n * optimizer_slots * optimizer_dtype_bytes / shards
    return {"params": params, "optimizer": opt, "devices": math.prod(mesh_shape.values()),
            "large_replicated": replicated}


def report(cfg_or_factory: Any) -> ParamReport:
    """Count a registered config (or a module factory) abstractly."""
    if callable(cfg_or_factory):
        return count(abstract_model(cfg_or_factory))
    return count(abstract_model(lambda: build_model(cfg_or_factory)))
