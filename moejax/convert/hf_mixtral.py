"""Hugging Face Mixtral (and Mistral / Llama dense) <-> moejax Decoder weights.

Weight names (transformers 4.x, "v4 keys"): ``model.embed_tokens.weight``,
``model.layers.N.self_attn.{q,k,v,o}_proj.weight``, ``...{input,post_attention}_layernorm.weight``,
``...block_sparse_moe.gate.weight [E, d]``, ``...block_sparse_moe.experts.M.w{1,2,3}.weight``
(dense Llama/Mistral: ``...mlp.{gate,up,down}_proj.weight``), ``model.norm.weight``,
``lm_head.weight``. PyTorch matrices are ``[out, in]``; moejax kernels are ``[in, out]``.
"""

from __future__ import annotations

from moejax.convert.decoder_io import (
    BLOCK,
    ExportRow,
    attention_export,
    attention_map,
    common_hf_config,
    dense_mlp_map,
    model_level_export,
    read_model_level,
    write_decoder,
)
from moejax.convert.export_check import check_round_trip
from moejax.convert.fields import DECODER_INERT, FieldTable, llama3, rope_parameters
from moejax.convert.load import build_from_hf
from moejax.convert.mapping import Source, WeightReader, tied_head
from moejax.convert.safetensors_io import MAX_SHARD_BYTES
from moejax.models import Decoder, DecoderConfig
from moejax.models.layers import Llama3Rope
from moejax.moe import MoeConfig

SUPPORTED = ("mixtral", "mistral", "llama")

# the transformers config classes' defaults for a field a config.json may leave out
_DEFAULTS = {
    "mixtral": {"rope_theta": 1e6, "rms_norm_eps": 1e-5, "sliding_window": None, "num_key_value_heads": 8,
                "num_experts_per_tok": 2, "num_local_experts": 8, "router_jitter_noise": 0.0},
    "mistral": {"rope_theta": 1e4, "rms_norm_eps": 1e-6, "sliding_window": 4096, "num_key_value_heads": 8},
    "llama": {"rope_theta": 1e4, "rms_norm_eps": 1e-6, "sliding_window": None, "num_key_value_heads": None},
}

FIELDS = FieldTable(
    "mixtral/mistral/llama",
    honoured=frozenset({
        "vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads",
        "num_key_value_heads", "head_dim", "rms_norm_eps", "rope_theta", "rope_scaling", "rope_parameters",
        "sliding_window", "tie_word_embeddings", "num_local_experts", "num_experts_per_tok", "router_jitter_noise"}),
    inert={
        **DECODER_INERT,
        "pretraining_tp": "splits the projections into slices and sums them: the same numbers",
    },
    fixed={"hidden_act": ("silu",), "attention_bias": (False, None), "mlp_bias": (False, None),
           "use_sliding_window": (False, None)},
)


