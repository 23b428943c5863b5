"""What the Hugging Face decoder-only converters share (Mixtral / Llama / Mistral, Qwen2-MoE,
Qwen3-MoE, OLMoE): the attention and norm weights of a layer both ways, the model-level weights,
and the streaming ``save_pretrained`` writer.

HF names (layer ``N``, prefix ``model.layers.N.``): ``self_attn.{q,k,v,o}_proj.weight`` (and
``.bias``), ``self_attn.{q,k}_norm.weight``, ``input_layernorm.weight``,
``post_attention_layernorm.weight``; ``model.embed_tokens.weight``, ``model.norm.weight``,
``lm_head.weight``. PyTorch matrices are ``[out, in]``; moejax kernels ``[in, out]``.
"""

from __future__ import annotations

import json
import os
from collections.abc import Callable

import jax
import numpy as np
from flax import nnx

from moejax.convert.mapping import Source, WeightReader
from moejax.convert.safetensors_io import ShardedWriter
from moejax.models import DecoderConfig

#: one exported tensor: (HF name, moejax param path (or a tuple of paths), layer or None, fn: that
#: param's array (those params' arrays) -> HF tensor)
ExportRow = tuple[str, str, int | None, Callable]

BLOCK = "stack/blocks/0/"


def attention_map(cfg: DecoderConfig, i: int) -> dict[str, tuple[str, Callable]]:
    """moejax path (within a block) -> (HF name, HF array -> moejax) for layer ``i``'s attention
    (with the biases and QK-norms ``cfg`` has) and its two norms."""
    h, k, x, d = cfg.num_heads, cfg.num_kv_heads, cfg.head_dim, cfg.d_model
    p = f"model.layers.{i}."
    m = {
        "attn/q": (p + "self_attn.q_proj.weight", lambda w: w.T.reshape(d, h, x)),
        "attn/k": (p + "self_attn.k_proj.weight", lambda w: w.T.reshape(d, k, x)),
        "attn/v": (p + "self_attn.v_proj.weight", lambda w: w.T.reshape(d, k, x)),
        "attn/o": (p + "self_attn.o_proj.weight", lambda w: w.T.reshape(h, x, d)),
        "attn_norm/scale": (p + "input_layernorm.weight", lambda w: w),
        "ffn_norm/scale": (p + "post_attention_layernorm.weight", lambda w: w),
    }
    if cfg.attention_bias != "none":
        m["attn/q_bias"] = (p + "self_attn.q_proj.bias", lambda w: w.reshape(h, x))
        m["attn/k_bias"] = (p + "self_attn.k_proj.bias", lambda w: w.reshape(k, x))
        m["attn/v_bias"] = (p + "self_attn.v_proj.bias", lambda w: w.reshape(k, x))
    if cfg.attention_bias == "all":
        m["attn/o_bias"] = (p + "self_attn.o_proj.bias", lambda w: w)
    if cfg.qk_norm != "none":
        m["attn/q_norm/scale"] = (p + "self_attn.q_norm.weight", lambda w: w)
        m["attn/k_norm/scale"] = (p + "self_attn.k_norm.weight", lambda w: w)
    return m


def attention_export(cfg: DecoderConfig, i: int) -> list[ExportRow]:
    """The inverse of :func:`attention_map`: export rows of layer ``i``'s attention and norms."""
    h, k, x, d = cfg.num_heads, cfg.num_kv_heads, cfg.head_dim, cfg.d_model
    inverse = {
        "attn/q": lambda w: w.reshape(d, h * x).T, "attn/k": lambda w: w.reshape(d, k * x).T,
        "attn/v": lambda w: w.reshape(d, k * x).T, "attn/o": lambda w: w.reshape(h * x, d).T,
        "attn/q_bias": lambda w: w.reshape(h * x), "attn/k_bias": lambda w: w.reshape(k * x),
        "attn/v_bias": lambda w: w.reshape(k * x),
    }
    return [(name, BLOCK + path, i, inverse.get(path, lambda w: w))
            for path, (name, _) in attention_map(cfg, i).items()]


