"""Hugging Face DeepSeek-V2 (-Lite) / DeepSeek-V3 (and Kimi-K2's layout) <-> moejax Decoder.

Both: multi-head latent attention (:class:`moejax.models.mla.MLAttention`), the first
``first_k_dense_replace`` layers dense SwiGLU MLPs of ``intermediate_size``, the others MoE FFNs
of ``n_routed_experts`` SwiGLU experts of ``moe_intermediate_size`` plus an ungated shared MLP of
``n_shared_experts * moe_intermediate_size``; YaRN RoPE over the ``qk_rope_head_dim`` dims.

* ``deepseek_v2``: softmax scores in float32; ``topk_method`` ``greedy`` (plain top-k) or
  ``group_limited_greedy`` (``n_group`` groups scored by their best expert, top ``topk_group``
  kept); weights are the raw scores times ``routed_scaling_factor``. RoPE pairs are interleaved
  (complex multiplication).
* ``deepseek_v3``: sigmoid scores, a selection-only ``e_score_correction_bias``, groups scored by
  their top-2 sum (``noaux_tc``), weights renormalised (``norm_topk_prob``) and scaled; RoPE
  interleaved unless ``rope_interleave: false``.
* ``kimi_k2``: Kimi-K2's Hub checkpoints (``architectures: DeepseekV3ForCausalLM`` with DeepSeek's
  own modeling code through ``auto_map``): read exactly as ``deepseek_v3`` (FP8 weights included);
  exported back as ``deepseek_v3``, which transformers loads without remote code.

Interleaved RoPE pairs ``(2i, 2i+1)`` are moved into moejax's rotate-half layout by permuting the
RoPE rows of the query and shared-key projections on import (and back on export): q . k is
unchanged. With YaRN the softmax scale is ``(nope + rope)^-0.5 * mscale(factor, mscale_all_dim)^2``
as DeepSeek's own code and transformers 5 compute it, and transformers 4.57's V3; **transformers
4.57's V2 leaves out the ``mscale^2``** (so a YaRN V2 model's logits differ between 4.57 and 5.x).
Groups not kept are masked to -inf (DeepSeek, transformers 5); 4.57's V3 masks to 0.0, which
differs only if a kept expert's biased score is negative.

Weight names (layer ``N``): ``self_attn.q_proj.weight`` or ``self_attn.{q_a_proj, q_a_layernorm,
q_b_proj}.weight``, ``self_attn.{kv_a_proj_with_mqa, kv_a_layernorm, kv_b_proj, o_proj}.weight``,
``mlp.{gate,up,down}_proj.weight`` (dense layers), ``mlp.gate.weight [E, d]``,
``mlp.gate.e_score_correction_bias [E]`` (V3), ``mlp.experts.M.{gate,up,down}_proj.weight``,
``mlp.shared_experts.{gate,up,down}_proj.weight``, the two norms and the model-level weights.
"""

from __future__ import annotations

import numpy as np

from moejax.convert.decoder_io import (
    ExportRow,
    dense_mlp_map,
    model_level_export,
    read_model_level,
    write_decoder,
)
from moejax.convert.export_check import check_round_trip
from moejax.convert.fields import DECODER_INERT, TRAINING_ONLY, FieldTable, rope_parameters, yarn
from moejax.convert.fp8 import block_size
from moejax.convert.load import build_from_hf
from moejax.convert.mapping import Source, WeightReader, tied_head
from moejax.convert.safetensors_io import MAX_SHARD_BYTES, read_hf_config
from moejax.models import Decoder, DecoderConfig
from moejax.models.layers import Yarn
from moejax.moe import MoeConfig

SUPPORTED = ("deepseek_v2", "deepseek_v3", "kimi_k2")
#: model types with DeepSeek-V3's routing (sigmoid scores, selection bias, ``noaux_tc``): Kimi-K2's
#: Hub checkpoints are DeepSeek-V3 models (``architectures: DeepseekV3ForCausalLM``, DeepSeek's own
#: modeling code through ``auto_map``) under ``model_type: kimi_k2``
_V3_LIKE = ("deepseek_v3", "kimi_k2")

