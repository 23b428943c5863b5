"""Hugging Face Qwen2-MoE (Qwen1.5-MoE, Qwen2-57B-A14B), Qwen3-MoE and OLMoE <-> moejax Decoder.

The three share one layout: pre-norm Llama-style blocks with dropless softmax top-k MoE FFNs of
SwiGLU experts (router softmax in float32 over all experts, then top-k; ``norm_topk_prob``
renormalises the k weights). They differ in attention and in the shared expert:

* ``qwen2_moe``: q/k/v biases (``qkv_bias``), a shared expert of ``shared_expert_intermediate_size``
  scaled by ``sigmoid(x . shared_expert_gate)``; ``decoder_sparse_step`` (layer ``i`` sparse iff
  ``(i + 1) % step == 0``, the others dense MLPs of ``intermediate_size``).
* ``qwen3_moe``: per-head RMSNorm of q and k before RoPE (``q_norm``/``k_norm [head_dim]``);
  ``head_dim`` is free (128 on d_model 2048).
* ``olmoe``: RMSNorm over the whole q and k projections (``[h*x]``, ``[j*x]``), ``clip_qkv``;
  the experts' width is ``intermediate_size``.

Weight names (transformers 4.x and the Hub; layer ``N``): ``mlp.gate.weight [E, d]``,
``mlp.experts.M.{gate,up,down}_proj.weight``, ``mlp.shared_expert.{gate,up,down}_proj.weight``,
``mlp.shared_expert_gate.weight [1, d]``, dense layers ``mlp.{gate,up,down}_proj.weight``, plus
the attention and norms of :mod:`moejax.convert.decoder_io`.
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
from moejax.convert.fields import DECODER_INERT, FieldTable, rope_theta
from moejax.convert.load import build_from_hf
from moejax.convert.mapping import Source, WeightReader, tied_head
from moejax.convert.safetensors_io import MAX_SHARD_BYTES
from moejax.models import Decoder, DecoderConfig
from moejax.moe import MoeConfig

SUPPORTED = ("qwen2_moe", "qwen3_moe", "olmoe")

# the transformers 4.57 config classes' defaults for a field a config.json may leave out
_DEFAULTS = {
    "qwen2_moe": {"rope_theta": 1e4, "rms_norm_eps": 1e-6, "num_key_value_heads": 16, "num_experts": 60,
                  "num_experts_per_tok": 4, "moe_intermediate_size": 1408, "shared_expert_intermediate_size": 5632,
                  "norm_topk_prob": False, "decoder_sparse_step": 1, "qkv_bias": True, "intermediate_size": 5632},
    "qwen3_moe": {"rope_theta": 1e4, "rms_norm_eps": 1e-6, "num_key_value_heads": 4, "num_experts": 128,
                  "num_experts_per_tok": 8, "moe_intermediate_size": 768, "norm_topk_prob": False,
                  "decoder_sparse_step": 1, "attention_bias": False, "intermediate_size": 6144},
    "olmoe": {"rope_theta": 1e4, "rms_norm_eps": 1e-5, "num_key_value_heads": None, "num_experts": 64,
              "num_experts_per_tok": 8, "norm_topk_prob": False, "attention_bias": False, "clip_qkv": None,
              "intermediate_size": 2048},
}

_SLIDING_OFF = "sliding windows are off (use_sliding_window is false, refused otherwise)"

FIELDS = FieldTable(
    "qwen2_moe/qwen3_moe/olmoe",
    honoured=frozenset({
        "vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads",
        "num_key_value_heads", "head_dim", "rms_norm_eps", "rope_theta", "rope_scaling", "rope_parameters",
        "tie_word_embeddings", "num_experts", "num_local_experts", "num_experts_per_tok", "norm_topk_prob",
        "moe_intermediate_size", "shared_expert_intermediate_size", "decoder_sparse_step", "mlp_only_layers",
        "qkv_bias", "attention_bias", "clip_qkv"}),
    inert={
        **DECODER_INERT,
        "sliding_window": _SLIDING_OFF, "max_window_layers": _SLIDING_OFF, "layer_types": _SLIDING_OFF,
    },
    fixed={"hidden_act": ("silu",), "use_sliding_window": (False, None), "mlp_bias": (False, None)},
)


def _get(hf: dict, model_type: str, key: str):
    return hf[key] if key in hf else _DEFAULTS[model_type].get(key)


def config_from_hf(hf: dict, *, ignore_fields=(), weights=None, **overrides) -> DecoderConfig:
    """Map a Qwen2-MoE / Qwen3-MoE / OLMoE ``config.json`` (transformers 4.x or 5.x layout) to a
    :class:`DecoderConfig`. Every field is honoured or refused by name (:data:`FIELDS`): sliding
    windows, scaled RoPE and non-empty ``mlp_only_layers`` (dense layers off the
    ``decoder_sparse_step`` period) are refused; a field the file leaves out takes the
    transformers 4.57 class default."""
    model_type = hf.get("model_type")
    if model_type not in SUPPORTED:
        raise ValueError(f"config.json has model_type={model_type!r}; this converter reads {', '.join(SUPPORTED)}")
    FIELDS.check(hf, ignore_fields)
    get = lambda k: _get(hf, model_type, k)  # noqa: E731
    allowed = {"qwen2_moe": {"qkv_bias", "moe_intermediate_size", "shared_expert_intermediate_size",
                             "decoder_sparse_step", "mlp_only_layers"},
               "qwen3_moe": {"attention_bias", "moe_intermediate_size", "decoder_sparse_step", "mlp_only_layers",
                             "num_local_experts"},
               "olmoe": {"attention_bias", "clip_qkv"}}[model_type]
    family_only = {"qkv_bias", "attention_bias", "clip_qkv", "moe_intermediate_size",
                   "shared_expert_intermediate_size", "decoder_sparse_step", "mlp_only_layers", "num_local_experts"}
    foreign = sorted(k for k in family_only - allowed if k in hf)
    if foreign:
        raise ValueError(f"{model_type} config.json has fields {foreign} that {model_type} does not read; "
                         "is model_type right?")
    if hf.get("mlp_only_layers"):
        raise ValueError(f"{model_type} config.json has mlp_only_layers={hf['mlp_only_layers']}: dense layers off the "
                         "decoder_sparse_step period are not supported (supported: mlp_only_layers=[] or null)")
    d, heads = hf["hidden_size"], hf["num_attention_heads"]
    head_dim = hf.get("head_dim") or d // heads
    if model_type == "olmoe" and head_dim != d // heads:
        raise ValueError(f"olmoe config.json has head_dim={head_dim}, but OLMoE always uses hidden_size / "
                         f"num_attention_heads = {d // heads}")
    if model_type == "qwen2_moe" and head_dim * heads != d:
        raise ValueError(f"qwen2_moe config.json has head_dim={head_dim} x {heads} heads != hidden_size={d}; "
                         "transformers' Qwen2-MoE refuses it too")
    experts = get("num_experts")
    if "num_local_experts" in hf:                      # transformers 5 writes Qwen3-MoE's count here
        if "num_experts" in hf and hf["num_experts"] != hf["num_local_experts"]:
            raise ValueError(f"{model_type} config.json has num_experts={hf['num_experts']} and "
                             f"num_local_experts={hf['num_local_experts']}; they must agree")
        experts = hf["num_local_experts"]
    dense_ff = get("intermediate_size")
    step = int(get("decoder_sparse_step") or 1) if model_type != "olmoe" else 1
    moe = None
    if experts:
        shared = int(get("shared_expert_intermediate_size") or 0) if model_type == "qwen2_moe" else 0
        if model_type == "qwen2_moe" and shared < 1:
            raise ValueError(f"qwen2_moe config.json has shared_expert_intermediate_size={shared}; Qwen2-MoE always "
                             "has a shared expert (expected >= 1)")
        moe = MoeConfig(num_experts=experts, d_model=d, top_k=get("num_experts_per_tok"),
                        d_ff=dense_ff if model_type == "olmoe" else get("moe_intermediate_size"),
                        weight_norm="topk" if get("norm_topk_prob") else "none", dropless=True, activation="swiglu",
                        num_shared_experts=1 if shared else 0, shared_d_ff=shared or None, shared_gate=bool(shared),
                        balance_loss_scope="global")
    if model_type == "qwen2_moe":
        bias = "qkv" if get("qkv_bias") else "none"
    else:
        bias = "all" if get("attention_bias") else "none"
    cfg = DecoderConfig(
        vocab_size=hf["vocab_size"], d_model=d, num_layers=hf["num_hidden_layers"], num_heads=heads,
        num_kv_heads=get("num_key_value_heads") or heads, head_dim=head_dim, d_ff=dense_ff, activation="swiglu",
        norm_eps=float(get("rms_norm_eps")), rope_theta=rope_theta(hf, _DEFAULTS[model_type]["rope_theta"], model_type),
        attention_bias=bias, qk_norm={"qwen2_moe": "none", "qwen3_moe": "head", "olmoe": "full"}[model_type],
        qkv_clip=get("clip_qkv") if model_type == "olmoe" else None,
        tie_embeddings=tied_head(bool(hf.get("tie_word_embeddings", False)), weights, "lm_head.weight",
                                 "model.embed_tokens.weight"), moe=moe, moe_every=step if moe is not None else 1,
    )
    if moe is not None and cfg.num_layers % step:
        raise ValueError(f"{model_type} config.json has num_hidden_layers={cfg.num_layers}, not a multiple of "
                         f"decoder_sparse_step={step}: moejax scans whole periods of layers")
    return cfg.replace(**overrides).validate()


def _ffn_names(i: int, sparse: bool, moe: MoeConfig | None) -> dict[str, str | list[str]]:
    """moejax FFN path (within a block) -> HF name (or the per-expert names) of layer ``i``."""
    p = f"model.layers.{i}.mlp."
    if not sparse:
        return {f"ffn/{k}": name for k, (name, _) in dense_mlp_map(i).items()}
    out: dict[str, str | list[str]] = {"ffn/router/kernel": p + "gate.weight"}
    for ours, theirs in (("wi_0", "gate_proj"), ("wi_1", "up_proj"), ("wo", "down_proj")):
        out[f"ffn/experts/{ours}"] = [f"{p}experts.{e}.{theirs}.weight" for e in range(moe.num_experts)]
        if moe.num_shared_experts:
            out[f"ffn/shared/{ours}"] = f"{p}shared_expert.{theirs}.weight"
    if moe.shared_gate:
        out["ffn/shared_gate"] = p + "shared_expert_gate.weight"
    return out


def _t(w):
    return w.T


def hf_to_state(cfg: DecoderConfig, weights) -> dict[str, Source]:
    """Flat ``{moejax param path: lazy source}`` for a Decoder built from ``cfg`` (``weights``:
    ``{HF name: array}``, memory-mapped). Raises ValueError listing missing / unexpected weights."""
    r = WeightReader(weights)
    out = read_model_level(r, cfg)
    for i in range(cfg.num_layers):
        block = f"stack/blocks/{i % cfg.period}/"
        for path, (name, fn) in attention_map(cfg, i).items():
            r.push(block + path, r.get(name, fn))
        for path, name in _ffn_names(i, cfg.is_sparse(i), cfg.moe).items():
            r.push(block + path, r.get_stacked(name, _t) if isinstance(name, list) else r.get(name, _t))
    return r.finish(out)


def from_hf(path: str, **kw) -> tuple[Decoder, DecoderConfig]:
    """Build a :class:`Decoder` from a HF Qwen2-MoE / Qwen3-MoE / OLMoE ``save_pretrained``
    directory, streaming (see :func:`moejax.convert.load.build_from_hf` for ``mesh``, ``dtype``)."""
    return build_from_hf(path, config_from_hf, hf_to_state, **kw)


def hf_family(cfg: DecoderConfig) -> str:
    """The ``model_type`` that represents ``cfg`` exactly (by its features: the QK-norm and the
    shared-expert gate), or ValueError naming what no supported family has."""
    moe = cfg.moe
    if moe is None:
        raise ValueError("a dense decoder exports as Llama / Mistral (moejax.convert.hf_mixtral.to_hf)")
    family = {"head": "qwen3_moe", "full": "olmoe"}.get(cfg.qk_norm, "qwen2_moe")
    problems = []
    if (cfg.activation, moe.activation) != ("swiglu", "swiglu") or not moe.dropless or moe.router != "top_k":
        problems.append("dropless top_k routing over SwiGLU experts")
    if moe.weight_norm not in ("none", "topk") or moe.router_bias or moe.use_bias or moe.jitter_eps:
        problems.append("weight_norm 'none' or 'topk', no router / expert biases, no jitter")
    if cfg.moe_extra_mlp or cfg.attn_scale is not None or cfg.sliding_window is not None:
        problems.append("no extra MLP, default attention scale, no sliding window")
    if family == "qwen2_moe":
        if not (moe.shared_gate and moe.num_shared_experts == 1) or cfg.attention_bias == "all":
            problems.append("one gated shared expert and attention_bias 'qkv' or 'none' (Qwen2-MoE)")
        if cfg.qkv_clip is not None:
            problems.append("no qkv_clip")
    elif moe.num_shared_experts or cfg.attention_bias == "qkv":
        problems.append("no shared experts, attention_bias 'all' or 'none'")
    if family == "olmoe" and (cfg.period != 1 or cfg.head_dim * cfg.num_heads != cfg.d_model):
        problems.append("every layer sparse and head_dim = d_model / num_heads (OLMoE)")
    if family == "qwen3_moe" and cfg.qkv_clip is not None:
        problems.append("no qkv_clip")
    if problems:
        raise ValueError(f"cannot export as {family}: it needs {'; '.join(problems)}")
    return family


def export_plan(cfg: DecoderConfig) -> list[ExportRow]:
    """``[(HF name, moejax param path, layer or None, fn)]`` in the order the tensors are written."""
    plan = model_level_export(cfg)
    for i in range(cfg.num_layers):
        block, period = f"stack/blocks/{i % cfg.period}/", i // cfg.period   # block in the period, its index
        plan += [(name, block + path[len(BLOCK):], period, fn) for name, path, _, fn in attention_export(cfg, i)]
        for path, name in _ffn_names(i, cfg.is_sparse(i), cfg.moe).items():
            if isinstance(name, list):
                plan += [(n, block + path, period, lambda w, e=e: w[e].T) for e, n in enumerate(name)]
            else:
                plan.append((name, block + path, period, _t))
    return plan


def hf_config(cfg: DecoderConfig, dtype) -> dict:
    """The ``config.json`` of :func:`to_hf` (transformers 4.x layout, every field written)."""
    family, moe = hf_family(cfg), cfg.moe
    arch = {"qwen2_moe": "Qwen2MoeForCausalLM", "qwen3_moe": "Qwen3MoeForCausalLM", "olmoe": "OlmoeForCausalLM"}
    hf = {"model_type": family, "architectures": [arch[family]], **common_hf_config(cfg, dtype),
          "num_experts": moe.num_experts, "num_experts_per_tok": moe.top_k,
          "norm_topk_prob": moe.weight_norm == "topk", "output_router_logits": False}
    if family == "olmoe":
        hf.update(intermediate_size=moe.d_ff, attention_bias=cfg.attention_bias == "all", clip_qkv=cfg.qkv_clip)
        del hf["head_dim"]
    else:
        hf.update(intermediate_size=cfg.d_ff, moe_intermediate_size=moe.d_ff, decoder_sparse_step=cfg.period,
                  mlp_only_layers=[], use_sliding_window=False)
    if family == "qwen2_moe":
        hf.update(qkv_bias=cfg.attention_bias == "qkv", shared_expert_intermediate_size=moe.shared_d_ff or moe.d_ff)
    if family == "qwen3_moe":
        hf["attention_bias"] = cfg.attention_bias == "all"
    return hf


def check_export(cfg: DecoderConfig) -> None:
    """ValueError (naming the fields) unless this family's config.json represents ``cfg``."""
    hf_family(cfg)
    check_round_trip(cfg, config_from_hf(hf_config(cfg, "float32")), "Qwen-MoE / OLMoE")


def to_hf(model: Decoder, path: str, *, dtype=None, max_shard_bytes: int = MAX_SHARD_BYTES) -> None:
    """Export a Qwen2-MoE / Qwen3-MoE / OLMoE-shaped :class:`Decoder` (:func:`hf_family`) to a HF
    ``save_pretrained`` directory, streaming one parameter (one layer of it) at a time into
    safetensors shards; ``dtype``: the tensors' dtype (default: the parameters')."""
    cfg = model.cfg
    hf_family(cfg)
    write_decoder(model, path, export_plan(cfg), lambda dt: hf_config(cfg, dt), dtype=dtype,
                  max_shard_bytes=max_shard_bytes)
