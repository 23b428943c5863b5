"""Hugging Face Switch Transformers and T5 (v1.0 dense, v1.1 gated) <-> moejax EncoderDecoder weights.

HF names (transformers 4.x): ``shared.weight``; ``{encoder,decoder}.block.{i}.layer.0.SelfAttention.
{q,k,v,o}.weight``; ``encoder.block.0.layer.0.SelfAttention.relative_attention_bias.weight [32, h]``;
``layer.{0,1,2}.layer_norm.weight``; decoder cross-attention ``layer.1.EncDecAttention.*``; FFN
``layer.{1|2}.mlp.{wi,wo}.weight`` (Switch's dense layers; T5's are ``layer.{1|2}.DenseReluDense.
{wi | wi_0, wi_1, wo}.weight``) or ``mlp.router.classifier.weight [E, d]`` and
``mlp.experts.expert_{j}.{wi,wo}.weight`` (sparse); ``{encoder,decoder}.final_layer_norm.weight``;
``lm_head.weight``. HF routes each sequence as its own group with a fixed ``expert_capacity``.

Export (:func:`to_hf`) writes the same names (``t5`` for a dense model, ``switch_transformers``
with experts), streaming, and refuses a model whose ``config.json`` would not read back as the
same model (:func:`moejax.convert.export_check.check_round_trip`).
"""

from __future__ import annotations

import numpy as np

from moejax.convert.decoder_io import ExportRow, write_decoder
from moejax.convert.encdec_io import head_export
from moejax.convert.export_check import check_round_trip
from moejax.convert.fields import TRAINING_ONLY, FieldTable
from moejax.convert.load import build_from_hf
from moejax.convert.mapping import Source, WeightReader, tied_head
from moejax.convert.safetensors_io import MAX_SHARD_BYTES
from moejax.models.config import EncDecConfig
from moejax.models.encdec import EncoderDecoder
from moejax.moe import MoeConfig
from moejax.moe.experts import activation_fn

_ACTS = {"relu": "relu", "gelu_new": "gelu", "gelu": "gelu_exact", "gelu_pytorch_tanh": "gelu", "silu": "silu",
         "swish": "silu"}
_GATED = {"gelu": "gated-gelu", "gelu_exact": "gated-gelu_exact", "silu": "swiglu"}

FIELDS = FieldTable(
    "t5/switch_transformers",
    honoured=frozenset({
        "vocab_size", "d_model", "d_kv", "d_ff", "num_layers", "num_decoder_layers", "num_heads",
        "relative_attention_num_buckets", "relative_attention_max_distance", "layer_norm_epsilon",
        "feed_forward_proj", "dense_act_fn", "is_gated_act", "tie_word_embeddings", "scale_decoder_outputs",
        "pad_token_id", "decoder_start_token_id", "num_experts", "expert_capacity", "num_sparse_encoder_layers",
        "num_sparse_decoder_layers", "encoder_sparse_step", "decoder_sparse_step", "router_bias",
        "router_jitter_noise"}),
    inert={
        "dropout_rate": TRAINING_ONLY, "classifier_dropout": TRAINING_ONLY, "router_z_loss_coef": TRAINING_ONLY,
        "router_aux_loss_coef": TRAINING_ONLY, "add_router_probs": "an output option",
        "router_ignore_padding_tokens": "transformers' Switch router never reads it",
        "n_positions": "T5's relative positions have no table of absolute positions",
    },
    fixed={"router_dtype": ("float32",), "num_selected_experts": (1,), "router_type": ("tokens_masked",),
           "batch_prioritized_routing": (False,)},
)


