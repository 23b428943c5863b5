"""Decoder-only transformer (Llama / Mistral dense, Mixtral, OpenMoE, Qwen-MoE, OLMoE, DeepSeek, gpt-oss)
with scanned layer periods (and a scanned dense prefix: DeepSeek).

Shape letters (README legend): ``b`` batch, ``s`` sequence,
``d`` d_model, ``v`` vocab, ``l`` scanned periods.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import nnx

from moejax.models.config import DecoderConfig
from moejax.models.layers import Attention, Embed, RMSNorm
from moejax.models.mla import MLAttention
from moejax.models.stack import DecoderAux, Period, empty_caches, scan_periods
from moejax.moe import DenseFFN, MoeLayer
from moejax.sharding import stack_modules


def make_attention(cfg: DecoderConfig, rngs: nnx.Rngs, layer: int = 0) -> nnx.Module:
    """Layer ``layer``'s attention: GQA :class:`Attention` or DeepSeek's :class:`MLAttention`."""
    if cfg.attention == "mla":
        return MLAttention(cfg.d_model, cfg.num_heads, kv_lora_rank=cfg.kv_lora_rank, qk_nope_dim=cfg.qk_nope_head_dim,
                           qk_rope_dim=cfg.qk_rope_head_dim, v_dim=cfg.v_head_dim, q_lora_rank=cfg.q_lora_rank,
                           rope_theta=cfg.rope_theta, rope_scaling=cfg.rope_scaling, scale=cfg.attn_scale,
                           impl=cfg.attention_impl, chunk=cfg.attention_chunk, dtype=cfg.dtype,
                           param_dtype=cfg.param_dtype, rngs=rngs)
    return Attention(cfg.d_model, cfg.num_heads, cfg.num_kv_heads, cfg.head_dim, rope_theta=cfg.rope_theta,
                     sliding_window=cfg.window(layer), scale=cfg.attn_scale, impl=cfg.attention_impl,
                     chunk=cfg.attention_chunk, use_bias=cfg.attention_bias != "none",
                     out_bias=cfg.attention_bias == "all", qk_norm=cfg.qk_norm, norm_eps=cfg.norm_eps,
                     qkv_clip=cfg.qkv_clip, rope_scaling=cfg.rope_scaling, sinks=cfg.attention_sinks, dtype=cfg.dtype,
                     param_dtype=cfg.param_dtype, rngs=rngs)


class DecoderBlock(nnx.Module):
    """Pre-norm block: ``x += attn(norm(x))``; ``x += ffn(norm(x))`` (dense MLP or MoE), and for
    OpenMoE ``x += mlp(norm_extra(x))`` after a MoE FFN."""

    def __init__(self, cfg: DecoderConfig, sparse: bool, *, rngs: nnx.Rngs, layer: int = 0):
        self.attn_norm = RMSNorm(cfg.d_model, eps=cfg.norm_eps, param_dtype=cfg.param_dtype)
        self.attn = make_attention(cfg, rngs, layer)
        self.ffn_norm = RMSNorm(cfg.d_model, eps=cfg.norm_eps, param_dtype=cfg.param_dtype)
        self.sparse = sparse
        self.ffn = MoeLayer(cfg.moe, rngs=rngs) if sparse else DenseFFN(
            cfg.d_model, cfg.d_ff, activation=cfg.activation, dtype=cfg.dtype, param_dtype=cfg.param_dtype, rngs=rngs)
        self.extra = nnx.List([
            RMSNorm(cfg.d_model, eps=cfg.norm_eps, param_dtype=cfg.param_dtype),
            DenseFFN(cfg.d_model, cfg.d_ff, activation=cfg.activation, dtype=cfg.dtype, param_dtype=cfg.param_dtype,
                rngs=rngs),
        ]) if sparse and cfg.moe_extra_mlp else None

    def __call__(self, x, *, positions, padding_mask, deterministic, cache=None, task_ids=None):
        """Returns ``(x, moe_stats or None, new_cache or None)``."""
        a = self.attn(self.attn_norm(x), positions=positions, padding_mask=padding_mask, cache=cache)
        if cache is not None:
            a, cache = a
        x = x + a.astype(x.dtype)
        h = self.ffn_norm(x)
        stats = None
        if self.sparse:
            y, stats = self.ffn(h, padding_mask=padding_mask, deterministic=deterministic, task_ids=task_ids)
        else:
            y = self.ffn(h)
        x = x + y.astype(x.dtype)
        if self.extra is not None:
            x = x + self.extra[1](self.extra[0](x)).astype(x.dtype)
        return x, stats, cache


class Decoder(nnx.Module):
    """``logits, aux = model(ids, positions=None, padding_mask=None, deterministic=True)``.

    ``ids [b, s]`` int32 -> ``logits [b, s, v]`` float32. Layer periods are applied with
    ``jax.lax.scan`` over their stacked parameters.
    """

    def __init__(self, cfg: DecoderConfig, *, rngs: nnx.Rngs):
        cfg.validate()
        self.cfg = cfg
        self.embed = Embed(cfg.vocab_size, cfg.d_model, param_dtype=cfg.param_dtype, rngs=rngs)
        k = cfg.first_dense_layers
        self.prefix = stack_modules(lambda r: Period([DecoderBlock(cfg, False, rngs=r)]), k, rngs,
                                    "layers") if k else None
        self.stack = stack_modules(
            lambda r: Period([DecoderBlock(cfg, cfg.is_sparse(k + j), rngs=r, layer=k + j) for j in range(cfg.period)]),
            (cfg.num_layers - k) // cfg.period, rngs, "layers")
        self.norm = RMSNorm(cfg.d_model, eps=cfg.norm_eps, param_dtype=cfg.param_dtype)
        self.lm_head = None if cfg.tie_embeddings else nnx.Param(
            nnx.initializers.variance_scaling(1.0, "fan_in", "truncated_normal")(
                rngs.params(), (cfg.d_model, cfg.vocab_size), cfg.param_dtype),
            logical_axes=("embed", "vocab"))

    def __call__(self, ids: jax.Array, *, positions: jax.Array | None = None, padding_mask: jax.Array | None = None,
                 deterministic: bool = True, task_ids: jax.Array | None = None) -> tuple[jax.Array, DecoderAux]:
        """``ids [b, s]`` -> ``(logits [b, s, v] float32, DecoderAux)``; ``task_ids [b]`` for
        task-level routing."""
        logits, aux, _ = self.apply_with_cache(ids, None, positions=positions, padding_mask=padding_mask,
                                               deterministic=deterministic, task_ids=task_ids)
        return logits, aux

    def init_cache(self, batch: int, max_length: int) -> tuple:
        """Empty KV caches, one per block of a period, each stacked on a leading ``[l]`` axis
        (with ``first_dense_layers``, the dense prefix's cache first). With a sliding window shorter
        than ``max_length`` they are ring buffers of ``sliding_window`` slots (the cache holds the
        window, not the sequence); with MLA they hold the latent and the RoPE key."""
        cfg = self.cfg
        heads, k_dim, v_dim = cfg.num_kv_heads, cfg.head_dim, None
        if cfg.attention == "mla":                 # the latent and the shared RoPE key, one "head"
            heads, k_dim, v_dim = 1, cfg.kv_lora_rank, cfg.qk_rope_head_dim
        k = cfg.first_dense_layers

        def caches_of(periods, layers):            # one cache per block, each a ring of its window
            out = ()
            for layer in layers:
                w = cfg.window(layer)
                ring = w is not None and w < max_length
                out += empty_caches(periods, 1, batch, w if ring else max_length, heads, k_dim, cfg.dtype,
                                    ring=ring, v_dim=v_dim)
            return out

        caches = caches_of((cfg.num_layers - k) // cfg.period, range(k, k + cfg.period))
        return (caches_of(k, [0]) + caches) if k else caches

    def apply_with_cache(self, ids, caches, *, positions=None, padding_mask=None, deterministic=True, task_ids=None):
        """Like ``__call__`` but reads / extends ``caches`` (from :meth:`init_cache`); returns
        ``(logits, aux, new_caches)``. With a cache, ``positions`` default to the cache index."""
        cfg = self.cfg
        if ids.ndim != 2:
            raise ValueError(f"Decoder expects token ids of rank 2 [batch, length]; got shape {ids.shape}")
        b, s = ids.shape
        if positions is None and caches is not None:
            positions = jnp.broadcast_to(caches[0].index[0] + jnp.arange(s, dtype=jnp.int32), (b, s))
        # without a cache, positions left out stay None: the attention layers use the token indices
        # and know they are (block-sparse kernels: attention_impl 'splash')
        x = self.embed(ids, cfg.dtype)
        kw = dict(positions=positions, padding_mask=padding_mask, task_ids=task_ids)
        if self.prefix is not None:                       # the dense first blocks, their own scan
            pre = None if caches is None else caches[:1]
            x, _, pre = scan_periods(self.prefix, x, pre, deterministic, cfg.remat, **kw)
            caches = None if caches is None else caches[1:]
        x, stats, caches = scan_periods(self.stack, x, caches, deterministic, cfg.remat, **kw)
        if self.prefix is not None and caches is not None:
            caches = tuple(pre) + tuple(caches)
        x = self.norm(x)
        if self.lm_head is None:
            logits = self.embed.attend(x)
        else:
            logits = x @ self.lm_head[...].astype(x.dtype)
        return logits.astype(jnp.float32), DecoderAux(moe=stats), caches
