"""Hugging Face NLLB-MoE <-> moejax EncoderDecoder weights (safetensors, no pickle).

HF names (transformers 4.x): ``model.shared.weight``; ``model.{encoder,decoder}.layers.{i}.
self_attn.{q,k,v,out}_proj.{weight,bias}``, ``self_attn_layer_norm``, ``ff_layer_norm``; decoder
``cross_attention.*`` and ``cross_attention_layer_norm``; dense ``ffn.fc{1,2}``; sparse
``ffn.router.classifier.weight [E, d]`` and ``ffn.experts.expert_{j}.fc{1,2}.{weight,bias}``;
``model.{encoder,decoder}.layer_norm``; tied ``lm_head.weight``. Sinusoidal positions are not
stored (recomputed). Routing: the whole batch is one group; capacity as :func:`config_from_hf` says.
Export (:func:`to_hf`) writes the same names, streaming, and refuses a model whose ``config.json``
would not read back as the same model.
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

FIELDS = FieldTable(
    "nllb-moe",
    honoured=frozenset({
        "vocab_size", "d_model", "encoder_ffn_dim", "decoder_ffn_dim", "encoder_layers", "decoder_layers",
        "encoder_attention_heads", "decoder_attention_heads", "scale_embedding", "num_experts", "expert_capacity",
        "encoder_sparse_step", "decoder_sparse_step", "router_bias", "second_expert_policy",
        "normalize_router_prob_before_dropping", "batch_prioritized_routing", "moe_eval_capacity_token_fraction",
        "moe_token_dropout", "tie_word_embeddings", "pad_token_id", "decoder_start_token_id", "num_hidden_layers"}),
    inert={
        "dropout": TRAINING_ONLY, "attention_dropout": TRAINING_ONLY, "activation_dropout": TRAINING_ONLY,
        "encoder_layerdrop": TRAINING_ONLY, "decoder_layerdrop": TRAINING_ONLY,
        "router_z_loss_coef": TRAINING_ONLY, "router_aux_loss_coef": TRAINING_ONLY,
        "output_router_logits": "an output option",
        "max_position_embeddings": "moejax computes the sinusoidal positions for any length",
    },
    fixed={"activation_function": ("relu",), "router_dtype": ("float32",),
           # False (the default) masks padding tokens out of routing, as moejax does
           "router_ignore_padding_tokens": (False,)},
)


def config_from_hf(hf: dict, *, ignore_fields=(), weights=None, **overrides) -> EncDecConfig:
    """Map an ``nllb-moe`` ``config.json`` to an :class:`EncDecConfig`; every field is honoured or
    refused by name (:data:`FIELDS`).

    Capacity as transformers computes it: eval ``ceil(moe_eval_capacity_token_fraction * tokens)``
    when the fraction is > 0, else the fixed ``expert_capacity`` (then also in training, as
    transformers does); training otherwise ``2 * ceil(tokens / E)`` (fairseq's rule).
    ``tie_word_embeddings: false`` reads the checkpoint's own ``lm_head.weight`` (so does a stored
    head that differs from the embedding, as transformers 5 decides)."""
    if hf.get("model_type") != "nllb-moe":
        raise ValueError(f"config.json has model_type={hf.get('model_type')!r}; this converter reads nllb-moe")
    FIELDS.check(hf, ignore_fields)
    d, e = hf["d_model"], hf.get("num_experts", 128)
    if hf["encoder_ffn_dim"] != hf["decoder_ffn_dim"] or hf["encoder_attention_heads"] != hf["decoder_attention_heads"]:
        raise ValueError("moejax NLLB needs equal encoder/decoder ffn_dim and attention heads; got "
                         f"encoder_ffn_dim={hf['encoder_ffn_dim']}, decoder_ffn_dim={hf['decoder_ffn_dim']}, "
                         f"encoder_attention_heads={hf['encoder_attention_heads']}, "
                         f"decoder_attention_heads={hf['decoder_attention_heads']}")
    frac = hf.get("moe_eval_capacity_token_fraction", 1.0)
    frac = 0.0 if frac is None else float(frac)
    fixed_capacity = None
    if frac <= 0:
        fixed_capacity = hf.get("expert_capacity", 64)
        if fixed_capacity is None:
            raise ValueError("nllb-moe config.json has moe_eval_capacity_token_fraction<=0 and expert_capacity=null: "
                             "transformers then uses 2*ceil(tokens/E) in eval, which moejax does not reproduce; "
                             "set moe_eval_capacity_token_fraction > 0 or an expert_capacity")
    moe = MoeConfig(num_experts=e, d_model=d, d_ff=hf["encoder_ffn_dim"], top_k=2,
                    second_expert_policy=hf.get("second_expert_policy", "all"),
                    weight_norm="topk" if hf.get("normalize_router_prob_before_dropping") else "kept",
                    batch_prioritized=bool(hf.get("batch_prioritized_routing", False)),
                    capacity_factor_train=1.0, capacity_factor_eval=frac * e / 2 if frac > 0 else 1.0, min_capacity=0,
                    expert_capacity=fixed_capacity,
                    max_group_size=1 << 30, activation="relu", use_bias=True,
                    eom_rate=float(hf.get("moe_token_dropout", 0.2) or 0.0), router_bias=bool(hf.get("router_bias")))
    heads = hf["encoder_attention_heads"]
    tied = tied_head(bool(hf.get("tie_word_embeddings", True)), weights, "lm_head.weight", "model.shared.weight")
    cfg = EncDecConfig(
        vocab_size=hf["vocab_size"], d_model=d, num_encoder_layers=hf["encoder_layers"],
        num_decoder_layers=hf["decoder_layers"], num_heads=heads, head_dim=d // heads, d_ff=hf["encoder_ffn_dim"],
        activation="relu", norm_eps=1e-5, tie_embeddings=tied, moe=moe,
        encoder_moe_every=hf.get("encoder_sparse_step", 4), decoder_moe_every=hf.get("decoder_sparse_step", 4),
        moe_offset=-1, norm="layer", positions="sinusoidal", attn_bias=True, attn_scaled=True, ffn_bias=True,
        embed_scale=bool(hf.get("scale_embedding", True)), scale_tied_logits=False, pad_id=hf.get("pad_token_id", 1),
        decoder_start_id=hf.get("decoder_start_token_id", 2),
    )
    return cfg.replace(**overrides).validate()


def hf_to_state(cfg: EncDecConfig, weights) -> dict[str, Source]:
    """Flat ``{moejax path: lazy source}`` from ``{HF name: array}``; ValueError lists missing and
    unexpected HF weights."""
    r = WeightReader(weights)
    get = r.get
    h, x, d = cfg.num_heads, cfg.head_dim, cfg.d_model
    ident = lambda w: w  # noqa: E731
    flat: dict[str, Source] = {"embed/embedding": get("model.shared.weight")}
    r.alias("model.encoder.embed_tokens.weight", "model.decoder.embed_tokens.weight")
    if cfg.tie_embeddings:
        r.alias("lm_head.weight")
    else:
        flat["lm_head"] = get("lm_head.weight", lambda w: w.T)
    for which, n, dec in (("encoder", cfg.num_encoder_layers, False), ("decoder", cfg.num_decoder_layers, True)):
        p = cfg.period(dec)
        for leaf, hf_leaf in (("scale", "weight"), ("bias", "bias")):
            flat[f"{which}/final_norm/{leaf}"] = get(f"model.{which}.layer_norm.{hf_leaf}")
        for i in range(n):
            pre = f"model.{which}.layers.{i}."
            base = f"{which}/stack/blocks/{i % p}/"
            m = {}
            attns = (("self_attn", "self_attn", "self_attn_layer_norm", "self_norm"),)
            if dec:
                attns += (("cross_attn", "cross_attention", "cross_attention_layer_norm", "cross_norm"),)
            for ours, theirs, ln, norm in attns:
                for proj, hf_proj in (("q", "q_proj"), ("k", "k_proj"), ("v", "v_proj")):
                    m[f"{ours}/{proj}"] = (f"{pre}{theirs}.{hf_proj}.weight", lambda w: w.T.reshape(d, h, x))
                    m[f"{ours}/{proj}_bias"] = (f"{pre}{theirs}.{hf_proj}.bias", lambda w: w.reshape(h, x))
                m[f"{ours}/o"] = (f"{pre}{theirs}.out_proj.weight", lambda w: w.T.reshape(h, x, d))
                m[f"{ours}/o_bias"] = (f"{pre}{theirs}.out_proj.bias", ident)
                m[f"{norm}/scale"] = (f"{pre}{ln}.weight", ident)
                m[f"{norm}/bias"] = (f"{pre}{ln}.bias", ident)
            m["ffn_norm/scale"] = (pre + "ff_layer_norm.weight", ident)
            m["ffn_norm/bias"] = (pre + "ff_layer_norm.bias", ident)
            if cfg.is_sparse(i, dec):
                m["ffn/router/kernel"] = (pre + "ffn.router.classifier.weight", lambda w: w.T)
                if cfg.moe.router_bias:
                    m["ffn/router/bias"] = (pre + "ffn.router.classifier.bias", ident)
                for key, name, fn in (("wi", "fc1.weight", lambda w: w.T), ("bi", "fc1.bias", ident),
                                      ("wo", "fc2.weight", lambda w: w.T), ("bo", "fc2.bias", ident)):
                    names = [f"{pre}ffn.experts.expert_{e}.{name}" for e in range(cfg.moe.num_experts)]
                    r.push(f"{base}ffn/experts/{key}", r.get_stacked(names, fn))
            else:
                m["ffn/wi"] = (pre + "ffn.fc1.weight", lambda w: w.T)
                m["ffn/bi"] = (pre + "ffn.fc1.bias", ident)
                m["ffn/wo"] = (pre + "ffn.fc2.weight", lambda w: w.T)
                m["ffn/bo"] = (pre + "ffn.fc2.bias", ident)
            for path, (name, fn) in m.items():
                r.push(base + path, get(name, fn))
    return r.finish(flat)


def from_hf(path: str, **kw) -> tuple[EncoderDecoder, EncDecConfig]:
    """Build an :class:`EncoderDecoder` from a HF NLLB-MoE ``save_pretrained`` directory, streaming
    (see :func:`moejax.convert.load.build_from_hf` for ``mesh``, ``dtype``, ...)."""
    return build_from_hf(path, config_from_hf, hf_to_state, **kw)


def hf_config(cfg: EncDecConfig, dtype) -> dict:
    """The ``config.json`` of :func:`to_hf` (the inverse of :func:`config_from_hf`)."""
    moe = cfg.moe
    if moe is None:
        raise ValueError("HF NLLB-MoE export needs a model with experts (moe=None)")
    fixed = moe.expert_capacity is not None
    return {"model_type": "nllb-moe", "architectures": ["NllbMoeForConditionalGeneration"],
            "vocab_size": cfg.vocab_size, "d_model": cfg.d_model, "encoder_ffn_dim": cfg.d_ff,
            "decoder_ffn_dim": cfg.d_ff, "encoder_layers": cfg.num_encoder_layers,
            "decoder_layers": cfg.num_decoder_layers, "encoder_attention_heads": cfg.num_heads,
            "decoder_attention_heads": cfg.num_heads, "scale_embedding": cfg.embed_scale,
            "num_experts": moe.num_experts, "expert_capacity": moe.expert_capacity if fixed else 64,
            "encoder_sparse_step": cfg.period(False), "decoder_sparse_step": cfg.period(True),
            "router_bias": moe.router_bias, "second_expert_policy": moe.second_expert_policy,
            "normalize_router_prob_before_dropping": moe.weight_norm == "topk",
            "batch_prioritized_routing": moe.batch_prioritized,
            "moe_eval_capacity_token_fraction": 0.0 if fixed else moe.capacity_factor_eval * 2 / moe.num_experts,
            "moe_token_dropout": moe.eom_rate, "tie_word_embeddings": cfg.tie_embeddings, "pad_token_id": cfg.pad_id,
            "decoder_start_token_id": cfg.decoder_start_id, "activation_function": "relu", "router_dtype": "float32",
            "is_encoder_decoder": True, "dtype": np.dtype(dtype).name}


def export_plan(cfg: EncDecConfig) -> list[ExportRow]:
    """``[(HF name, moejax param path, stacked index or None, fn)]``, the inverse of :func:`hf_to_state`."""
    h, x, d = cfg.num_heads, cfg.head_dim, cfg.d_model
    ident, tr = (lambda w: w), (lambda w: w.T)
    # transformers ties the stacks' embed_tokens to shared only with tie_word_embeddings: write all three
    plan: list[ExportRow] = [(f"model.{k}.weight", "embed/embedding", None, ident)
                             for k in ("shared", "encoder.embed_tokens", "decoder.embed_tokens")]
    for which, n, dec in (("encoder", cfg.num_encoder_layers, False), ("decoder", cfg.num_decoder_layers, True)):
        p = cfg.period(dec)
        for i in range(n):
            pre, base, j = f"model.{which}.layers.{i}.", f"{which}/stack/blocks/{i % p}/", i // p
            rows = []
            attns = (("self_attn", "self_attn", "self_attn_layer_norm", "self_norm"),)
            if dec:
                attns += (("cross_attn", "cross_attention", "cross_attention_layer_norm", "cross_norm"),)
            for ours, theirs, ln, norm in attns:
                for proj, hf_proj in (("q", "q_proj"), ("k", "k_proj"), ("v", "v_proj")):
                    rows.append((f"{pre}{theirs}.{hf_proj}.weight", f"{ours}/{proj}", lambda w: w.reshape(d, h * x).T))
                    rows.append((f"{pre}{theirs}.{hf_proj}.bias", f"{ours}/{proj}_bias", lambda w: w.reshape(h * x)))
                rows.append((f"{pre}{theirs}.out_proj.weight", f"{ours}/o", lambda w: w.reshape(h * x, d).T))
                rows.append((f"{pre}{theirs}.out_proj.bias", f"{ours}/o_bias", ident))
                rows += [(f"{pre}{ln}.weight", f"{norm}/scale", ident), (f"{pre}{ln}.bias", f"{norm}/bias", ident)]
            if cfg.is_sparse(i, dec):
                rows.append((pre + "ffn.router.classifier.weight", "ffn/router/kernel", tr))
                if cfg.moe.router_bias:
                    rows.append((pre + "ffn.router.classifier.bias", "ffn/router/bias", ident))
                for key, name, fn in (("wi", "fc1.weight", lambda w, e: w[e].T), ("bi", "fc1.bias", lambda w, e: w[e]),
                                      ("wo", "fc2.weight", lambda w, e: w[e].T), ("bo", "fc2.bias", lambda w, e: w[e])):
                    rows += [(f"{pre}ffn.experts.expert_{e}.{name}", f"ffn/experts/{key}",
                              lambda w, e=e, fn=fn: fn(w, e)) for e in range(cfg.moe.num_experts)]
            else:
                rows += [(pre + "ffn.fc1.weight", "ffn/wi", tr), (pre + "ffn.fc1.bias", "ffn/bi", ident),
                         (pre + "ffn.fc2.weight", "ffn/wo", tr), (pre + "ffn.fc2.bias", "ffn/bo", ident)]
            rows += [(pre + "ff_layer_norm.weight", "ffn_norm/scale", ident),
                     (pre + "ff_layer_norm.bias", "ffn_norm/bias", ident)]
            plan += [(name, base + path, j, fn) for name, path, fn in rows]
        plan += [(f"model.{which}.layer_norm.weight", f"{which}/final_norm/scale", None, ident),
                 (f"model.{which}.layer_norm.bias", f"{which}/final_norm/bias", None, ident)]
    return plan + head_export(cfg, cfg.tie_embeddings)


def to_hf(model: EncoderDecoder, path: str, *, dtype=None, max_shard_bytes: int = MAX_SHARD_BYTES) -> None:
    """Export an NLLB-MoE :class:`EncoderDecoder` to a HF ``save_pretrained`` directory, streaming
    (one parameter, one layer of it, on the host at a time); a model whose ``config.json`` would not
    read back as the same model is refused, naming the fields."""
    cfg = model.cfg
    check_export(cfg)
    write_decoder(model, path, export_plan(cfg), lambda dt: hf_config(cfg, dt), dtype=dtype,
                  max_shard_bytes=max_shard_bytes)


def check_export(cfg: EncDecConfig) -> None:
    """ValueError (naming the fields) unless the NLLB-MoE ``config.json`` of :func:`to_hf` reads
    back as ``cfg``."""
    if not isinstance(cfg, EncDecConfig):
        raise ValueError(f"HF NLLB-MoE export needs an encoder-decoder; got {type(cfg).__name__}")
    check_round_trip(cfg, config_from_hf(hf_config(cfg, np.float32)), "NLLB-MoE")