def _activation(hf: dict, model_type: str) -> tuple[str, bool]:
    """(moejax activation of the FFNs, gated?) from ``feed_forward_proj`` / ``dense_act_fn`` /
    ``is_gated_act`` as transformers derives them (``gated-gelu`` is the tanh GeLU, ``gelu_new``)."""
    proj = hf.get("feed_forward_proj")
    if proj is not None:
        parts = proj.split("-")
        if len(parts) > 2 or (len(parts) == 2 and parts[0] != "gated"):
            raise ValueError(f"{model_type} config.json has feed_forward_proj={proj!r}; expected 'ACT' or 'gated-ACT'")
        gated, act = len(parts) == 2, parts[-1]
        act = "gelu_new" if proj == "gated-gelu" else act
        if "dense_act_fn" in hf and hf["dense_act_fn"] != act:
            raise ValueError(f"{model_type} config.json has feed_forward_proj={proj!r} but dense_act_fn="
                             f"{hf['dense_act_fn']!r} (transformers derives {act!r})")
        if "is_gated_act" in hf and bool(hf["is_gated_act"]) != gated:
            raise ValueError(f"{model_type} config.json has feed_forward_proj={proj!r} but is_gated_act="
                             f"{hf['is_gated_act']!r}")
    else:
        act, gated = hf.get("dense_act_fn", "relu"), bool(hf.get("is_gated_act", False))
    if act not in _ACTS:
        raise ValueError(f"{model_type} config.json uses activation {act!r}; supported: {', '.join(_ACTS)}")
    ours = _ACTS[act]
    if gated:
        if model_type == "switch_transformers":
            raise ValueError("switch_transformers config.json asks for a gated FFN (feed_forward_proj / is_gated_act), "
                             "which transformers' Switch Transformers does not implement")
        if ours not in _GATED:
            raise ValueError(f"{model_type} config.json has a gated {act!r} FFN; moejax has gated gelu, gelu_new, silu")
        ours = _GATED[ours]
    return ours, gated


def config_from_hf(hf: dict, *, ignore_fields=(), weights=None, **overrides) -> EncDecConfig:
    """Map a ``switch_transformers`` or ``t5`` (v1.0 dense ReLU, v1.1 / gated GeLU, ...) ``config.json``
    (transformers 4.x or 5.x layout) to an :class:`EncDecConfig`; every field is honoured or refused
    by name (:data:`FIELDS`). ``weights`` (optional): a stored ``lm_head`` differing from the
    embedding unties them (transformers 5 writes ``tie_word_embeddings: true`` for every T5)."""
    mt = hf.get("model_type")
    if mt not in ("switch_transformers", "t5"):
        raise ValueError(f"config.json has model_type={mt!r}; this converter reads switch_transformers, t5")
    FIELDS.check(hf, ignore_fields)
    if mt == "t5":
        moe_keys = sorted(k for k in hf if k in ("num_experts", "expert_capacity", "num_sparse_encoder_layers",
                                                  "num_sparse_decoder_layers", "router_bias", "router_jitter_noise"))
        if moe_keys:
            raise ValueError(f"t5 config.json has MoE fields {moe_keys}; a t5 model is dense")
    act, _ = _activation(hf, mt)
    d = hf["d_model"]
    n_enc = hf["num_layers"]
    n_dec = hf.get("num_decoder_layers") or n_enc
    moe = None
    enc_step = dec_step = 1
    if mt == "switch_transformers":
        sp_enc, sp_dec = hf.get("num_sparse_encoder_layers", 3), hf.get("num_sparse_decoder_layers", 3)
        if (sp_enc > 0) != (sp_dec > 0):
            raise ValueError("moejax needs sparse layers in both stacks or in neither "
                             f"(num_sparse_encoder_layers={sp_enc}, num_sparse_decoder_layers={sp_dec})")
        if sp_enc:
            enc_step, dec_step = n_enc // sp_enc, n_dec // sp_dec
            for key, step in (("encoder_sparse_step", enc_step), ("decoder_sparse_step", dec_step)):
                if key in hf and hf[key] != step:
                    raise ValueError(f"switch_transformers config.json has {key}={hf[key]} but the sparse layer "
                                     f"counts give {step} (transformers recomputes it from num_sparse_*_layers)")
            moe = MoeConfig(num_experts=hf.get("num_experts", 8), d_model=d, d_ff=hf["d_ff"], top_k=1,
                            weight_norm="none", expert_capacity=hf.get("expert_capacity", 64),
                            sequence_groups=True, activation=act, router_bias=bool(hf.get("router_bias", False)),
                            jitter_eps=float(hf.get("router_jitter_noise", 0.01) or 0.0))
    # 4.x: tied => lm_head is the embedding and the decoder output is scaled by d_model**-0.5;
    # 5.x writes tie_word_embeddings=True always and the scaling as scale_decoder_outputs
    config_tied = bool(hf.get("tie_word_embeddings", True))
    scale = bool(hf.get("scale_decoder_outputs", config_tied))
    tied = tied_head(config_tied, weights, "lm_head.weight", "shared.weight")
    if scale and not tied:
        raise ValueError(f"{mt} checkpoint has its own lm_head.weight but scales the decoder output by "
                         "d_model**-0.5 (scale_decoder_outputs / tie_word_embeddings); moejax scales only tied heads")
    cfg = EncDecConfig(
        vocab_size=hf["vocab_size"], d_model=d, num_encoder_layers=n_enc, num_decoder_layers=n_dec,
        num_heads=hf["num_heads"], head_dim=hf["d_kv"], d_ff=hf["d_ff"], activation=act,
        norm_eps=hf.get("layer_norm_epsilon", 1e-6), relpos_buckets=hf.get("relative_attention_num_buckets", 32),
        relpos_max_distance=hf.get("relative_attention_max_distance", 128),
        tie_embeddings=tied, scale_tied_logits=scale, moe=moe,
        encoder_moe_every=enc_step, decoder_moe_every=dec_step, moe_offset=1,
        pad_id=hf.get("pad_token_id", 0), decoder_start_id=hf.get("decoder_start_token_id") or 0,
    )
    return cfg.replace(**overrides).validate()