# the transformers 4.57 config classes' defaults for a field a config.json may leave out
_DEFAULTS = {
    "deepseek_v2": {"vocab_size": 32000, "hidden_size": 4096, "intermediate_size": 11008, "num_hidden_layers": 30,
                    "num_attention_heads": 32, "num_key_value_heads": 32, "rms_norm_eps": 1e-6, "rope_theta": 1e4,
                    "first_k_dense_replace": 0, "kv_lora_rank": 512, "q_lora_rank": 1536, "n_group": None,
                    "n_routed_experts": 64, "n_shared_experts": 2, "qk_nope_head_dim": 128, "qk_rope_head_dim": 64,
                    "routed_scaling_factor": 1.0, "topk_group": None, "topk_method": "greedy", "v_head_dim": 128,
                    "num_experts_per_tok": None, "norm_topk_prob": False, "moe_intermediate_size": 1407,
                    "tie_word_embeddings": False},
    "deepseek_v3": {"vocab_size": 129280, "hidden_size": 7168, "intermediate_size": 18432,
                    "moe_intermediate_size": 2048, "num_hidden_layers": 61, "num_attention_heads": 128,
                    "num_key_value_heads": 128, "n_shared_experts": 1, "n_routed_experts": 256,
                    "routed_scaling_factor": 2.5, "kv_lora_rank": 512, "q_lora_rank": 1536, "qk_rope_head_dim": 64,
                    "v_head_dim": 128, "qk_nope_head_dim": 128, "n_group": 8, "topk_group": 4,
                    "num_experts_per_tok": 8, "first_k_dense_replace": 3, "norm_topk_prob": True,
                    "rms_norm_eps": 1e-6, "rope_theta": 1e4, "rope_interleave": True, "tie_word_embeddings": False},
}
# Kimi-K2 ships DeepSeek's DeepseekV3Config (the same defaults); its config.json sets every field
_DEFAULTS["kimi_k2"] = _DEFAULTS["deepseek_v3"]

FIELDS = FieldTable(
    "deepseek_v2/deepseek_v3",
    honoured=frozenset({
        "vocab_size", "hidden_size", "intermediate_size", "moe_intermediate_size", "num_hidden_layers",
        "num_attention_heads", "num_key_value_heads", "n_shared_experts", "n_routed_experts", "routed_scaling_factor",
        "kv_lora_rank", "q_lora_rank", "qk_rope_head_dim", "v_head_dim", "qk_nope_head_dim", "qk_head_dim",
        "head_dim", "n_group", "topk_group", "topk_method", "scoring_func", "num_experts_per_tok",
        "first_k_dense_replace", "norm_topk_prob", "rms_norm_eps", "rope_theta", "rope_scaling", "rope_parameters",
        "rope_interleave", "tie_word_embeddings", "num_nextn_predict_layers", "quantization_config"}),
    inert={
        **DECODER_INERT,
        "max_position_embeddings": "read only as YaRN's original length when rope_scaling leaves it out",
        "aux_loss_alpha": TRAINING_ONLY, "seq_aux": TRAINING_ONLY, "pretraining_tp": "a pretraining-time split "
        "of the matmuls: the same numbers", "ep_size": "expert-parallel degree: a parallelism setting",
    },
    fixed={"hidden_act": ("silu",), "attention_bias": (False, None), "mlp_bias": (False, None),
           "moe_layer_freq": (1, None)},
)


def _get(hf: dict, model_type: str, key: str):
    return hf[key] if key in hf else _DEFAULTS[model_type].get(key)


def _yarn(hf: dict, model_type: str) -> tuple[float, Yarn | None]:
    theta, params = rope_parameters(hf, _DEFAULTS[model_type]["rope_theta"], model_type, allow=("yarn",))
    return theta, None if params is None else yarn(params, hf, model_type)


def interleaved(hf: dict) -> bool:
    """Does the HF checkpoint (its ``config.json``) store RoPE pairs interleaved (V2 always; V3
    unless ``rope_interleave: false``)?"""
    return hf.get("model_type") == "deepseek_v2" or bool(hf.get("rope_interleave", True))


