"""Encoder-decoder transformers with scanned periods: T5 / Switch Transformer and NLLB-MoE.

T5 / Switch (the defaults): pre-norm T5 RMSNorm, T5 relative position bias (computed once per
stack from a single table and shared by every block, as in T5), unscaled attention, ReLU FFNs,
tied embeddings with logits rescaled by ``d_model ** -0.5``. NLLB-MoE: pre-LN LayerNorm with bias,
sinusoidal positions (fairseq offset), scaled attention and FFNs with biases, embeddings scaled by
``sqrt(d_model)``, top-2 experts with expert output masking. Shape letters (README legend): ``b`` batch, ``s``
decoder length, ``m`` encoder length (or a decoder cache's length), ``d`` d_model, ``h`` heads, ``x``
head dim, ``v`` vocab.
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
from flax import nnx

from moejax.models.config import EncDecConfig
from moejax.models.layers import Attention, Embed, LayerNorm, RMSNorm, param, sinusoidal_positions
from moejax.models.stack import EncDecAux, Period, empty_caches, scan_periods
from moejax.moe import DenseFFN, MoeLayer
from moejax.sharding import stack_modules


def make_norm(cfg: EncDecConfig):
    """The config's norm: fairseq LayerNorm (``norm='layer'``) or T5 RMSNorm (``'rms'``)."""
    if cfg.norm == "layer":
        return LayerNorm(cfg.d_model, eps=cfg.norm_eps, param_dtype=cfg.param_dtype)
    return RMSNorm(cfg.d_model, eps=cfg.norm_eps, param_dtype=cfg.param_dtype)


def relative_position_bucket(rel: jax.Array, bidirectional: bool, num_buckets: int, max_distance: int) -> jax.Array:
    """T5 bucketing of ``rel = key_pos - query_pos``: exact for small distances, log-spaced up to
    ``max_distance``; bidirectional splits the buckets between the two directions."""
    ret = jnp.zeros_like(rel)
    if bidirectional:
        num_buckets //= 2
        ret = ret + (rel > 0).astype(rel.dtype) * num_buckets
        n = jnp.abs(rel)
    else:
        n = -jnp.minimum(rel, 0)
    max_exact = num_buckets // 2
    is_small = n < max_exact
    large = max_exact + (jnp.log(jnp.maximum(n, 1).astype(jnp.float32) / max_exact)
                         / math.log(max_distance / max_exact) * (num_buckets - max_exact)).astype(rel.dtype)
    large = jnp.minimum(large, num_buckets - 1)
    return ret + jnp.where(is_small, n, large)


class RelativeBias(nnx.Module):
    """The T5 relative-position bias table ``[buckets, h]``; returns an additive ``[1, h, s, m]``."""

    def __init__(self, buckets: int, heads: int, max_distance: int, bidirectional: bool, *, param_dtype, rngs):
        self.embedding = param(rngs, nnx.initializers.normal(1.0), (buckets, heads), param_dtype,
                                ("unmodeled", "heads"))
        self.buckets, self.max_distance, self.bidirectional = buckets, max_distance, bidirectional

    def __call__(self, q_pos: jax.Array, k_pos: jax.Array) -> jax.Array:
        """``q_pos [s]``, ``k_pos [m]`` int positions -> bias ``[1, h, s, m]``."""
        rel = k_pos[None, :] - q_pos[:, None]
        b = relative_position_bucket(rel, self.bidirectional, self.buckets, self.max_distance)
        return jnp.transpose(self.embedding[...][b], (2, 0, 1))[None].astype(jnp.float32)


