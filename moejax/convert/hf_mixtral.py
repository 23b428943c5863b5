"""Hugging Face Mixtral (and Mistral / Llama dense) <-> moejax Decoder weights.

Weight names (transformers 4.x, "v4 keys"): ``model.embed_tokens.weight``,
``model.layers.N.self_attn.{q,k,v,o}_proj.weight``, ``...{input,post_attention}_layernorm.weight``,
``...block_sparse_moe.gate.weight [E, d]``, ``...block_sparse_moe.experts.M.w{1,2,3}.weight``
(dense Llama/Mistral: ``...mlp.{gate,up,down}_proj.weight``), ``model.norm.weight``,
``lm_head.weight``. PyTorch matrices are ``[out, in]``; moejax kernels are ``[in, out]``.
"""

from __future__ import annotations

import numpy as np
from flax import nnx

from moejax.convert.mapping import WeightReader, load_into
from moejax.convert.safetensors_io import load_hf_dir, read_hf_config, save_hf_dir
from moejax.models import Decoder, DecoderConfig
from moejax.moe import MoeConfig

SUPPORTED = ("mixtral", "mistral", "llama")


def config_from_hf(hf: dict, **overrides) -> DecoderConfig:
    """Map a Mixtral / Mistral / Llama ``config.json`` to a :class:`DecoderConfig`."""
    model_type = hf.get("model_type")
    if model_type not in SUPPORTED:
        raise ValueError(f"config.json has model_type={model_type!r}; this converter reads {', '.join(SUPPORTED)}")
    unsupported = {k: hf[k] for k in ("rope_scaling", "attention_bias", "mlp_bias") if hf.get(k)}
    if hf.get("hidden_act", "silu") != "silu":
        unsupported["hidden_act"] = hf["hidden_act"]
    if unsupported:
        raise ValueError(f"config.json uses features this converter does not implement: {unsupported}")
    d = hf["hidden_size"]
    heads = hf["num_attention_heads"]
    head_dim = hf.get("head_dim") or d // heads
    moe = None
    if model_type == "mixtral":
        moe = MoeConfig(num_experts=hf["num_local_experts"], d_model=d, d_ff=hf["intermediate_size"],
                        top_k=hf["num_experts_per_tok"], weight_norm="topk", dropless=True, activation="swiglu",
                        jitter_eps=hf.get("router_jitter_noise", 0.0) or 0.0)
    cfg = DecoderConfig(
        vocab_size=hf["vocab_size"], d_model=d, num_layers=hf["num_hidden_layers"], num_heads=heads,
        num_kv_heads=hf.get("num_key_value_heads") or heads, head_dim=head_dim, d_ff=hf["intermediate_size"],
        activation="swiglu", norm_eps=hf.get("rms_norm_eps", 1e-5), rope_theta=hf.get("rope_theta", 10000.0),
        sliding_window=hf.get("sliding_window"), tie_embeddings=bool(hf.get("tie_word_embeddings", False)),
        moe=moe, moe_every=1,
    )
    return cfg.replace(**overrides).validate()


def _layer_map(cfg: DecoderConfig, i: int) -> dict[str, tuple[str, callable]]:
    """moejax path (within stacked block 0, layer i) -> (HF name, transform HF array -> moejax)."""
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
    if cfg.moe is None:
        m["ffn/wi_0"] = (p + "mlp.gate_proj.weight", lambda w: w.T)
        m["ffn/wi_1"] = (p + "mlp.up_proj.weight", lambda w: w.T)
        m["ffn/wo"] = (p + "mlp.down_proj.weight", lambda w: w.T)
    else:
        m["ffn/router/kernel"] = (p + "block_sparse_moe.gate.weight", lambda w: w.T)
    return m


def _expert_names(i: int, e: int, which: str) -> str:
    return f"model.layers.{i}.block_sparse_moe.experts.{e}.{which}.weight"