def config_from_hf(hf: dict, *, ignore_fields=(), weights=None, **overrides) -> DecoderConfig:
    """Map a DeepSeek-V2 / V3 ``config.json`` (transformers 4.x or 5.x layout) to a
    :class:`DecoderConfig`; every field is honoured, inert with a reason, or refused by name
    (:data:`FIELDS`). The interleaved-RoPE flag is not a model field: :func:`hf_to_state` reads it."""
    model_type = hf.get("model_type")
    if model_type not in SUPPORTED:
        raise ValueError(f"config.json has model_type={model_type!r}; this converter reads {', '.join(SUPPORTED)}")
    FIELDS.check(hf, ignore_fields)
    block_size(hf)                      # block-scaled FP8 weights (V3's Hub checkpoint) are dequantised on read
    get = lambda k: _get(hf, model_type, k)  # noqa: E731
    v3 = model_type in _V3_LIKE
    if "rope_interleave" in hf and not v3:
        raise ValueError("deepseek_v2 config.json has rope_interleave, which only deepseek_v3 reads; "
                         "is model_type right?")
    d, heads = get("hidden_size"), get("num_attention_heads")
    nope, rope, v = get("qk_nope_head_dim"), get("qk_rope_head_dim"), get("v_head_dim")
    if (get("num_key_value_heads") or heads) != heads:
        raise ValueError(f"{model_type} config.json has num_key_value_heads={get('num_key_value_heads')} != "
                         f"num_attention_heads={heads}; MLA has one latent per token shared by all heads")
    if hf.get("qk_head_dim") not in (None, nope + rope):
        raise ValueError(f"{model_type} config.json has qk_head_dim={hf['qk_head_dim']} != qk_nope_head_dim + "
                         f"qk_rope_head_dim = {nope + rope}")
    if hf.get("head_dim") not in (None, rope):
        raise ValueError(f"{model_type} config.json has head_dim={hf['head_dim']}; transformers sets it to "
                         f"qk_rope_head_dim={rope}")
    method = get("topk_method")
    methods = ("noaux_tc",) if v3 else ("greedy", "group_limited_greedy")
    if method is not None and method not in methods:
        raise ValueError(f"{model_type} config.json has topk_method={method!r}; {model_type} routes with "
                         f"{' or '.join(methods)}")
    scoring = hf.get("scoring_func", "sigmoid" if v3 else "softmax")
    if scoring != ("sigmoid" if v3 else "softmax"):
        raise ValueError(f"{model_type} config.json has scoring_func={scoring!r}; transformers' {model_type} uses "
                         f"{'sigmoid' if v3 else 'softmax'} scores")
    if not v3 and get("norm_topk_prob"):
        raise ValueError("deepseek_v2 config.json has norm_topk_prob=true: transformers' V2 ignores it while "
                         "DeepSeek's own V2 code renormalises, so moejax cannot tell which model is meant")
    experts, shared = get("n_routed_experts"), get("n_shared_experts")
    if not shared:
        raise ValueError(f"{model_type} config.json has n_shared_experts={shared}; transformers' {model_type} "
                         "always adds the shared experts (expected >= 1)")
    groups = 1
    top_groups = 1
    if v3 or method == "group_limited_greedy":
        groups, top_groups = int(get("n_group") or 1), int(get("topk_group") or 1)
    theta, scaling = _yarn(hf, model_type)
    scale = None
    if scaling is not None and scaling.mscale_all_dim:
        scale = (nope + rope) ** -0.5 * Yarn.get_mscale(scaling.factor, scaling.mscale_all_dim) ** 2
    moe = MoeConfig(num_experts=experts, d_model=d, d_ff=get("moe_intermediate_size"), top_k=get("num_experts_per_tok"),
                    dropless=True, activation="swiglu", num_shared_experts=1,
                    shared_d_ff=shared * get("moe_intermediate_size"), routed_scale=float(get("routed_scaling_factor")),
                    num_expert_groups=groups, top_k_groups=top_groups, router_score="sigmoid" if v3 else "softmax",
                    selection_bias=v3, group_score="top2_sum" if v3 else "max",
                    weight_norm="topk" if v3 and get("norm_topk_prob") else "none")
    layers = get("num_hidden_layers")
    cfg = DecoderConfig(
        vocab_size=get("vocab_size"), d_model=d, num_layers=layers, num_heads=heads, num_kv_heads=heads,
        head_dim=rope, d_ff=get("intermediate_size"), activation="swiglu", norm_eps=float(get("rms_norm_eps")),
        rope_theta=theta, rope_scaling=scaling, attn_scale=scale, attention="mla", q_lora_rank=get("q_lora_rank"),
        kv_lora_rank=get("kv_lora_rank"), qk_nope_head_dim=nope, qk_rope_head_dim=rope, v_head_dim=v,
        first_dense_layers=min(int(get("first_k_dense_replace") or 0), layers),
        tie_embeddings=tied_head(bool(get("tie_word_embeddings")), weights, "lm_head.weight",
                                 "model.embed_tokens.weight"), moe=moe, moe_every=1)
    if cfg.first_dense_layers >= layers:
        raise ValueError(f"{model_type} config.json has first_k_dense_replace={get('first_k_dense_replace')} >= "
                         f"num_hidden_layers={layers}: no MoE layer left (convert a dense model instead)")
    return cfg.replace(**overrides).validate()