def config_from_hf(hf: dict, *, ignore_fields=(), weights=None, **overrides) -> DecoderConfig:
    """Map a Mixtral / Mistral / Llama ``config.json`` (transformers 4.x or 5.x layout) to a
    :class:`DecoderConfig`. Every field is honoured or refused by name (:data:`FIELDS`); a field
    the file leaves out takes the transformers class default (Mixtral's RoPE base is 1e6).
    ``weights`` (the checkpoint's, optional): a stored ``lm_head`` that differs from the embedding
    unties them, as transformers 5 decides."""
    model_type = hf.get("model_type")
    if model_type not in SUPPORTED:
        raise ValueError(f"config.json has model_type={model_type!r}; this converter reads {', '.join(SUPPORTED)}")
    FIELDS.check(hf, ignore_fields)
    dflt = _DEFAULTS[model_type]
    if model_type != "mixtral":
        experts = sorted(k for k in ("num_local_experts", "num_experts_per_tok", "router_jitter_noise") if k in hf)
        if experts:
            raise ValueError(f"{model_type} config.json has MoE fields {experts}; a {model_type} model is dense")
    get = lambda k: hf[k] if k in hf else dflt.get(k)  # noqa: E731
    d = hf["hidden_size"]
    heads = hf["num_attention_heads"]
    head_dim = hf.get("head_dim") or d // heads
    window = get("sliding_window")
    if window is not None and window < 1:
        raise ValueError(f"{model_type} config.json has sliding_window={window}; expected a window >= 1 or null")
    theta, scaling = rope_parameters(hf, dflt["rope_theta"], model_type, allow=("llama3",))
    moe = None
    if model_type == "mixtral":
        moe = MoeConfig(num_experts=get("num_local_experts"), d_model=d, d_ff=hf["intermediate_size"],
                        top_k=get("num_experts_per_tok"), weight_norm="topk", dropless=True, activation="swiglu",
                        jitter_eps=float(get("router_jitter_noise") or 0.0), balance_loss_scope="global")
    cfg = DecoderConfig(
        vocab_size=hf["vocab_size"], d_model=d, num_layers=hf["num_hidden_layers"], num_heads=heads,
        num_kv_heads=get("num_key_value_heads") or heads, head_dim=head_dim, d_ff=hf["intermediate_size"],
        activation="swiglu", norm_eps=float(get("rms_norm_eps")),
        rope_theta=theta, rope_scaling=None if scaling is None else llama3(scaling, model_type),
        sliding_window=window,
        tie_embeddings=tied_head(bool(hf.get("tie_word_embeddings", False)), weights, "lm_head.weight",
                                 "model.embed_tokens.weight"), moe=moe, moe_every=1,
    )
    return cfg.replace(**overrides).validate()


def _layer_map(cfg: DecoderConfig, i: int) -> dict[str, tuple[str, callable]]:
    """moejax path (within stacked block 0, layer i) -> (HF name, transform HF array -> moejax)."""
    m = attention_map(cfg, i)
    if cfg.moe is None:
        m.update({f"ffn/{k}": v for k, v in dense_mlp_map(i).items()})
    else:
        m["ffn/router/kernel"] = (f"model.layers.{i}.block_sparse_moe.gate.weight", lambda w: w.T)
    return m


def _expert_names(i: int, e: int, which: str) -> str:
    return f"model.layers.{i}.block_sparse_moe.experts.{e}.{which}.weight"


def hf_to_state(cfg: DecoderConfig, weights) -> dict[str, Source]:
    """Flat ``{moejax param path: lazy source}`` for a Decoder built from ``cfg``; ``weights`` is a
    ``{HF name: array}`` mapping (memory-mapped by ``open_hf_dir``).

    Raises ValueError listing HF weights that were not used or were missing.
    """
    r = WeightReader(weights)
    out = read_model_level(r, cfg)
    for i in range(cfg.num_layers):
        for path, (name, fn) in _layer_map(cfg, i).items():
            r.push(f"stack/blocks/0/{path}", r.get(name, fn))
        if cfg.moe is not None:
            for path, which in (("ffn/experts/wi_0", "w1"), ("ffn/experts/wi_1", "w3"), ("ffn/experts/wo", "w2")):
                names = [_expert_names(i, e, which) for e in range(cfg.moe.num_experts)]
                r.push(f"stack/blocks/0/{path}", r.get_stacked(names, lambda w: w.T))
    return r.finish(out)


def from_hf(path: str, **kw) -> tuple[Decoder, DecoderConfig]:
    """Build a :class:`Decoder` from a HF Mixtral / Mistral / Llama ``save_pretrained`` directory,
    streaming (see :func:`moejax.convert.load.build_from_hf` for ``mesh``, ``dtype``, ...)."""
    return build_from_hf(path, config_from_hf, hf_to_state, **kw)


def export_plan(cfg: DecoderConfig) -> list[ExportRow]:
    """``[(HF name, moejax param path, layer or None, fn: that param's (layer) array -> HF tensor)]``
    in the order the tensors are written, grouped by parameter (and layer)."""
    plan = model_level_export(cfg)
    for i in range(cfg.num_layers):
        plan += attention_export(cfg, i)
        if cfg.moe is None:
            plan += [(name, BLOCK + f"ffn/{k}", i, lambda w: w.T) for k, (name, _) in dense_mlp_map(i).items()]
        else:
            plan.append((f"model.layers.{i}.block_sparse_moe.gate.weight", BLOCK + "ffn/router/kernel", i,
                         lambda w: w.T))
            for path, which in (("ffn/experts/wi_0", "w1"), ("ffn/experts/wi_1", "w3"), ("ffn/experts/wo", "w2")):
                plan += [(_expert_names(i, e, which), BLOCK + path, i, lambda w, e=e: w[e].T)
                         for e in range(cfg.moe.num_experts)]
    return plan


