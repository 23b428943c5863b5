"""Named model configs at their published sizes.

``get_config(name)`` returns a validated :class:`DecoderConfig` or :class:`EncDecConfig`; unknown
names raise a ValueError that lists the valid ones. Sizes follow REFERENCE.md (Switch: Fedus et
al. and the released t5x gins; Mixtral / Llama / Mistral / Qwen-MoE / OLMoE: the HF configs).
"""

from __future__ import annotations

from collections.abc import Callable

from moejax.models.config import DecoderConfig, EncDecConfig, override
from moejax.models.layers import Yarn
from moejax.moe import MoeConfig


def _mixtral(d, f, layers, heads, kv, vocab, experts=8, k=2, sliding_window=None) -> DecoderConfig:
    moe = MoeConfig(num_experts=experts, d_model=d, d_ff=f, top_k=k, weight_norm="topk", dropless=True,
                    activation="swiglu", balance_loss_scope="global")
    return DecoderConfig(vocab_size=vocab, d_model=d, num_layers=layers, num_heads=heads, num_kv_heads=kv,
                         head_dim=d // heads, d_ff=f, norm_eps=1e-5, rope_theta=1e6, sliding_window=sliding_window,
                         moe=moe, moe_every=1)


def _llama(d, f, layers, heads, kv, vocab, eps=1e-5, theta=1e4) -> DecoderConfig:
    return DecoderConfig(vocab_size=vocab, d_model=d, num_layers=layers, num_heads=heads, num_kv_heads=kv,
                         head_dim=d // heads, d_ff=f, norm_eps=eps, rope_theta=theta)


def _openmoe(d, f, layers, heads, head_dim, experts, every, vocab=256384) -> DecoderConfig:
    # ColossalAI / T5X OpenMoE: top-2 with raw softmax gates, capacity 1.25 / 2.0 (min 4), tokens
    # dropped; T5X split SwiGLU (wi_0 is 2f wide); unscaled attention; untied lm_head; RMSNorm 1e-6.
    act = "split-swiglu"
    moe = MoeConfig(num_experts=experts, d_model=d, d_ff=f, top_k=2, weight_norm="none", capacity_factor_train=1.25,
                    capacity_factor_eval=2.0, min_capacity=4, activation=act)
    return DecoderConfig(vocab_size=vocab, d_model=d, num_layers=layers, num_heads=heads, num_kv_heads=heads,
                         head_dim=head_dim, d_ff=f, activation=act, norm_eps=1e-6, rope_theta=1e4, attn_scale=1.0,
                         moe=moe, moe_every=every, moe_extra_mlp=True)


def _qwen_moe(d, layers, heads, kv, experts, k, moe_ff, dense_ff, vocab=151936, head_dim=128, shared_ff=0,
              norm_topk=False, qk_norm="none", attention_bias="none", eps=1e-6, theta=1e6) -> DecoderConfig:
    # Qwen1.5/Qwen2-MoE (shared expert with a sigmoid gate, q/k/v biases, top-k softmax weights not
    # renormalised), Qwen3-MoE (per-head QK-norm, renormalised top-8) and OLMoE (QK-norm over the
    # whole projection): dropless softmax top-k routers over SwiGLU experts, every layer sparse
    moe = MoeConfig(num_experts=experts, d_model=d, d_ff=moe_ff, top_k=k, weight_norm="topk" if norm_topk else "none",
                    dropless=True, activation="swiglu", num_shared_experts=1 if shared_ff else 0,
                    shared_d_ff=shared_ff or None, shared_gate=bool(shared_ff), balance_loss_scope="global")
    return DecoderConfig(vocab_size=vocab, d_model=d, num_layers=layers, num_heads=heads, num_kv_heads=kv,
                         head_dim=head_dim, d_ff=dense_ff, norm_eps=eps, rope_theta=theta,
                         attention_bias=attention_bias, qk_norm=qk_norm, moe=moe, moe_every=1)


def _deepseek(d, layers, heads, experts, k, moe_ff, dense_ff, shared, *, q_rank, first_dense, v3, groups=1,
              top_groups=1, scale=1.0, vocab=102400, yarn=None, kv_rank=512, nope=128, rope=64, v=128,
              eps=1e-6, theta=10000.0) -> DecoderConfig:
    # DeepSeek-V2 / V3: MLA attention, the first k blocks dense, then fine-grained SwiGLU experts +
    # ungated shared experts. V2: softmax scores, group-limited by each group's best expert, raw
    # weights; V3: sigmoid scores + a selection bias, groups by their top-2 sum, renormalised. Both
    # multiply the weights by routed_scaling_factor. YaRN softmax scale: (nope+rope)^-0.5 * m^2.
    moe = MoeConfig(num_experts=experts, d_model=d, d_ff=moe_ff, top_k=k, dropless=True, activation="swiglu",
                    num_shared_experts=1, shared_d_ff=shared * moe_ff, routed_scale=scale,
                    num_expert_groups=groups, top_k_groups=top_groups,
                    router_score="sigmoid" if v3 else "softmax", selection_bias=v3,
                    group_score="top2_sum" if v3 else "max", weight_norm="topk" if v3 else "none")
    rope_scaling, attn_scale = None, None
    if yarn is not None:
        factor, mscale, mscale_all, *beta_fast = yarn            # (factor, mscale, mscale_all_dim[, beta_fast])
        rope_scaling = Yarn(factor=factor, original_max_position=4096, mscale=mscale, mscale_all_dim=mscale_all,
                            beta_fast=beta_fast[0] if beta_fast else 32.0)
        attn_scale = (nope + rope) ** -0.5 * Yarn.get_mscale(factor, mscale_all) ** 2
    return DecoderConfig(vocab_size=vocab, d_model=d, num_layers=layers, num_heads=heads, num_kv_heads=heads,
                         head_dim=rope, d_ff=dense_ff, norm_eps=eps, rope_theta=theta, attention="mla",
                         q_lora_rank=q_rank, kv_lora_rank=kv_rank, qk_nope_head_dim=nope, qk_rope_head_dim=rope,
                         v_head_dim=v, rope_scaling=rope_scaling, attn_scale=attn_scale,
                         first_dense_layers=first_dense, moe=moe, moe_every=1)


_GPT_OSS_YARN = Yarn(factor=32.0, original_max_position=4096, truncate=False)


def _gpt_oss(layers, experts, d=2880, heads=64, kv=8, head_dim=64, f=2880, k=4, vocab=201088, window=128,
             yarn=_GPT_OSS_YARN) -> DecoderConfig:
    # gpt-oss: biased GQA with per-head attention sinks, layers alternating a 128-token window and
    # full attention, YaRN (truncate off), every layer MoE: a biased router, softmax over the top-4
    # logits, clamped SwiGLU experts with biases
    moe = MoeConfig(num_experts=experts, d_model=d, d_ff=f, top_k=k, weight_norm="topk", router_bias=True,
                    use_bias=True, dropless=True, activation="clamped-swiglu", balance_loss_scope="global")
    return DecoderConfig(vocab_size=vocab, d_model=d, num_layers=layers, num_heads=heads, num_kv_heads=kv,
                         head_dim=head_dim, d_ff=f, norm_eps=1e-5, rope_theta=150000.0, rope_scaling=yarn,
                         attention_bias="all", attention_sinks=True, window_pattern=(window, None), moe=moe,
                         moe_every=1)


def _t5(d, f, heads, layers, dec_layers=None, experts=0, every=2, act="relu", group=8192, cf_train=1.25,
        cf_eval=2.0, min_cap=4, head_dim=64, vocab=32128, tied=True) -> EncDecConfig:
    moe = None
    if experts:
        moe = MoeConfig(num_experts=experts, d_model=d, d_ff=f, top_k=1, capacity_factor_train=cf_train,
                        capacity_factor_eval=cf_eval, min_capacity=min_cap, max_group_size=group, activation=act)
    return EncDecConfig(vocab_size=vocab, d_model=d, num_encoder_layers=layers,
                        num_decoder_layers=dec_layers or layers, num_heads=heads, head_dim=head_dim, d_ff=f,
                        activation=act, moe=moe, encoder_moe_every=every, decoder_moe_every=every,
                        tie_embeddings=tied)


def _nllb(d, f, heads, layers, vocab, experts, every=4) -> EncDecConfig:
    moe = MoeConfig(num_experts=experts, d_model=d, d_ff=f, top_k=2, weight_norm="kept", capacity_factor_train=1.0,
                    capacity_factor_eval=experts / 2, min_capacity=0, max_group_size=1 << 30, activation="relu",
                    use_bias=True, eom_rate=0.2)
    return EncDecConfig(vocab_size=vocab, d_model=d, num_encoder_layers=layers, num_decoder_layers=layers,
                        num_heads=heads, head_dim=d // heads, d_ff=f, activation="relu", norm_eps=1e-5, moe=moe,
                        encoder_moe_every=every, decoder_moe_every=every, norm="layer", positions="sinusoidal",
                        attn_bias=True, attn_scaled=True, ffn_bias=True, embed_scale=True, scale_tied_logits=False,
                        pad_id=1, decoder_start_id=2)


REGISTRY: dict[str, Callable[[], DecoderConfig | EncDecConfig]] = {
    # T5 v1.0-style dense baselines
    "t5_small": lambda: _t5(512, 2048, 8, 6),
    "t5_base": lambda: _t5(768, 3072, 12, 12),
    "t5_large": lambda: _t5(1024, 4096, 16, 24),
    # Switch Transformers (every other layer sparse; group 8192 base, 4096 large/xxl, 2048 C)
    **{f"switch_base_{e}": (lambda e=e: _t5(768, 3072, 12, 12, experts=e)) for e in (8, 16, 32, 64, 128, 256)},
    "switch_large_128": lambda: _t5(1024, 4096, 16, 24, experts=128, group=4096),
    # T5 v1.1-based: gated GeLU and an untied lm_head (394.7B total, REFERENCE.md)
    "switch_xxl_128": lambda: _t5(4096, 10240, 64, 24, experts=128, act="gated-gelu", group=4096, cf_eval=4.0,
                                  min_cap=2, tied=False),
    "switch_c_2048": lambda: _t5(2080, 6144, 30, 15, experts=2048, every=1, group=2048, cf_train=1.0, min_cap=2),
    # NLLB-MoE 54B: top-2 every 4th layer, 128 experts, LayerNorm, sinusoidal positions (54.5B total)
    "nllb_moe_54b": lambda: _nllb(2048, 8192, 16, 24, 256206, 128),
    "tiny_nllb_moe": lambda: _nllb(64, 128, 4, 4, 256, 4),
    "tiny_switch": lambda: _t5(64, 128, 4, 2, experts=4, head_dim=16, vocab=256, group=256),
    "tiny_t5": lambda: _t5(64, 128, 4, 2, head_dim=16, vocab=256),
    # task-level routing over the 6 synth tasks (router='task', dropless, 8 experts, top-1)
    "tiny_switch_task": lambda: _t5(64, 128, 4, 2, experts=8, head_dim=16, vocab=256, group=256).replace(
        moe=MoeConfig(num_experts=8, d_model=64, d_ff=128, top_k=1, router="task", num_tasks=6, dropless=True,
                      weight_norm="topk", activation="relu")),
    # Mixtral 8x7B: 46.70B total / 12.88B active (REFERENCE.md 1.4)
    "mixtral_8x7b": lambda: _mixtral(4096, 14336, 32, 32, 8, 32000),
    # Mixtral 8x22B: hidden 6144, 56 layers, 48 heads (8 kv), ff 16384, vocab 32768
    "mixtral_8x22b": lambda: _mixtral(6144, 16384, 56, 48, 8, 32768),
    "llama_7b": lambda: _llama(4096, 11008, 32, 32, 32, 32000, eps=1e-6),
    "llama2_7b": lambda: _llama(4096, 11008, 32, 32, 32, 32000, eps=1e-5),
    "mistral_7b": lambda: _llama(4096, 14336, 32, 32, 8, 32000),
    # OpenMoE (ColossalAI configs; REFERENCE.md 1.3): MoE every k-th layer plus a residual dense MLP
    "openmoe_base": lambda: _openmoe(768, 2048, 12, 12, 64, 16, 4),
    "openmoe_8b": lambda: _openmoe(2048, 8192, 24, 24, 128, 32, 6),
    "openmoe_34b": lambda: _openmoe(3072, 12288, 32, 24, 128, 32, 4),
    # Qwen1.5-MoE-A2.7B: 60 experts top-4 + a gated shared expert (4 x 1408), 14.32B / 2.69B active
    "qwen1_5_moe_a2_7b": lambda: _qwen_moe(2048, 24, 16, 16, 60, 4, 1408, 5632, shared_ff=5632,
                                           attention_bias="qkv"),
    # Qwen2-57B-A14B: 64 experts top-8 + a gated shared expert of 20480, 57.41B / 14.25B active
    "qwen2_57b_a14b": lambda: _qwen_moe(3584, 28, 28, 4, 64, 8, 2560, 18944, shared_ff=20480, attention_bias="qkv"),
    # Qwen3-30B-A3B / 235B-A22B: 128 experts top-8 renormalised, per-head QK-norm, head_dim 128
    "qwen3_30b_a3b": lambda: _qwen_moe(2048, 48, 32, 4, 128, 8, 768, 6144, norm_topk=True, qk_norm="head"),
    "qwen3_235b_a22b": lambda: _qwen_moe(4096, 94, 64, 4, 128, 8, 1536, 12288, norm_topk=True, qk_norm="head"),
    # OLMoE-1B-7B-0924: 64 experts top-8, QK-norm over the whole projection, 6.92B / 1.28B active
    "olmoe_1b_7b": lambda: _qwen_moe(2048, 16, 16, 16, 64, 8, 1024, 1024, vocab=50304, qk_norm="full", eps=1e-5,
                                     theta=1e4),
    # DeepSeek-V2-Lite (15.71B / 2.66B active), V2 (235.74B / 21.38B), V3 (671.03B / 37.55B; Kimi-K2
    # shares the architecture): MLA, first layer(s) dense, 2 (V2) / 1 (V3) shared experts, YaRN x40
    "deepseek_v2_lite": lambda: _deepseek(2048, 27, 16, 64, 6, 1408, 10944, 2, q_rank=None, first_dense=1, v3=False,
                                          yarn=(40.0, 0.707, 0.707)),
    "deepseek_v2": lambda: _deepseek(5120, 60, 128, 160, 6, 1536, 12288, 2, q_rank=1536, first_dense=1, v3=False,
                                     groups=8, top_groups=3, scale=16.0, yarn=(40.0, 0.707, 0.707)),
    "deepseek_v3": lambda: _deepseek(7168, 61, 128, 256, 8, 2048, 18432, 1, q_rank=1536, first_dense=3, v3=True,
                                     groups=8, top_groups=4, scale=2.5, vocab=129280, yarn=(40.0, 1.0, 1.0)),
    # Kimi-K2 (Base / Instruct: 128K context, YaRN x32; Instruct-0905: 256K, YaRN x64): V3's layout
    # with 384 experts, 64 heads, one dense layer, no expert groups, theta 5e4, a 163840-token vocab
    "kimi_k2": lambda: _deepseek(7168, 61, 64, 384, 8, 2048, 18432, 1, q_rank=1536, first_dense=1, v3=True,
                                 scale=2.827, vocab=163840, yarn=(32.0, 1.0, 1.0, 1.0), theta=50000.0),
    "kimi_k2_0905": lambda: _deepseek(7168, 61, 64, 384, 8, 2048, 18432, 1, q_rank=1536, first_dense=1, v3=True,
                                      scale=2.827, vocab=163840, yarn=(64.0, 1.0, 1.0, 1.0), theta=50000.0),
    # gpt-oss-20b (20.915B / 4.187B active with embedding and head; the model card's 3.6B leaves out the
    # input embedding) and gpt-oss-120b (116.829B / 5.712B; card 5.1B)
    "gpt_oss_20b": lambda: _gpt_oss(24, 32),
    "gpt_oss_120b": lambda: _gpt_oss(36, 128),
    # tiny configs for tests and CPU runs
    "tiny_gpt_oss": lambda: _gpt_oss(4, 8, d=64, heads=4, kv=2, head_dim=16, f=32, k=2, vocab=256, window=4,
                                     yarn=Yarn(factor=4.0, original_max_position=16, truncate=False)),
    "tiny_deepseek_v2": lambda: _deepseek(64, 3, 4, 8, 2, 32, 128, 2, q_rank=None, first_dense=1, v3=False,
                                          groups=4, top_groups=2, scale=2.0, vocab=256, kv_rank=32, nope=16,
                                          rope=8, v=16),
    "tiny_deepseek_v3": lambda: _deepseek(64, 3, 4, 8, 2, 32, 128, 1, q_rank=48, first_dense=1, v3=True,
                                          groups=4, top_groups=2, scale=2.5, vocab=256, kv_rank=32, nope=16,
                                          rope=8, v=16, yarn=(4.0, 1.0, 1.0)),
    "tiny_qwen2_moe": lambda: _qwen_moe(64, 2, 4, 2, 8, 2, 32, 128, vocab=256, head_dim=16, shared_ff=64,
                                        attention_bias="qkv"),
    "tiny_qwen3_moe": lambda: _qwen_moe(64, 2, 4, 2, 8, 2, 32, 128, vocab=256, head_dim=32, norm_topk=True,
                                        qk_norm="head"),
    "tiny_olmoe": lambda: _qwen_moe(64, 2, 4, 4, 8, 2, 32, 32, vocab=256, head_dim=16, qk_norm="full", eps=1e-5,
                                    theta=1e4),
    "tiny_openmoe": lambda: _openmoe(64, 64, 4, 4, 16, 4, 2, vocab=256),
    "tiny_mixtral": lambda: _mixtral(64, 128, 2, 4, 2, 256, experts=4),
    "tiny_llama": lambda: _llama(64, 256, 2, 4, 2, 256),
}


def names() -> list[str]:
    return sorted(REGISTRY)


def get_config(name: str, **overrides) -> DecoderConfig | EncDecConfig:
    """The registered config ``name`` with ``overrides`` applied (field names or dotted paths into
    the nested configs, e.g. ``get_config('tiny_switch', **{'moe.expert_dropout': 0.2})``; see
    :func:`moejax.models.config.override`), validated."""
    if name not in REGISTRY:
        raise ValueError(f"unknown model {name!r}; registered models: {', '.join(names())}")
    return override(REGISTRY[name](), overrides).validate()