def hf_to_state(cfg: DecoderConfig, weights: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    """Flat ``{moejax param path: array}`` for a Decoder built from ``cfg``.

    Raises ValueError listing HF weights that were not used or were missing.
    """
    r = WeightReader(weights)
    out: dict[str, np.ndarray] = {"embed/embedding": r.get("model.embed_tokens.weight"),
                                  "norm/scale": r.get("model.norm.weight")}
    if cfg.tie_embeddings:
        r.alias("lm_head.weight")  # a tied checkpoint may or may not store the shared copy
    else:
        w = r.get("lm_head.weight")
        out["lm_head"] = None if w is None else w.T
    for i in range(cfg.num_layers):
        for path, (name, fn) in _layer_map(cfg, i).items():
            w = r.get(name)
            r.push(f"stack/blocks/0/{path}", None if w is None else fn(w))
        if cfg.moe is not None:
            for path, which in (("ffn/experts/wi_0", "w1"), ("ffn/experts/wi_1", "w3"), ("ffn/experts/wo", "w2")):
                names = [_expert_names(i, e, which) for e in range(cfg.moe.num_experts)]
                r.push(f"stack/blocks/0/{path}", r.get_stacked(names, lambda w: w.T))
    return r.finish(out)


def from_hf(path: str, *, rngs: nnx.Rngs | None = None, **overrides) -> tuple[Decoder, DecoderConfig]:
    """Build a :class:`Decoder` from a HF Mixtral / Mistral / Llama ``save_pretrained`` directory."""
    cfg = config_from_hf(read_hf_config(path), **overrides)  # fail on a wrong model before reading weights
    _, weights = load_hf_dir(path)
    model = Decoder(cfg, rngs=rngs or nnx.Rngs(0))
    return load_into(model, hf_to_state(cfg, weights)), cfg


def to_hf(model: Decoder, path: str) -> None:
    """Export a Mixtral-family :class:`Decoder` to a HF ``save_pretrained`` directory (safetensors)."""
    cfg = model.cfg
    if cfg.period != 1:
        raise ValueError(f"HF export needs every layer alike (Mixtral / Llama); got moe_every={cfg.moe_every}")
    flat = {"/".join(map(str, p)): np.asarray(v[...]) for p, v in nnx.to_flat_state(nnx.state(model, nnx.Param))}
    h, k, x, d = cfg.num_heads, cfg.num_kv_heads, cfg.head_dim, cfg.d_model
    w = {"model.embed_tokens.weight": flat["embed/embedding"], "model.norm.weight": flat["norm/scale"]}
    if not cfg.tie_embeddings:
        w["lm_head.weight"] = flat["lm_head"].T
    for i in range(cfg.num_layers):
        def g(name, i=i):
            return flat[f"stack/blocks/0/{name}"][i]

        p = f"model.layers.{i}."
        w[p + "self_attn.q_proj.weight"] = g("attn/q").reshape(d, h * x).T
        w[p + "self_attn.k_proj.weight"] = g("attn/k").reshape(d, k * x).T
        w[p + "self_attn.v_proj.weight"] = g("attn/v").reshape(d, k * x).T
        w[p + "self_attn.o_proj.weight"] = g("attn/o").reshape(h * x, d).T
        w[p + "input_layernorm.weight"] = g("attn_norm/scale")
        w[p + "post_attention_layernorm.weight"] = g("ffn_norm/scale")
        if cfg.moe is None:
            w[p + "mlp.gate_proj.weight"] = g("ffn/wi_0").T
            w[p + "mlp.up_proj.weight"] = g("ffn/wi_1").T
            w[p + "mlp.down_proj.weight"] = g("ffn/wo").T
        else:
            w[p + "block_sparse_moe.gate.weight"] = g("ffn/router/kernel").T
            for e in range(cfg.moe.num_experts):
                w[_expert_names(i, e, "w1")] = g("ffn/experts/wi_0")[e].T
                w[_expert_names(i, e, "w3")] = g("ffn/experts/wi_1")[e].T
                w[_expert_names(i, e, "w2")] = g("ffn/experts/wo")[e].T
    hf = {
        "model_type": "mixtral" if cfg.moe is not None else "llama",
        "architectures": ["MixtralForCausalLM" if cfg.moe is not None else "LlamaForCausalLM"],
        "vocab_size": cfg.vocab_size, "hidden_size": d, "intermediate_size": cfg.moe.d_ff if cfg.moe else cfg.d_ff,
        "num_hidden_layers": cfg.num_layers, "num_attention_heads": h, "num_key_value_heads": k, "head_dim": x,
        "rms_norm_eps": cfg.norm_eps, "rope_theta": cfg.rope_theta, "sliding_window": cfg.sliding_window,
        "tie_word_embeddings": cfg.tie_embeddings, "hidden_act": "silu", "torch_dtype": "float32",
    }
    if cfg.moe is not None:
        hf.update(num_local_experts=cfg.moe.num_experts, num_experts_per_tok=cfg.moe.top_k,
                  router_jitter_noise=cfg.moe.jitter_eps, output_router_logits=False)
    save_hf_dir(path, hf, w)