def _rope_perm(p: int, interleave: bool) -> np.ndarray:
    """Index map interleaved -> rotate-half over ``p`` RoPE dims (identity when not interleaved)."""
    return np.concatenate([np.arange(0, p, 2), np.arange(1, p, 2)]) if interleave else np.arange(p)


def _block(cfg: DecoderConfig, i: int) -> tuple[str, int]:
    """(moejax block path prefix, index on the stack's layer axis) of HF layer ``i``."""
    k = cfg.first_dense_layers
    if i < k:
        return "prefix/blocks/0/", i
    return f"stack/blocks/{(i - k) % cfg.period}/", (i - k) // cfg.period


def _names(cfg: DecoderConfig, i: int, interleave: bool) -> list[tuple[str, str | list[str], object, object]]:
    """``[(path in the block, HF name(s), HF -> moejax, moejax -> HF)]`` of layer ``i``."""
    d, h = cfg.d_model, cfg.num_heads
    n, p, y, r = cfg.qk_nope_head_dim, cfg.qk_rope_head_dim, cfg.v_head_dim, cfg.kv_lora_rank
    perm = _rope_perm(p, interleave)
    inv = np.argsort(perm)
    qcols = np.concatenate([np.arange(n), n + perm])                   # within one head's n + p
    qinv = np.concatenate([np.arange(n), n + inv])
    kvcols = np.concatenate([np.arange(r), r + perm])
    kvinv = np.concatenate([np.arange(r), r + inv])
    a = f"model.layers.{i}.self_attn."
    rows = [("attn_norm/scale", f"model.layers.{i}.input_layernorm.weight", None, None),
            ("ffn_norm/scale", f"model.layers.{i}.post_attention_layernorm.weight", None, None),
            ("attn/kv_a", a + "kv_a_proj_with_mqa.weight", lambda w: w.T[:, kvcols], lambda w: w[:, kvinv].T),
            ("attn/kv_norm/scale", a + "kv_a_layernorm.weight", None, None),
            ("attn/kv_b", a + "kv_b_proj.weight", lambda w: w.T.reshape(r, h, n + y),
             lambda w: w.reshape(r, h * (n + y)).T),
            ("attn/o", a + "o_proj.weight", lambda w: w.T.reshape(h, y, d), lambda w: w.reshape(h * y, d).T)]
    if cfg.q_lora_rank is None:
        rows.append(("attn/q", a + "q_proj.weight", lambda w: w.T.reshape(d, h, n + p)[..., qcols],
                     lambda w: w[..., qinv].reshape(d, h * (n + p)).T))
    else:
        q = cfg.q_lora_rank
        rows += [("attn/q_a", a + "q_a_proj.weight", lambda w: w.T, lambda w: w.T),
                 ("attn/q_norm/scale", a + "q_a_layernorm.weight", None, None),
                 ("attn/q_b", a + "q_b_proj.weight", lambda w: w.T.reshape(q, h, n + p)[..., qcols],
                  lambda w: w[..., qinv].reshape(q, h * (n + p)).T)]
    m = f"model.layers.{i}.mlp."
    t = (lambda w: w.T, lambda w: w.T)
    if not cfg.is_sparse(i):
        rows += [(f"ffn/{k}", name, *t) for k, (name, _) in dense_mlp_map(i).items()]
        return rows
    rows.append(("ffn/router/kernel", m + "gate.weight", *t))
    if cfg.moe.selection_bias:
        rows.append(("ffn/router/selection_bias", m + "gate.e_score_correction_bias", None, None))
    for ours, theirs in (("wi_0", "gate_proj"), ("wi_1", "up_proj"), ("wo", "down_proj")):
        rows.append((f"ffn/experts/{ours}", [f"{m}experts.{e}.{theirs}.weight" for e in range(cfg.moe.num_experts)],
                     *t))
        rows.append((f"ffn/shared/{ours}", f"{m}shared_experts.{theirs}.weight", *t))
    return rows


