"""Hugging Face Switch Transformers <-> moejax EncoderDecoder weights (safetensors, no pickle).

HF names (transformers 4.x): ``shared.weight``; ``{encoder,decoder}.block.{i}.layer.0.SelfAttention.
{q,k,v,o}.weight``; ``encoder.block.0.layer.0.SelfAttention.relative_attention_bias.weight [32, h]``;
``layer.{0,1,2}.layer_norm.weight``; decoder cross-attention ``layer.1.EncDecAttention.*``; FFN
``layer.{1|2}.mlp.{wi,wo}.weight`` (dense) or ``mlp.router.classifier.weight [E, d]`` and
``mlp.experts.expert_{j}.{wi,wo}.weight`` (sparse); ``{encoder,decoder}.final_layer_norm.weight``;
``lm_head.weight``. HF routes each sequence as its own group with a fixed ``expert_capacity``.
"""

from __future__ import annotations

import numpy as np
from flax import nnx

from moejax.convert.mapping import WeightReader, load_into
from moejax.convert.safetensors_io import load_hf_dir, read_hf_config
from moejax.models.config import EncDecConfig
from moejax.models.encdec import EncoderDecoder
from moejax.moe import MoeConfig

_ACTS = {"relu": "relu", "gelu_new": "gelu", "gelu": "gelu_exact", "gelu_pytorch_tanh": "gelu"}


def config_from_hf(hf: dict, **overrides) -> EncDecConfig:
    """Map a ``switch_transformers`` (or ``t5``, dense) ``config.json`` to an :class:`EncDecConfig`."""
    mt = hf.get("model_type")
    if mt not in ("switch_transformers", "t5"):
        raise ValueError(f"config.json has model_type={mt!r}; this converter reads switch_transformers, t5")
    act = hf.get("dense_act_fn", hf.get("feed_forward_proj", "relu"))
    if act not in _ACTS:
        raise ValueError(f"unsupported dense_act_fn {act!r}; supported: {', '.join(_ACTS)}")
    d = hf["d_model"]
    n_enc = hf["num_layers"]
    n_dec = hf.get("num_decoder_layers") or n_enc
    moe = None
    enc_step = dec_step = 1
    if mt == "switch_transformers":
        sp_enc, sp_dec = hf.get("num_sparse_encoder_layers", 0), hf.get("num_sparse_decoder_layers", 0)
        if (sp_enc > 0) != (sp_dec > 0):
            raise ValueError("moejax needs sparse layers in both stacks or in neither "
                             f"(num_sparse_encoder_layers={sp_enc}, num_sparse_decoder_layers={sp_dec})")
        if sp_enc:
            enc_step, dec_step = n_enc // sp_enc, n_dec // sp_dec
            moe = MoeConfig(num_experts=hf["num_experts"], d_model=d, d_ff=hf["d_ff"], top_k=1,
                            weight_norm="none", expert_capacity=hf["expert_capacity"], sequence_groups=True,
                            activation=_ACTS[act], router_bias=bool(hf.get("router_bias", False)),
                            jitter_eps=float(hf.get("router_jitter_noise", 0.0) or 0.0))
    cfg = EncDecConfig(
        vocab_size=hf["vocab_size"], d_model=d, num_encoder_layers=n_enc, num_decoder_layers=n_dec,
        num_heads=hf["num_heads"], head_dim=hf["d_kv"], d_ff=hf["d_ff"], activation=_ACTS[act],
        norm_eps=hf.get("layer_norm_epsilon", 1e-6), relpos_buckets=hf.get("relative_attention_num_buckets", 32),
        relpos_max_distance=hf.get("relative_attention_max_distance", 128),
        tie_embeddings=bool(hf.get("tie_word_embeddings", True)), moe=moe,
        encoder_moe_every=enc_step, decoder_moe_every=dec_step, moe_offset=1,
        pad_id=hf.get("pad_token_id", 0), decoder_start_id=hf.get("decoder_start_token_id", 0),
    )
    return cfg.replace(**overrides).validate()


def hf_to_state(cfg: EncDecConfig, weights: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    """Flat ``{moejax path: array}``; ValueError lists missing and unexpected HF weights."""
    r = WeightReader(weights)
    get = r.get
    h, x, d = cfg.num_heads, cfg.head_dim, cfg.d_model
    qkv = lambda w: w.T.reshape(d, h, x)  # noqa: E731
    out_proj = lambda w: w.T.reshape(h, x, d)  # noqa: E731
    flat: dict[str, np.ndarray] = {"embed/embedding": get("shared.weight")}
    if not cfg.tie_embeddings:
        w = get("lm_head.weight")
        flat["lm_head"] = None if w is None else w.T
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
                m["ffn/wi"] = (pre + f"{ff}.mlp.wi.weight", lambda w: w.T)
                m["ffn/wo"] = (pre + f"{ff}.mlp.wo.weight", lambda w: w.T)
            for path, (name, fn) in m.items():
                w = get(name)
                r.push(base + path, None if w is None else fn(w))
    return r.finish(flat)


def from_hf(path: str, *, rngs: nnx.Rngs | None = None, **overrides) -> tuple[EncoderDecoder, EncDecConfig]:
    """Build an :class:`EncoderDecoder` from a HF Switch Transformers ``save_pretrained`` directory."""
    cfg = config_from_hf(read_hf_config(path), **overrides)
    _, weights = load_hf_dir(path)
    model = EncoderDecoder(cfg, rngs=rngs or nnx.Rngs(0))
    return load_into(model, hf_to_state(cfg, weights)), cfg