def hf_to_state(cfg: EncDecConfig, weights) -> dict[str, Source]:
    """Flat ``{moejax path: lazy source}`` from ``{HF name: array}``; ValueError lists missing and
    unexpected HF weights. T5 names the dense FFN ``layer.N.DenseReluDense.{wi | wi_0, wi_1, wo}``,
    Switch ``layer.N.mlp.{wi, wo}``."""
    r = WeightReader(weights)
    get = r.get
    h, x, d = cfg.num_heads, cfg.head_dim, cfg.d_model
    # transformers' T5 names its (dense) FFN DenseReluDense, Switch (also its dense layers) mlp
    t5 = any(".DenseReluDense." in k for k in weights)
    gated = activation_fn(cfg.activation)[1]
    qkv = lambda w: w.T.reshape(d, h, x)  # noqa: E731
    out_proj = lambda w: w.T.reshape(h, x, d)  # noqa: E731
    flat: dict[str, Source] = {"embed/embedding": get("shared.weight")}
    if not cfg.tie_embeddings:
        flat["lm_head"] = get("lm_head.weight", lambda w: w.T)
    # tied copies of shared.weight, stored or not
    r.alias("encoder.embed_tokens.weight", "decoder.embed_tokens.weight",
            *(("lm_head.weight",) if cfg.tie_embeddings else ()))
    for which, n, dec in (("encoder", cfg.num_encoder_layers, False), ("decoder", cfg.num_decoder_layers, True)):
        p = cfg.period(dec)
        flat[f"{which}/relpos/embedding"] = get(f"{which}.block.0.layer.0.SelfAttention.relative_attention_bias.weight")
        flat[f"{which}/final_norm/scale"] = get(f"{which}.final_layer_norm.weight")
        for i in range(n):
            pre = f"{which}.block.{i}.layer."
            base = f"{which}/stack/blocks/{i % p}/"
            ff = 2 if dec else 1
            m = {
                "self_attn/q": (pre + "0.SelfAttention.q.weight", qkv),
                "self_attn/k": (pre + "0.SelfAttention.k.weight", qkv),
                "self_attn/v": (pre + "0.SelfAttention.v.weight", qkv),
                "self_attn/o": (pre + "0.SelfAttention.o.weight", out_proj),
                "self_norm/scale": (pre + "0.layer_norm.weight", lambda w: w),
                "ffn_norm/scale": (pre + f"{ff}.layer_norm.weight", lambda w: w),
            }
            if dec:
                m.update({
                    "cross_attn/q": (pre + "1.EncDecAttention.q.weight", qkv),
                    "cross_attn/k": (pre + "1.EncDecAttention.k.weight", qkv),
                    "cross_attn/v": (pre + "1.EncDecAttention.v.weight", qkv),
                    "cross_attn/o": (pre + "1.EncDecAttention.o.weight", out_proj),
                    "cross_norm/scale": (pre + "1.layer_norm.weight", lambda w: w),
                })
            if cfg.is_sparse(i, dec):
                m["ffn/router/kernel"] = (pre + f"{ff}.mlp.router.classifier.weight", lambda w: w.T)
                if cfg.moe.router_bias:
                    m["ffn/router/bias"] = (pre + f"{ff}.mlp.router.classifier.bias", lambda w: w)
                for key, hf_name in (("ffn/experts/wi", "wi"), ("ffn/experts/wo", "wo")):
                    names = [pre + f"{ff}.mlp.experts.expert_{e}.{hf_name}.weight" for e in range(cfg.moe.num_experts)]
                    r.push(base + key, r.get_stacked(names, lambda w: w.T))
            else:
                dense = f"{ff}.DenseReluDense." if t5 else f"{ff}.mlp."
                ins = ("wi_0", "wi_1") if gated else ("wi",)
                for name in ins + ("wo",):
                    m[f"ffn/{name}"] = (pre + dense + name + ".weight", lambda w: w.T)
            for path, (name, fn) in m.items():
                r.push(base + path, get(name, fn))
    return r.finish(flat)