def hf_config(cfg: DecoderConfig, dtype) -> dict:
    """The ``config.json`` of :func:`to_hf`: ``mixtral`` with experts, else ``mistral`` when there
    is a sliding window (Llama has none), else ``llama``."""
    moe = cfg.moe
    model_type = "mixtral" if moe is not None else "mistral" if cfg.sliding_window is not None else "llama"
    arch = {"mixtral": "MixtralForCausalLM", "mistral": "MistralForCausalLM", "llama": "LlamaForCausalLM"}
    hf = {"model_type": model_type, "architectures": [arch[model_type]],
          "intermediate_size": moe.d_ff if moe else cfg.d_ff, **common_hf_config(cfg, dtype)}
    if model_type != "llama":
        hf["sliding_window"] = cfg.sliding_window
    else:
        hf.update(attention_bias=False, mlp_bias=False)
    if moe is not None:
        hf.update(num_local_experts=moe.num_experts, num_experts_per_tok=moe.top_k,
                  router_jitter_noise=moe.jitter_eps, output_router_logits=False)
    r = cfg.rope_scaling
    if isinstance(r, Llama3Rope):
        hf["rope_scaling"] = {"rope_type": "llama3", "factor": r.factor, "low_freq_factor": r.low_freq_factor,
                              "high_freq_factor": r.high_freq_factor,
                              "original_max_position_embeddings": r.original_max_position}
    return hf


def check_export(cfg: DecoderConfig) -> None:
    """ValueError (naming the fields) unless a Mixtral / Mistral / Llama config.json represents ``cfg``."""
    if cfg.period != 1:
        raise ValueError(f"HF export needs every layer alike (Mixtral / Llama); got moe_every={cfg.moe_every}")
    if (cfg.moe_extra_mlp or cfg.attn_scale is not None or cfg.activation != "swiglu" or cfg.attention_bias != "none"
            or cfg.qk_norm != "none" or cfg.qkv_clip is not None):
        raise ValueError("HF export writes Mixtral / Mistral / Llama; this model has "
                         f"moe_extra_mlp={cfg.moe_extra_mlp}, attn_scale={cfg.attn_scale}, "
                         f"activation={cfg.activation!r}, attention_bias={cfg.attention_bias!r}, "
                         f"qk_norm={cfg.qk_norm!r}, qkv_clip={cfg.qkv_clip} (needs False, None, 'swiglu', 'none', "
                         "'none', None)")
    moe = cfg.moe
    if moe is not None and (moe.activation != "swiglu" or moe.weight_norm != "topk" or not moe.dropless
                            or moe.num_shared_experts or moe.router_bias or moe.use_bias):
        raise ValueError("HF export writes Mixtral's MoE (dropless softmax top-k renormalised, SwiGLU experts); "
                         f"this model's MoE differs: {moe}")
    check_round_trip(cfg, config_from_hf(hf_config(cfg, "float32")), "Mixtral / Mistral / Llama")


def to_hf(model: Decoder, path: str, *, dtype=None, max_shard_bytes: int = MAX_SHARD_BYTES) -> None:
    """Export a Mixtral / Mistral / Llama :class:`Decoder` to a HF ``save_pretrained`` directory,
    streaming: one parameter (one layer of it) on the host at a time, written into safetensors
    shards (with ``model.safetensors.index.json`` above ``max_shard_bytes``). ``dtype``: the
    tensors' dtype (default: the parameters')."""
    cfg = model.cfg
    check_export(cfg)
    write_decoder(model, path, export_plan(cfg), lambda dt: hf_config(cfg, dt), dtype=dtype,
                  max_shard_bytes=max_shard_bytes)