def dense_mlp_map(i: int, prefix: str = "mlp.") -> dict[str, tuple[str, Callable]]:
    """A dense SwiGLU FFN ``{gate,up,down}_proj`` of layer ``i`` (``prefix`` inside the layer)."""
    p = f"model.layers.{i}.{prefix}"
    return {"wi_0": (p + "gate_proj.weight", lambda w: w.T), "wi_1": (p + "up_proj.weight", lambda w: w.T),
            "wo": (p + "down_proj.weight", lambda w: w.T)}


def read_model_level(r: WeightReader, cfg: DecoderConfig) -> dict[str, Source]:
    """Embedding, final norm and (untied) head sources."""
    out: dict[str, Source] = {"embed/embedding": r.get("model.embed_tokens.weight"),
                              "norm/scale": r.get("model.norm.weight")}
    if cfg.tie_embeddings:
        r.alias("lm_head.weight")  # a tied checkpoint may or may not store the shared copy
    else:
        out["lm_head"] = r.get("lm_head.weight", lambda w: w.T)
    return out


def model_level_export(cfg: DecoderConfig) -> list[ExportRow]:
    rows = [("model.embed_tokens.weight", "embed/embedding", None, lambda w: w),
            ("model.norm.weight", "norm/scale", None, lambda w: w)]
    if not cfg.tie_embeddings:
        rows.append(("lm_head.weight", "lm_head", None, lambda w: w.T))
    return rows


def common_hf_config(cfg: DecoderConfig, dtype) -> dict:
    """The ``config.json`` fields every decoder family shares."""
    return {"vocab_size": cfg.vocab_size, "hidden_size": cfg.d_model, "num_hidden_layers": cfg.num_layers,
            "num_attention_heads": cfg.num_heads, "num_key_value_heads": cfg.num_kv_heads, "head_dim": cfg.head_dim,
            "rms_norm_eps": cfg.norm_eps, "rope_theta": cfg.rope_theta, "tie_word_embeddings": cfg.tie_embeddings,
            "hidden_act": "silu", "dtype": np.dtype(dtype).name}


def write_decoder(model: nnx.Module, path: str, plan: list[ExportRow], hf_config: Callable[[np.dtype], dict], *,
                  dtype=None, max_shard_bytes: int) -> None:
    """Stream ``model``'s params out as the HF tensors of ``plan`` (one parameter, one layer of it,
    on the host at a time) into safetensors shards (an index file above ``max_shard_bytes``), then
    ``config.json`` = ``hf_config(dtype)``. ``dtype``: the tensors' dtype (default the params')."""
    params = {"/".join(map(str, p)): v for p, v in nnx.to_flat_state(nnx.state(model, nnx.Param))}
    arrays = {name: (var.get_value() if hasattr(var, "get_value") else var.value) for name, var in params.items()}
    dtype = np.dtype(dtype) if dtype is not None else np.dtype(arrays["embed/embedding"].dtype)

    def part(p, layer):
        a = arrays[p]
        return jax.ShapeDtypeStruct(a.shape[1:] if layer is not None else a.shape, a.dtype)

    paths = lambda p: p if isinstance(p, tuple) else (p,)  # noqa: E731  (a row may read several params)
    shapes = [(name, tuple(jax.eval_shape(fn, *[part(q, i) for q in paths(p)]).shape), dtype)
              for name, p, i, fn in plan]
    writer = ShardedWriter(path, shapes, max_shard_bytes)
    cached = (None, None)
    try:
        for name, p, i, fn in plan:
            if cached[0] != (p, i):
                cached = ((p, i), [np.asarray(jax.device_get(arrays[q][i] if i is not None else arrays[q]))
                                   for q in paths(p)])
            writer.write(name, np.asarray(fn(*cached[1])).astype(dtype))
    except BaseException:
        writer.close(complete=False)
        raise
    writer.close()
    with open(os.path.join(path, "config.json"), "w") as f:
        json.dump(hf_config(dtype), f, indent=2)