def from_hf(path: str, **kw) -> tuple[EncoderDecoder, EncDecConfig]:
    """Build an :class:`EncoderDecoder` from a HF Switch Transformers or T5 ``save_pretrained``
    directory, streaming (see :func:`moejax.convert.load.build_from_hf` for ``mesh``, ``dtype``, ...)."""
    return build_from_hf(path, config_from_hf, hf_to_state, **kw)


#: moejax FFN activation -> T5 / Switch ``feed_forward_proj`` (the inverse of :func:`_activation`)
_FEED_FORWARD_PROJ = {"relu": "relu", "gelu": "gelu_new", "gelu_exact": "gelu", "silu": "silu",
                      "gated-gelu": "gated-gelu", "swiglu": "gated-silu"}


def hf_config(cfg: EncDecConfig, dtype, expert_capacity: int | None = None) -> dict:
    """The ``config.json`` of :func:`to_hf`: ``t5`` for a dense model, ``switch_transformers`` with
    experts (``expert_capacity``: the fixed per-sequence capacity to write; default the model's)."""
    if cfg.activation not in _FEED_FORWARD_PROJ:
        raise ValueError(f"HF T5 / Switch export: activation={cfg.activation!r} has no feed_forward_proj; "
                         f"exportable: {', '.join(_FEED_FORWARD_PROJ)}")
    moe = cfg.moe
    tied = cfg.tie_embeddings and cfg.scale_tied_logits       # a tied, unscaled head is written untied
    hf = {"model_type": "switch_transformers" if moe else "t5",
          "architectures": ["SwitchTransformersForConditionalGeneration" if moe else "T5ForConditionalGeneration"],
          "vocab_size": cfg.vocab_size, "d_model": cfg.d_model, "d_kv": cfg.head_dim, "d_ff": cfg.d_ff,
          "num_layers": cfg.num_encoder_layers, "num_decoder_layers": cfg.num_decoder_layers,
          "num_heads": cfg.num_heads, "relative_attention_num_buckets": cfg.relpos_buckets,
          "relative_attention_max_distance": cfg.relpos_max_distance, "layer_norm_epsilon": cfg.norm_eps,
          "feed_forward_proj": _FEED_FORWARD_PROJ[cfg.activation], "tie_word_embeddings": tied,
          "scale_decoder_outputs": tied, "pad_token_id": cfg.pad_id, "decoder_start_token_id": cfg.decoder_start_id,
          "is_encoder_decoder": True, "dtype": np.dtype(dtype).name}
    if moe is not None:
        enc, dec = cfg.period(False), cfg.period(True)
        hf.update(num_experts=moe.num_experts, expert_capacity=expert_capacity or moe.expert_capacity,
                  num_sparse_encoder_layers=cfg.num_encoder_layers // enc,
                  num_sparse_decoder_layers=cfg.num_decoder_layers // dec, encoder_sparse_step=enc,
                  decoder_sparse_step=dec, router_bias=moe.router_bias, router_jitter_noise=moe.jitter_eps,
                  router_dtype="float32", num_selected_experts=1)
    return hf


