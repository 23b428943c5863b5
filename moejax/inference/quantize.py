"""Weight-only int8 / int4 quantization of expert weights for inference.

``quantize_model(model, bits=8, group_size=None)`` returns a model whose experts store int8 (or
int4) weights with float32 scales per output channel (or per ``group_size`` input rows and output
channel); the expert matmuls cast the int weights and apply the scales to the matmul output, so
XLA fuses the dequantization into the dot. Everything else (attention, embeddings, router) stays
in floating point. The quantized config (``MoeConfig.quant_bits``) round-trips through
``moejax.save`` / ``moejax.load``.

Why not qwix / aqtp: both quantize by intercepting ops matched by module-path regexes; moejax keys
no behaviour on parameter names and needs only this narrow, exactly testable transform of the
stacked ``[layers, experts, d, f]`` kernels. The error bound is stated in :func:`quantize_weight`.
"""

from __future__ import annotations

import jax.numpy as jnp
import numpy as np
from flax import nnx

from moejax.inference.merging import copy_non_moe_params, moe_layer_paths
from moejax.models.build import build_model
from moejax.moe.experts import quantize_weight
from moejax.moe.options import QUANT_BITS
from moejax.tree import get_path


def quantize_model(model: nnx.Module, bits: int = 8, group_size: int | None = None) -> nnx.Module:
    """A copy of ``model`` with quantized expert weights (see the module docstring)."""
    cfg = model.cfg
    if cfg.moe is None:
        raise ValueError("the model has no MoE experts to quantize")
    if bits not in QUANT_BITS:
        raise ValueError(f"unsupported quantization bit width {bits}; valid: {', '.join(map(str, QUANT_BITS))}")
    if cfg.moe.quant_bits is not None:
        raise ValueError(f"the model is already quantized to {cfg.moe.quant_bits} bits")
    if cfg.moe.inner is not None:
        raise ValueError("quantizing hierarchical (inner MoE) experts is not supported")
    for din in {cfg.moe.d_model, cfg.moe.d_ff}:
        if group_size is not None and (group_size < 1 or din % group_size):
            raise ValueError(f"group_size={group_size} must divide d_model and d_ff "
                             f"({cfg.moe.d_model}, {cfg.moe.d_ff})")
    new_model = build_model(cfg.replace(moe=cfg.moe.replace(quant_bits=bits, quant_group_size=group_size)),
                            nnx.Rngs(0))
    old = nnx.to_pure_dict(nnx.state(model, nnx.Param))
    new = nnx.to_pure_dict(nnx.state(new_model, nnx.Param))
    paths = moe_layer_paths(model)
    for path in paths:
        src, dst = get_path(old, path), get_path(new, path)
        dst["router"] = src["router"]
        for k, v in src["experts"].items():
            if k + "_scale" in dst["experts"]:
                q, scale = quantize_weight(jnp.asarray(v), bits, group_size)
                dst["experts"][k], dst["experts"][k + "_scale"] = q, scale
            else:
                dst["experts"][k] = v
        if "shared" in src:
            dst["shared"] = src["shared"]
    state = nnx.state(new_model, nnx.Param)
    nnx.replace_by_pure_dict(state, copy_non_moe_params(old, new, paths))
    nnx.update(new_model, state)
    return new_model


def expert_weight_bytes(model: nnx.Module) -> int:
    """Bytes of the experts' weights and scales as stored on an accelerator (int4 packed two per byte)."""
    total = 0
    for path in moe_layer_paths(model):
        layer = model
        for k in path:
            layer = layer[k] if isinstance(k, int) else getattr(layer, k)
        for _, var in nnx.iter_graph(layer.experts):
            if isinstance(var, nnx.Param):
                a = var[...]
                bits = 4 if a.dtype == jnp.int4 else np.dtype(a.dtype).itemsize * 8
                total += a.size * bits // 8
    return total
