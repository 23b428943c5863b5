"""Hugging Face gpt-oss (``gpt_oss``: gpt-oss-20b, gpt-oss-120b) <-> moejax Decoder.

gpt-oss: pre-norm blocks with GQA attention biased on q, k, v and o, a learned per-head
attention sink (``self_attn.sinks``: an extra logit with no value), layers alternating a sliding
window (``layer_types``: ``sliding_attention`` / ``full_attention``) -> moejax ``window_pattern``,
YaRN RoPE (``truncate: false``); every layer an MoE of ``num_local_experts`` experts, a biased
router whose top-k logits are soft-maxed (= softmax over all, renormalised over the k:
``weight_norm='topk'``), and gpt-oss's clamped SwiGLU experts with biases
(``activation='clamped-swiglu'``, limit 7 and alpha 1.702: transformers 4.x hard-codes them, 5.x
writes them as ``swiglu_limit`` / ``swiglu_alpha``; other values are refused by name).

Expert weights: ``mlp.experts.gate_up_proj [E, d, 2I]`` (in x out) with the gate and up columns
**interleaved** (gate = ``0::2``, up = ``1::2``), ``gate_up_proj_bias [E, 2I]``,
``down_proj [E, I, d]``, ``down_proj_bias [E, d]``; or, in the released checkpoints, MXFP4:
``gate_up_proj_blocks [E, 2I, d/32, 16]`` uint8 and ``gate_up_proj_scales [E, 2I, d/32]`` uint8
(likewise ``down_proj_*`` over ``[E, d, I]``), dequantised on import (:func:`dequantize_mxfp4`).
Router: ``mlp.router.{weight [E, d], bias [E]}``. moejax computes the router logits in float32
(transformers: in the model dtype).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np

from moejax.convert.decoder_io import (
    BLOCK,
    ExportRow,
    attention_export,
    attention_map,
    common_hf_config,
    model_level_export,
    read_model_level,
    write_decoder,
)
from moejax.convert.export_check import check_round_trip
from moejax.convert.fields import DECODER_INERT, TRAINING_ONLY, FieldTable, rope_parameters, yarn
from moejax.convert.load import build_from_hf
from moejax.convert.mapping import Leaf, Source, WeightReader, tied_head
from moejax.convert.safetensors_io import MAX_SHARD_BYTES
from moejax.models import Decoder, DecoderConfig
from moejax.models.layers import Yarn
from moejax.moe import MoeConfig

#: FP4 E2M1 code -> value (bit 3 is the sign)
FP4_VALUES = np.array([0.0, 0.5, 1.0, 1.5, 2.0, 3.0, 4.0, 6.0, -0.0, -0.5, -1.0, -1.5, -2.0, -3.0, -4.0, -6.0],
                      np.float32)

_DEFAULTS = {"num_hidden_layers": 36, "num_local_experts": 128, "vocab_size": 201088, "hidden_size": 2880,
             "intermediate_size": 2880, "head_dim": 64, "num_attention_heads": 64, "num_key_value_heads": 8,
             "sliding_window": 128, "rope_theta": 150000.0, "tie_word_embeddings": False, "rms_norm_eps": 1e-5,
             "num_experts_per_tok": 4, "max_position_embeddings": 131072}

FIELDS = FieldTable(
    "gpt_oss",
    honoured=frozenset({
        "vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads",
        "num_key_value_heads", "head_dim", "num_local_experts", "num_experts_per_tok", "sliding_window",
        "layer_types", "rms_norm_eps", "rope_theta", "rope_scaling", "rope_parameters", "tie_word_embeddings",
        "quantization_config",
        "experts_per_token"}),            # OpenAI's name for the top-k: must agree with num_experts_per_tok
    inert={**DECODER_INERT, "router_aux_loss_coef": TRAINING_ONLY,
           "max_position_embeddings": "read only as YaRN's original length when rope_scaling leaves it out",
           "initial_context_length": "OpenAI's pre-YaRN context length; transformers reads YaRN's "
                                     "original_max_position_embeddings from the rope settings instead"},
    fixed={"hidden_act": ("silu",), "attention_bias": (True, None), "swiglu_limit": (7.0, None),
           "swiglu_alpha": (1.702, None)},
)


def dequantize_mxfp4(blocks: np.ndarray, scales: np.ndarray) -> np.ndarray:
    """MXFP4 ``blocks [..., G, 16]`` uint8 (two FP4 E2M1 codes a byte, the low nibble first) and
    E8M0 ``scales [..., G]`` (``2^(s - 127)`` for each group of 32 values) -> ``[..., G * 32]``
    float32."""
    blocks, scales = np.asarray(blocks, np.uint8), np.asarray(scales, np.uint8)
    vals = np.empty(blocks.shape[:-1] + (32,), np.float32)
    vals[..., 0::2] = FP4_VALUES[blocks & 0x0F]
    vals[..., 1::2] = FP4_VALUES[blocks >> 4]
    vals *= np.ldexp(np.float32(1.0), scales.astype(np.int32) - 127)[..., None]
    return vals.reshape(blocks.shape[:-2] + (blocks.shape[-2] * 32,))


def _get(hf, key):
    return hf[key] if key in hf else _DEFAULTS.get(key)


def _pattern(hf: dict, layers: int, window: int) -> tuple:
    types = hf.get("layer_types") or ["sliding_attention" if (i + 1) % 2 else "full_attention" for i in range(layers)]
    bad = sorted({t for t in types} - {"sliding_attention", "full_attention"})
    if bad or len(types) != layers:
        raise ValueError(f"gpt_oss config.json has layer_types {bad or types}; expected {layers} entries of "
                         "'sliding_attention' / 'full_attention'")
    for p in range(1, layers + 1):
        if layers % p == 0 and all(types[i] == types[i % p] for i in range(layers)):
            return tuple(window if t == "sliding_attention" else None for t in types[:p])
    raise AssertionError("unreachable")


def config_from_hf(hf: dict, *, ignore_fields=(), weights=None, **overrides) -> DecoderConfig:
    """Map a gpt-oss ``config.json`` (transformers 4.x or 5.x layout) to a :class:`DecoderConfig`;
    every field is honoured, inert with a reason, or refused by name (:data:`FIELDS`). The layer
    pattern must repeat with a period dividing the depth (moejax scans whole periods)."""
    if hf.get("model_type") != "gpt_oss":
        raise ValueError(f"config.json has model_type={hf.get('model_type')!r}; this converter reads gpt_oss")
    FIELDS.check(hf, ignore_fields)
    q = hf.get("quantization_config")
    if q is not None and (q.get("quant_method") != "mxfp4"):
        raise ValueError(f"gpt_oss config.json has quantization_config.quant_method={q.get('quant_method')!r}; "
                         "moejax dequantises 'mxfp4' experts only")
    get = lambda k: _get(hf, k)  # noqa: E731
    d, heads, layers = get("hidden_size"), get("num_attention_heads"), get("num_hidden_layers")
    theta, params = rope_parameters(hf, _DEFAULTS["rope_theta"], "gpt_oss", allow=("yarn",))
    scaling = None if params is None else yarn(params, hf, "gpt_oss")
    window = get("sliding_window")
    pattern = _pattern(hf, layers, window)
    if all(w is None for w in pattern):
        pattern = None
    e, k = get("num_local_experts"), get("num_experts_per_tok")
    if hf.get("experts_per_token", k) != k:
        raise ValueError(f"gpt_oss config.json has experts_per_token={hf['experts_per_token']!r} but "
                         f"num_experts_per_tok={k!r}; transformers routes to num_experts_per_tok: make them agree")
    moe = MoeConfig(num_experts=e, d_model=d, d_ff=get("intermediate_size"), top_k=k,
                    weight_norm="topk", router_bias=True, use_bias=True, dropless=True, activation="clamped-swiglu",
                    balance_loss_scope="global")
    cfg = DecoderConfig(
        vocab_size=get("vocab_size"), d_model=d, num_layers=layers, num_heads=heads,
        num_kv_heads=get("num_key_value_heads") or heads, head_dim=get("head_dim") or d // heads,
        d_ff=get("intermediate_size"), activation="swiglu", norm_eps=float(get("rms_norm_eps")), rope_theta=theta,
        rope_scaling=scaling, attention_bias="all", attention_sinks=True, window_pattern=pattern,
        tie_embeddings=tied_head(bool(get("tie_word_embeddings")), weights, "lm_head.weight",
                                 "model.embed_tokens.weight"), moe=moe, moe_every=1)
    return cfg.replace(**overrides).validate()


def _experts(r: WeightReader, p: str, name: str) -> Leaf | None:
    """``mlp.experts.<name>`` in the in x out layout: stored plain, or MXFP4 blocks + scales."""
    if r.has(p + name) or not r.has(p + name + "_blocks"):
        return r.get(p + name)
    blocks, scales = p + name + "_blocks", p + name + "_scales"
    if not r.has(scales):
        return r.get(scales)                          # recorded missing
    r.alias(blocks, scales)
    w = r.weights
    shape = (w.shape(blocks) if hasattr(w, "shape") else np.shape(w[blocks]))
    out = tuple(shape[:-2]) + (shape[-2] * 32,)       # [E, rows, in]
    return Leaf(lambda: np.swapaxes(dequantize_mxfp4(w[blocks], w[scales]), -1, -2), lambda a: a,
                out[:-2] + (out[-1], out[-2]), np.float32, blocks)


def hf_to_state(cfg: DecoderConfig, weights) -> dict[str, Source]:
    """Flat ``{moejax param path: lazy source}`` for a Decoder built from ``cfg``."""
    r = WeightReader(weights)
    out = read_model_level(r, cfg)
    for i in range(cfg.num_layers):
        block = f"stack/blocks/{i % cfg.period}/"
        for path, (name, fn) in attention_map(cfg, i).items():
            r.push(block + path, r.get(name, fn))
        r.push(block + "attn/sinks", r.get(f"model.layers.{i}.self_attn.sinks"))
        p = f"model.layers.{i}.mlp."
        r.push(block + "ffn/router/kernel", r.get(p + "router.weight", lambda w: w.T))
        r.push(block + "ffn/router/bias", r.get(p + "router.bias"))
        gate_up, gate_up_b = _experts(r, p + "experts.", "gate_up_proj"), r.get(p + "experts.gate_up_proj_bias")
        down = _experts(r, p + "experts.", "down_proj")
        for ours, src, fn in (("wi_0", gate_up, lambda w: w[..., 0::2]), ("wi_1", gate_up, lambda w: w[..., 1::2]),
                              ("bi", gate_up_b, lambda w: w[..., 0::2]), ("bi_1", gate_up_b, lambda w: w[..., 1::2]),
                              ("wo", down, None), ("bo", r.get(p + "experts.down_proj_bias"), None)):
            r.push(block + "ffn/experts/" + ours, src if src is None or fn is None else _View(src, fn))
    return r.finish(out)


class _View:
    """A source seen through ``fn`` (the gate / up halves of the interleaved ``gate_up``)."""

    def __init__(self, src: Source, fn):
        self.src, self.fn = src, fn
        out = jax.eval_shape(fn, jax.ShapeDtypeStruct(src.shape, src.dtype))
        self.shape, self.dtype = tuple(out.shape), np.dtype(out.dtype)

    def read(self, index: tuple = (), dtype=None) -> np.ndarray:
        full = np.asarray(self.fn(self.src.read()))
        return np.array(full[tuple(index)], dtype=dtype or self.dtype, copy=True)


def from_hf(path: str, **kw) -> tuple[Decoder, DecoderConfig]:
    """Build a :class:`Decoder` from a HF gpt-oss ``save_pretrained`` directory (plain or MXFP4
    experts), streaming (see :func:`moejax.convert.load.build_from_hf` for ``mesh``, ``dtype``)."""
    return build_from_hf(path, config_from_hf, hf_to_state, **kw)


def hf_family(cfg: DecoderConfig) -> str:
    """``gpt_oss`` when ``cfg`` is gpt-oss-shaped, else a ValueError naming what is not."""
    moe = cfg.moe
    problems = []
    if moe is None or moe.activation != "clamped-swiglu" or not (moe.use_bias and moe.router_bias):
        problems.append("MoE layers of biased clamped-SwiGLU experts with a biased router")
    elif moe.weight_norm != "topk" or not moe.dropless or moe.router != "top_k" or moe.num_shared_experts:
        problems.append("dropless top_k routing renormalised over the k, no shared experts")
    if cfg.attention_bias != "all" or not cfg.attention_sinks or cfg.attention != "mha" or cfg.qk_norm != "none":
        problems.append("q/k/v/o biases and attention sinks")
    windows = {w for w in (cfg.window_pattern or ()) if w is not None}
    if cfg.sliding_window is not None or len(windows) > 1 or cfg.period != (len(cfg.window_pattern or ()) or 1):
        problems.append("one sliding window in a window_pattern, every layer sparse")
    if cfg.attn_scale is not None or cfg.first_dense_layers:
        problems.append("the default attention scale and no dense first layers")
    if cfg.rope_scaling is not None and not isinstance(cfg.rope_scaling, Yarn):
        problems.append("YaRN or plain RoPE")
    if problems:
        raise ValueError(f"cannot export as gpt_oss: it needs {'; '.join(problems)}")
    return "gpt_oss"


def export_plan(cfg: DecoderConfig) -> list[ExportRow]:
    """``[(HF name, moejax param path, layer or None, fn)]`` (plain, not MXFP4, expert tensors)."""
    plan = model_level_export(cfg)
    for i in range(cfg.num_layers):
        block, period = f"stack/blocks/{i % cfg.period}/", i // cfg.period
        plan += [(name, block + path[len(BLOCK):], period, fn) for name, path, _, fn in attention_export(cfg, i)]
        p = f"model.layers.{i}."
        plan += [(p + "self_attn.sinks", block + "attn/sinks", period, lambda w: w),
                 (p + "mlp.router.weight", block + "ffn/router/kernel", period, lambda w: w.T),
                 (p + "mlp.router.bias", block + "ffn/router/bias", period, lambda w: w)]
        for name, (a, b) in (("gate_up_proj", ("wi_0", "wi_1")), ("gate_up_proj_bias", ("bi", "bi_1"))):
            plan.append((f"{p}mlp.experts.{name}", (block + "ffn/experts/" + a, block + "ffn/experts/" + b), period,
                         _interleave))
        plan += [(p + "mlp.experts.down_proj", block + "ffn/experts/wo", period, lambda w: w),
                 (p + "mlp.experts.down_proj_bias", block + "ffn/experts/bo", period, lambda w: w)]
    return plan


def _interleave(gate, up):
    """gate / up ``[..., f]`` -> the interleaved ``[..., 2f]`` (gate at ``0::2``, up at ``1::2``)."""
    return jnp.stack([gate, up], axis=-1).reshape(gate.shape[:-1] + (2 * gate.shape[-1],))


def hf_config(cfg: DecoderConfig, dtype) -> dict:
    """The ``config.json`` of :func:`to_hf` (transformers 4.x layout)."""
    hf_family(cfg)
    moe, pat = cfg.moe, cfg.window_pattern or (None,)
    # transformers builds a sliding mask whatever the layer types: a window it never uses is still written
    window = next((w for w in pat if w is not None), 128)
    hf = {"model_type": "gpt_oss", "architectures": ["GptOssForCausalLM"], **common_hf_config(cfg, dtype),
          "intermediate_size": moe.d_ff, "num_local_experts": moe.num_experts, "num_experts_per_tok": moe.top_k,
          "sliding_window": window, "attention_bias": True, "output_router_logits": False,
          "layer_types": ["sliding_attention" if pat[i % len(pat)] is not None else "full_attention"
                          for i in range(cfg.num_layers)]}
    y = cfg.rope_scaling
    hf["rope_scaling"] = None if y is None else {
        "rope_type": "yarn", "factor": y.factor, "beta_fast": y.beta_fast, "beta_slow": y.beta_slow,
        "truncate": y.truncate, "original_max_position_embeddings": y.original_max_position,
        **({"mscale": y.mscale} if y.mscale else {}),
        **({"mscale_all_dim": y.mscale_all_dim} if y.mscale_all_dim else {}),
        **({} if y.attention_factor is None else {"attention_factor": y.attention_factor})}
    return hf


def check_export(cfg: DecoderConfig) -> None:
    """ValueError (naming the fields) unless this family's config.json represents ``cfg``."""
    hf_family(cfg)
    check_round_trip(cfg, config_from_hf(hf_config(cfg, np.float32)), "gpt-oss")


def to_hf(model: Decoder, path: str, *, dtype=None, max_shard_bytes: int = MAX_SHARD_BYTES) -> None:
    """Export a gpt-oss-shaped :class:`Decoder` to a HF ``save_pretrained`` directory (plain expert
    tensors), streaming one parameter (one layer of it) at a time."""
    cfg = model.cfg
    hf_family(cfg)
    write_decoder(model, path, export_plan(cfg), lambda dt: hf_config(cfg, dt), dtype=dtype,
                  max_shard_bytes=max_shard_bytes)