def export_plan(cfg: EncDecConfig) -> list[ExportRow]:
    """``[(HF name, moejax param path, stacked index or None, fn: param (slice) -> HF tensor)]``,
    the inverse of :func:`hf_to_state`."""
    h, x, d = cfg.num_heads, cfg.head_dim, cfg.d_model
    qkv = lambda w: w.reshape(d, h * x).T  # noqa: E731
    out_proj = lambda w: w.reshape(h * x, d).T  # noqa: E731
    ident, tr = (lambda w: w), (lambda w: w.T)
    gated = activation_fn(cfg.activation)[1]
    plan: list[ExportRow] = [("shared.weight", "embed/embedding", None, ident)]
    for which, n, dec in (("encoder", cfg.num_encoder_layers, False), ("decoder", cfg.num_decoder_layers, True)):
        p = cfg.period(dec)
        plan.append((f"{which}.block.0.layer.0.SelfAttention.relative_attention_bias.weight",
                     f"{which}/relpos/embedding", None, ident))
        for i in range(n):
            pre, base, j, ff = f"{which}.block.{i}.layer.", f"{which}/stack/blocks/{i % p}/", i // p, 2 if dec else 1
            rows = [(pre + f"0.SelfAttention.{k}.weight", f"self_attn/{k}", qkv) for k in "qkv"]
            rows += [(pre + "0.SelfAttention.o.weight", "self_attn/o", out_proj),
                     (pre + "0.layer_norm.weight", "self_norm/scale", ident)]
            if dec:
                rows += [(pre + f"1.EncDecAttention.{k}.weight", f"cross_attn/{k}", qkv) for k in "qkv"]
                rows += [(pre + "1.EncDecAttention.o.weight", "cross_attn/o", out_proj),
                         (pre + "1.layer_norm.weight", "cross_norm/scale", ident)]
            if cfg.is_sparse(i, dec):
                rows.append((pre + f"{ff}.mlp.router.classifier.weight", "ffn/router/kernel", tr))
                if cfg.moe.router_bias:
                    rows.append((pre + f"{ff}.mlp.router.classifier.bias", "ffn/router/bias", ident))
                for key in ("wi", "wo"):
                    rows += [(pre + f"{ff}.mlp.experts.expert_{e}.{key}.weight", f"ffn/experts/{key}",
                              lambda w, e=e: w[e].T) for e in range(cfg.moe.num_experts)]
            else:
                dense = f"{ff}.mlp." if cfg.moe is not None else f"{ff}.DenseReluDense."
                ins = ("wi_0", "wi_1") if gated else ("wi",)
                rows += [(pre + dense + k + ".weight", f"ffn/{k}", tr) for k in ins]
                rows.append((pre + dense + "wo.weight", "ffn/wo", tr))
            rows.append((pre + f"{ff}.layer_norm.weight", "ffn_norm/scale", ident))
            plan += [(name, base + path, j, fn) for name, path, fn in rows]
        plan.append((f"{which}.final_layer_norm.weight", f"{which}/final_norm/scale", None, ident))
    return plan + head_export(cfg, cfg.tie_embeddings and cfg.scale_tied_logits)


def to_hf(model: EncoderDecoder, path: str, *, dtype=None, max_shard_bytes: int = MAX_SHARD_BYTES,
          expert_capacity: int | None = None) -> None:
    """Export a T5 / Switch :class:`EncoderDecoder` to a HF ``save_pretrained`` directory (``t5``
    when dense, ``switch_transformers`` with experts), streaming as the decoder exporters do.

    transformers routes each sequence as its own group with a fixed ``expert_capacity``; a model
    converted from HF has one. A model that routes otherwise (moejax's capacity factor over token
    groups, T5X's way) is exported only with ``expert_capacity=N`` given: the HF model then routes
    the transformers way (N >= the sequence length drops nothing). Anything else the written
    ``config.json`` would not read back as this model is refused by name."""
    cfg = model.cfg
    check_export(cfg, expert_capacity)
    write_decoder(model, path, export_plan(cfg), lambda dt: hf_config(cfg, dt, expert_capacity), dtype=dtype,
                  max_shard_bytes=max_shard_bytes)


def check_export(cfg: EncDecConfig, expert_capacity: int | None = None) -> None:
    """ValueError (naming the fields) unless the T5 / Switch ``config.json`` of :func:`to_hf`
    reads back as ``cfg`` (with ``expert_capacity``: beyond the routing capacity)."""
    if not isinstance(cfg, EncDecConfig):
        raise ValueError(f"HF T5 / Switch export needs an encoder-decoder; got {type(cfg).__name__}")
    if expert_capacity is not None and (cfg.moe is None or expert_capacity < 1):
        raise ValueError(f"expert_capacity={expert_capacity!r}: needs a model with experts and a capacity >= 1")
    relaxed = ("expert_capacity", "sequence_groups", "capacity_factor_train", "capacity_factor_eval",
               "min_capacity", "max_group_size", "capacity_buckets") if expert_capacity else ()
    if cfg.moe is not None and cfg.moe.expert_capacity is None and not expert_capacity:
        raise ValueError("HF Switch routes each sequence with a fixed expert_capacity; this model routes with "
                         f"capacity factors {cfg.moe.capacity_factor_train} / {cfg.moe.capacity_factor_eval} over "
                         f"groups of {cfg.moe.max_group_size} tokens: pass expert_capacity=N (CLI: --expert_capacity;"
                         " N >= the sequence length drops nothing)")
    check_round_trip(cfg, config_from_hf(hf_config(cfg, np.float32, expert_capacity)), "T5 / Switch", relaxed)