def hf_to_state(cfg: DecoderConfig, weights, hf: dict | None = None) -> dict[str, Source]:
    """Flat ``{moejax param path: lazy source}`` for a Decoder built from ``cfg``; ``hf`` (the
    config.json) says whether RoPE pairs are interleaved (default: yes, as every released model)."""
    r = WeightReader(weights)
    out = read_model_level(r, cfg)
    interleave = True if hf is None else interleaved(hf)
    mtp = [] if hf is None else [n for n in weights if _layer_of(n) is not None and _layer_of(n) >= cfg.num_layers]
    if mtp and not hf.get("num_nextn_predict_layers"):
        raise ValueError(f"weights of layers >= num_hidden_layers={cfg.num_layers} ({mtp[0]}, ...) but "
                         "num_nextn_predict_layers is not set")
    r.alias(*mtp)           # DeepSeek-V3's multi-token-prediction layer: not part of the model (transformers too)
    for i in range(cfg.num_layers):
        block, _ = _block(cfg, i)
        for path, name, fn, _ in _names(cfg, i, interleave):
            fn = fn or (lambda w: w)
            r.push(block + path, r.get_stacked(name, fn) if isinstance(name, list) else r.get(name, fn))
    return r.finish(out)


def _layer_of(name: str) -> int | None:
    parts = name.split(".")
    if len(parts) > 2 and parts[0] == "model" and parts[1] == "layers" and parts[2].isdigit():
        return int(parts[2])
    return None


def from_hf(path: str, **kw) -> tuple[Decoder, DecoderConfig]:
    """Build a :class:`Decoder` from a HF DeepSeek-V2 / V3 ``save_pretrained`` directory, streaming
    (see :func:`moejax.convert.load.build_from_hf` for ``mesh``, ``dtype``)."""
    hf = read_hf_config(path)
    return build_from_hf(path, config_from_hf, lambda cfg, weights: hf_to_state(cfg, weights, hf), **kw)


def hf_family(cfg: DecoderConfig) -> str:
    """``deepseek_v3`` (sigmoid scores with a selection bias) or ``deepseek_v2`` (softmax), or a
    ValueError naming what neither represents."""
    moe = cfg.moe
    if cfg.attention != "mla" or moe is None:
        raise ValueError("only an MLA decoder with MoE layers exports as DeepSeek")
    v3 = moe.router_score == "sigmoid"
    problems = []
    if (cfg.activation, moe.activation) != ("swiglu", "swiglu") or not moe.dropless or moe.router != "top_k":
        problems.append("dropless top_k routing over SwiGLU experts")
    if moe.num_shared_experts != 1 or moe.shared_gate or (moe.shared_d_ff or 0) % moe.d_ff:
        problems.append("one ungated shared MLP of a multiple of the experts' width")
    if cfg.period != 1 or cfg.moe_extra_mlp or moe.router_bias or moe.use_bias or moe.jitter_eps:
        problems.append("every layer after the dense prefix sparse, no extra MLP, no router / expert biases")
    if v3 and (not moe.selection_bias or moe.group_score != "top2_sum" or moe.weight_norm == "kept"):
        problems.append("V3: a selection bias, groups scored by top2_sum, weight_norm 'topk' or 'none'")
    if not v3 and (moe.selection_bias or moe.group_score != "max" or moe.weight_norm != "none"):
        problems.append("V2: no selection bias, groups scored by max, weight_norm 'none'")
    if cfg.rope_scaling is not None and not isinstance(cfg.rope_scaling, Yarn):
        raise ValueError(f"cannot export as {'deepseek_v3' if v3 else 'deepseek_v2'}: it needs YaRN or plain RoPE")
    want = None
    if cfg.rope_scaling is not None and cfg.rope_scaling.mscale_all_dim:
        want = (cfg.qk_nope_head_dim + cfg.qk_rope_head_dim) ** -0.5 * Yarn.get_mscale(
            cfg.rope_scaling.factor, cfg.rope_scaling.mscale_all_dim) ** 2
    if not (cfg.attn_scale == want or (want is not None and cfg.attn_scale is not None
                                       and abs(cfg.attn_scale - want) < 1e-9 * want)):
        problems.append(f"the attention scale DeepSeek derives from the YaRN config ({want or 'default'})")
    if problems:
        raise ValueError(f"cannot export as {'deepseek_v3' if v3 else 'deepseek_v2'}: it needs {'; '.join(problems)}")
    return "deepseek_v3" if v3 else "deepseek_v2"