class EncDecBlock(nnx.Module):
    """Encoder block (self-attention, FFN) or decoder block (+ cross-attention), pre-norm."""

    def __init__(self, cfg: EncDecConfig, sparse: bool, decoder: bool, *, rngs: nnx.Rngs):
        kw = dict(dtype=cfg.dtype, param_dtype=cfg.param_dtype, rngs=rngs)
        # T5 folds the attention scale into its init (unscaled, bias-free); NLLB scales and has biases
        akw = dict(use_bias=cfg.attn_bias, rope_theta=None, scale=cfg.head_dim**-0.5 if cfg.attn_scaled else 1.0,
                   init="normal", impl=cfg.attention_impl, chunk=cfg.attention_chunk, **kw)
        self.self_norm = make_norm(cfg)
        self.self_attn = Attention(cfg.d_model, cfg.num_heads, cfg.num_heads, cfg.head_dim, **akw)
        self.cross_norm = make_norm(cfg) if decoder else None
        self.cross_attn = Attention(cfg.d_model, cfg.num_heads, cfg.num_heads, cfg.head_dim, **akw) if decoder else None
        self.ffn_norm = make_norm(cfg)
        self.sparse = sparse
        self.ffn = MoeLayer(cfg.moe, rngs=rngs) if sparse else DenseFFN(
            cfg.d_model, cfg.d_ff, activation=cfg.activation, use_bias=cfg.ffn_bias, **kw)

    def __call__(self, x, *, bias, mask, enc=None, enc_mask=None, padding_mask=None, deterministic=True, cache=None,
                 task_ids=None):
        """Returns ``(x, moe_stats or None, new_cache or None)``."""
        h = self.self_norm(x)
        a = self.self_attn(h, bias=bias, mask=mask, cache=cache)
        if cache is not None:
            a, cache = a
        x = x + a.astype(x.dtype)
        if self.cross_attn is not None:
            x = x + self.cross_attn(self.cross_norm(x), kv=enc, mask=enc_mask).astype(x.dtype)
        h = self.ffn_norm(x)
        stats = None
        if self.sparse:
            y, stats = self.ffn(h, padding_mask=padding_mask, deterministic=deterministic, task_ids=task_ids)
        else:
            y = self.ffn(h)
        return x + y.astype(x.dtype), stats, cache