def export_plan(cfg: DecoderConfig) -> list[ExportRow]:
    """``[(HF name, moejax param path, layer or None, fn)]`` in the order the tensors are written
    (RoPE pairs interleaved, as transformers' V2 and default V3 read them)."""
    plan = model_level_export(cfg)
    for i in range(cfg.num_layers):
        block, layer = _block(cfg, i)
        for path, name, _, back in _names(cfg, i, True):
            back = back or (lambda w: w)
            if isinstance(name, list):
                plan += [(nm, block + path, layer, lambda w, e=e, back=back: back(w[e])) for e, nm in enumerate(name)]
            else:
                plan.append((name, block + path, layer, back))
    return plan


def hf_config(cfg: DecoderConfig, dtype) -> dict:
    """The ``config.json`` of :func:`to_hf` (transformers 4.x layout, every field written)."""
    family, moe = hf_family(cfg), cfg.moe
    arch = {"deepseek_v2": "DeepseekV2ForCausalLM", "deepseek_v3": "DeepseekV3ForCausalLM"}[family]
    hf = {"model_type": family, "architectures": [arch], "vocab_size": cfg.vocab_size, "hidden_size": cfg.d_model,
          "intermediate_size": cfg.d_ff, "moe_intermediate_size": moe.d_ff, "num_hidden_layers": cfg.num_layers,
          "num_attention_heads": cfg.num_heads, "num_key_value_heads": cfg.num_heads,
          "n_shared_experts": (moe.shared_d_ff or moe.d_ff) // moe.d_ff, "n_routed_experts": moe.num_experts,
          "routed_scaling_factor": moe.routed_scale, "kv_lora_rank": cfg.kv_lora_rank, "q_lora_rank": cfg.q_lora_rank,
          "qk_rope_head_dim": cfg.qk_rope_head_dim, "v_head_dim": cfg.v_head_dim,
          "qk_nope_head_dim": cfg.qk_nope_head_dim, "n_group": moe.num_expert_groups, "topk_group": moe.top_k_groups,
          "num_experts_per_tok": moe.top_k, "first_k_dense_replace": cfg.first_dense_layers,
          "norm_topk_prob": moe.weight_norm == "topk", "hidden_act": "silu", "rms_norm_eps": cfg.norm_eps,
          "rope_theta": cfg.rope_theta, "tie_word_embeddings": cfg.tie_embeddings, "attention_bias": False,
          "dtype": np.dtype(dtype).name}
    if family == "deepseek_v2":
        hf["topk_method"] = "group_limited_greedy" if moe.num_expert_groups > 1 else "greedy"
    else:
        hf["rope_interleave"] = True
    y = cfg.rope_scaling
    hf["rope_scaling"] = None if y is None else {
        "type": "yarn", "rope_type": "yarn", "factor": y.factor,
        "original_max_position_embeddings": y.original_max_position,
        "beta_fast": y.beta_fast, "beta_slow": y.beta_slow, "mscale": y.mscale, "mscale_all_dim": y.mscale_all_dim,
        **({} if y.truncate else {"truncate": False}),
        **({} if y.attention_factor is None else {"attention_factor": y.attention_factor})}
    return hf


def check_export(cfg: DecoderConfig) -> None:
    """ValueError (naming the fields) unless this family's config.json represents ``cfg``."""
    hf_family(cfg)
    check_round_trip(cfg, config_from_hf(hf_config(cfg, np.float32)), "DeepSeek")


def to_hf(model: Decoder, path: str, *, dtype=None, max_shard_bytes: int = MAX_SHARD_BYTES) -> None:
    """Export a DeepSeek-V2 / V3-shaped :class:`Decoder` (:func:`hf_family`) to a HF
    ``save_pretrained`` directory, streaming one parameter (one layer of it) at a time."""
    cfg = model.cfg
    hf_family(cfg)
    write_decoder(model, path, export_plan(cfg), lambda dt: hf_config(cfg, dt), dtype=dtype,
                  max_shard_bytes=max_shard_bytes)