class Stack(nnx.Module):
    """An encoder or decoder stack: relative bias table, scanned periods, final norm."""

    def __init__(self, cfg: EncDecConfig, decoder: bool, *, rngs: nnx.Rngs):
        layers = cfg.num_decoder_layers if decoder else cfg.num_encoder_layers
        self.relpos = RelativeBias(cfg.relpos_buckets, cfg.num_heads, cfg.relpos_max_distance, not decoder,
                                   param_dtype=cfg.param_dtype, rngs=rngs) if cfg.positions == "relative" else None
        self.stack = stack_modules(
            lambda r: Period([EncDecBlock(cfg, cfg.is_sparse(j, decoder), decoder, rngs=r)
                              for j in range(cfg.period(decoder))]),
            layers // cfg.period(decoder), rngs, "layers")
        self.final_norm = make_norm(cfg)
        self.decoder = decoder
        self.remat = cfg.remat

    def __call__(self, x, *, mask, padding_mask, enc=None, enc_mask=None, deterministic=True, caches=None,
                 task_ids=None):
        """Returns ``(x, stacked MoeStats or None, new caches or None)``. With ``caches`` (decoder
        only), ``x`` holds the new tokens at positions ``index .. index + s - 1`` and ``mask`` is
        built here (causal over the cache)."""
        s = x.shape[1]
        if caches is None:
            q_pos = k_pos = jnp.arange(s)
        else:
            start = caches[0].index[0]
            q_pos = start + jnp.arange(s)
            k_pos = jnp.arange(caches[0].k.shape[2])
            mask = (k_pos[None, :] <= q_pos[:, None])[None, None]
        bias = None if self.relpos is None else self.relpos(q_pos, k_pos)
        x, stats, caches = scan_periods(self.stack, x, caches, deterministic, self.remat, bias=bias, mask=mask, enc=enc,
                                        enc_mask=enc_mask, padding_mask=padding_mask, task_ids=task_ids)
        return self.final_norm(x), stats, caches


class EncoderDecoder(nnx.Module):
    """``logits, aux = model(encoder_ids [b, m], decoder_ids [b, s], encoder_mask=None,
    decoder_mask=None, deterministic=True)`` with ``logits [b, s, v]`` float32.

    Masks are bool, True for real tokens (T5 pads with id 0). The decoder is causal.
    """

    def __init__(self, cfg: EncDecConfig, *, rngs: nnx.Rngs):
        cfg.validate()
        self.cfg = cfg
        self.embed = Embed(cfg.vocab_size, cfg.d_model, param_dtype=cfg.param_dtype, rngs=rngs)
        self.encoder = Stack(cfg, False, rngs=rngs)
        self.decoder = Stack(cfg, True, rngs=rngs)
        self.lm_head = None if cfg.tie_embeddings else param(
            rngs, nnx.initializers.variance_scaling(1.0, "fan_in", "truncated_normal"),
            (cfg.d_model, cfg.vocab_size), cfg.param_dtype, ("embed", "vocab"))

    def _embed(self, ids, mask, offset=0):
        cfg = self.cfg
        x = self.embed(ids, cfg.dtype)
        if cfg.embed_scale:
            x = x * jnp.asarray(math.sqrt(cfg.d_model), x.dtype)
        if cfg.positions == "sinusoidal":
            # fairseq position ids: 1-based count of real tokens, offset by the padding id
            pos = jnp.where(mask, jnp.cumsum(mask, axis=1) + offset, 0) + cfg.pad_id
            x = x + sinusoidal_positions(pos, cfg.d_model, cfg.pad_id).astype(x.dtype)
        return x

    def encode(self, ids, mask=None, deterministic=True, task_ids=None):
        """``ids [b, m]`` -> ``(encoded [b, m, d], encoder MoeStats)``."""
        b, t = ids.shape
        mask = jnp.ones((b, t), bool) if mask is None else mask.astype(bool)
        x = self._embed(ids, mask)
        x, stats, _ = self.encoder(x, mask=mask[:, None, None, :], padding_mask=mask, deterministic=deterministic,
                                   task_ids=task_ids)
        return x, stats

    def init_cache(self, batch: int, max_length: int) -> tuple:
        """Empty decoder self-attention caches (one per block of a period, stacked over periods)."""
        cfg = self.cfg
        return empty_caches(cfg.num_decoder_layers // cfg.period(True), cfg.period(True), batch, max_length,
                            cfg.num_heads, cfg.head_dim, cfg.dtype)

    def decode(self, enc, enc_mask, ids, mask=None, deterministic=True, caches=None, task_ids=None):
        """Teacher-forced decoder pass -> ``(logits [b, s, v], decoder MoeStats)``; with ``caches``
        (from :meth:`init_cache`) it appends ``ids`` to the cache and returns
        ``(logits, stats, new_caches)``."""
        b, s = ids.shape
        mask = jnp.ones((b, s), bool) if mask is None else mask.astype(bool)
        causal = jnp.tril(jnp.ones((s, s), bool))[None, None] & mask[:, None, None, :]
        offset = 0 if caches is None else caches[0].index[0]
        x = self._embed(ids, mask, offset)
        x, stats, new_caches = self.decoder(x, mask=causal, padding_mask=mask, enc=enc,
                                            enc_mask=enc_mask[:, None, None, :], deterministic=deterministic,
                                            caches=caches, task_ids=task_ids)
        if self.lm_head is None:
            logits = self.embed.attend(x * self.cfg.d_model**-0.5 if self.cfg.scale_tied_logits else x)
        else:
            logits = x @ self.lm_head[...].astype(x.dtype)
        if caches is not None:
            return logits.astype(jnp.float32), stats, new_caches
        return logits.astype(jnp.float32), stats

    def __call__(self, encoder_ids, decoder_ids, *, encoder_mask=None, decoder_mask=None, deterministic=True,
                 task_ids=None):
        for name, ids in (("encoder_ids", encoder_ids), ("decoder_ids", decoder_ids)):
            if ids.ndim != 2:
                raise ValueError(f"{name} must have rank 2 [batch, length]; got shape {ids.shape}")
        b, t = encoder_ids.shape
        enc_mask = jnp.ones((b, t), bool) if encoder_mask is None else encoder_mask.astype(bool)
        enc, enc_stats = self.encode(encoder_ids, enc_mask, deterministic, task_ids)
        logits, dec_stats = self.decode(enc, enc_mask, decoder_ids, decoder_mask, deterministic, task_ids=task_ids)
        return logits, EncDecAux(encoder=enc_stats, decoder=dec_stats)
