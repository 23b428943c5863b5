"""Shared model pieces: RMSNorm, embeddings, rotary positions, GQA attention, dense MLP.

Letters: ``b`` batch, ``s`` query length, ``t`` key length, ``d`` d_model, ``h`` heads,
``k`` kv heads, ``x`` head dim, ``f`` d_ff, ``v`` vocab.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import nnx, struct

from moejax.moe.experts import activation_fn, gate_width


def param(rngs, init, shape, dtype, axes):
    """An ``nnx.Param`` of ``init(rngs.params(), shape, dtype)`` with ``logical_axes`` metadata."""
    return nnx.Param(init(rngs.params(), shape, dtype), logical_axes=axes)


class RMSNorm(nnx.Module):
    """``x * rsqrt(mean(x^2) + eps) * scale``, variance in float32 (T5 / Llama / Mixtral)."""

    def __init__(self, d: int, *, eps: float = 1e-6, param_dtype=jnp.float32):
        self.scale = nnx.Param(jnp.ones((d,), param_dtype), logical_axes=("embed",))
        self.eps = eps

    def __call__(self, x: jax.Array) -> jax.Array:
        """``x [..., d]`` -> same shape and dtype."""
        xf = x.astype(jnp.float32)
        y = xf * jax.lax.rsqrt(jnp.mean(xf * xf, axis=-1, keepdims=True) + self.eps)
        return (y.astype(x.dtype) * self.scale[...].astype(x.dtype)).astype(x.dtype)


class LayerNorm(nnx.Module):
    """``(x - mean) * rsqrt(var + eps) * scale + bias``, statistics in float32 (NLLB / fairseq)."""

    def __init__(self, d: int, *, eps: float = 1e-5, param_dtype=jnp.float32):
        self.scale = nnx.Param(jnp.ones((d,), param_dtype), logical_axes=("embed",))
        self.bias = nnx.Param(jnp.zeros((d,), param_dtype), logical_axes=("embed",))
        self.eps = eps

    def __call__(self, x: jax.Array) -> jax.Array:
        xf = x.astype(jnp.float32)
        mean = jnp.mean(xf, axis=-1, keepdims=True)
        var = jnp.mean(jnp.square(xf - mean), axis=-1, keepdims=True)
        y = (xf - mean) * jax.lax.rsqrt(var + self.eps)
        return (y * self.scale[...].astype(jnp.float32) + self.bias[...].astype(jnp.float32)).astype(x.dtype)


def sinusoidal_positions(positions: jax.Array, d: int, padding_idx: int | None = None) -> jax.Array:
    """fairseq / NLLB sinusoidal table rows ``[..., d]`` for integer ``positions`` (sin half, then
    cos half; row ``padding_idx`` is zero)."""
    half = d // 2
    freq = jnp.exp(jnp.arange(half, dtype=jnp.float32) * -(jnp.log(10000.0) / (half - 1)))
    ang = positions.astype(jnp.float32)[..., None] * freq
    emb = jnp.concatenate([jnp.sin(ang), jnp.cos(ang)], axis=-1)
    if d % 2:
        emb = jnp.concatenate([emb, jnp.zeros(emb.shape[:-1] + (1,), emb.dtype)], axis=-1)
    if padding_idx is not None:
        emb = jnp.where((positions == padding_idx)[..., None], 0.0, emb)
    return emb


class Embed(nnx.Module):
    """Token embedding ``[v, d]`` (logical ``('vocab', 'embed')``); ``attend`` gives tied logits."""

    def __init__(self, vocab: int, d: int, *, param_dtype=jnp.float32, init_std: float = 1.0, rngs: nnx.Rngs):
        self.embedding = param(rngs, nnx.initializers.normal(init_std), (vocab, d), param_dtype, ("vocab", "embed"))

    def __call__(self, ids: jax.Array, dtype=jnp.float32) -> jax.Array:
        """``ids [b, s]`` int -> ``[b, s, d]``."""
        return jnp.take(self.embedding[...], ids, axis=0).astype(dtype)

    def attend(self, x: jax.Array) -> jax.Array:
        """``x [b, s, d]`` -> logits ``[b, s, v]``."""
        return jnp.einsum("bsd,vd->bsv", x, self.embedding[...].astype(x.dtype))


def rope_tables(positions: jax.Array, head_dim: int, theta: float) -> tuple[jax.Array, jax.Array]:
    """cos, sin ``[b, s, x]`` for rotate-half RoPE (the HF Llama / Mixtral layout)."""
    inv_freq = 1.0 / (theta ** (jnp.arange(0, head_dim, 2, dtype=jnp.float32) / head_dim))
    freqs = positions.astype(jnp.float32)[..., None] * inv_freq  # [b, s, x/2]
    emb = jnp.concatenate([freqs, freqs], axis=-1)
    return jnp.cos(emb), jnp.sin(emb)


def apply_rope(x: jax.Array, cos: jax.Array, sin: jax.Array) -> jax.Array:
    """``x [b, s, h, x]``; ``x*cos + rotate_half(x)*sin``."""
    half = x.shape[-1] // 2
    rot = jnp.concatenate([-x[..., half:], x[..., :half]], axis=-1)
    return (x * cos[:, :, None, :] + rot * sin[:, :, None, :]).astype(x.dtype)


class Attention(nnx.Module):
    """Multi-head / grouped-query self-attention with RoPE, causal and padding masks.

    Params: ``q [d, h, x]``, ``k``/``v [d, k, x]``, ``o [h, x, d]`` (logical
    ``('embed', 'heads', 'kv')`` / ``('heads', 'kv', 'embed')``), optional biases. Scores are
    scaled by ``scale`` (default ``x^-0.5``; T5X-trained models such as OpenMoE use 1.0) and
    soft-maxed in float32.
    """

    def __init__(self, d: int, num_heads: int, num_kv_heads: int, head_dim: int, *, use_bias: bool = False,
                 rope_theta: float | None = 10000.0, sliding_window: int | None = None, scale: float | None = None,
                 dtype=jnp.float32, param_dtype=jnp.float32, rngs: nnx.Rngs):
        if num_heads % num_kv_heads:
            raise ValueError(f"num_heads={num_heads} must be a multiple of num_kv_heads={num_kv_heads}")
        init = nnx.initializers.variance_scaling(1.0, "fan_in", "truncated_normal", in_axis=0, out_axis=(1, 2))
        self.q = param(rngs, init, (d, num_heads, head_dim), param_dtype, ("embed", "heads", "kv"))
        self.k = param(rngs, init, (d, num_kv_heads, head_dim), param_dtype, ("embed", "heads", "kv"))
        self.v = param(rngs, init, (d, num_kv_heads, head_dim), param_dtype, ("embed", "heads", "kv"))
        oinit = nnx.initializers.variance_scaling(1.0, "fan_in", "truncated_normal", in_axis=(0, 1), out_axis=2)
        self.o = param(rngs, oinit, (num_heads, head_dim, d), param_dtype, ("heads", "kv", "embed"))
        self.use_bias = use_bias
        if use_bias:
            z = nnx.initializers.zeros
            self.q_bias = param(rngs, z, (num_heads, head_dim), param_dtype, ("heads", "kv"))
            self.k_bias = param(rngs, z, (num_kv_heads, head_dim), param_dtype, ("heads", "kv"))
            self.v_bias = param(rngs, z, (num_kv_heads, head_dim), param_dtype, ("heads", "kv"))
            self.o_bias = param(rngs, z, (d,), param_dtype, ("embed",))
        self.num_heads, self.num_kv_heads, self.head_dim = num_heads, num_kv_heads, head_dim
        self.rope_theta, self.sliding_window, self.dtype = rope_theta, sliding_window, dtype
        self.scale = head_dim**-0.5 if scale is None else float(scale)

    def __call__(self, x: jax.Array, *, positions: jax.Array, padding_mask: jax.Array | None = None,
                 causal: bool = True, cache: KVCache | None = None):
        """``x [b, s, d]``, ``positions [b, s]`` int, ``padding_mask [b, s]`` bool -> ``[b, s, d]``.

        With ``cache`` (a :class:`KVCache` of length ``T``), the new keys / values are written at
        ``cache.index`` and attention runs over the whole cache; returns ``(y, new_cache)``.
        """
        dt = self.dtype
        x = x.astype(dt)
        q = jnp.einsum("bsd,dhx->bshx", x, self.q[...].astype(dt))
        k = jnp.einsum("bsd,dkx->bskx", x, self.k[...].astype(dt))
        v = jnp.einsum("bsd,dkx->bskx", x, self.v[...].astype(dt))
        if self.use_bias:
            q, k, v = q + self.q_bias[...].astype(dt), k + self.k_bias[...].astype(dt), v + self.v_bias[...].astype(dt)
        if self.rope_theta is not None:
            cos, sin = rope_tables(positions, self.head_dim, self.rope_theta)
            q, k = apply_rope(q, cos, sin), apply_rope(k, cos, sin)
        b, s = x.shape[:2]
        key_valid = jnp.ones((b, s), bool) if padding_mask is None else padding_mask
        kpos = positions
        if cache is not None:
            cache = cache.write(k, v, key_valid, positions)
            k, v, key_valid, kpos = cache.k.astype(dt), cache.v.astype(dt), cache.valid, cache.pos
        groups = self.num_heads // self.num_kv_heads
        q = q.reshape(b, s, self.num_kv_heads, groups, self.head_dim)
        scores = jnp.einsum("bskgx,btkx->bkgst", q, k).astype(jnp.float32) * self.scale
        qp, kp = positions[:, :, None], kpos[:, None, :]
        mask = key_valid[:, None, :]
        if causal:
            mask = mask & (kp <= qp)
        if self.sliding_window is not None:
            mask = mask & (qp - kp < self.sliding_window)
        scores = jnp.where(mask[:, None, None], scores, jnp.finfo(jnp.float32).min)
        probs = jax.nn.softmax(scores, axis=-1).astype(dt)
        out = jnp.einsum("bkgst,btkx->bskgx", probs, v).reshape(b, s, self.num_heads, self.head_dim)
        y = jnp.einsum("bshx,hxd->bsd", out, self.o[...].astype(dt))
        if self.use_bias:
            y = y + self.o_bias[...].astype(dt)
        return y if cache is None else (y, cache)


@struct.dataclass
class KVCache:
    """Static-shape key/value cache of one attention layer.

    ``k``, ``v [b, T, k, x]``; ``valid [b, T]`` (slot holds a real token); ``pos [b, T]`` (its
    position); ``index`` int32 scalar: the next slot to write.
    """

    k: jax.Array
    v: jax.Array
    valid: jax.Array
    pos: jax.Array
    index: jax.Array

    @classmethod
    def zeros(cls, batch: int, length: int, kv_heads: int, head_dim: int, dtype=jnp.float32) -> KVCache:
        z = jnp.zeros((batch, length, kv_heads, head_dim), dtype)
        return cls(k=z, v=z, valid=jnp.zeros((batch, length), bool), pos=jnp.zeros((batch, length), jnp.int32),
                   index=jnp.zeros((), jnp.int32))

    def write(self, k, v, valid, pos) -> KVCache:
        """Append ``s`` new entries (``k``/``v [b, s, k, x]``) at ``index``."""
        i = self.index
        upd = jax.lax.dynamic_update_slice
        return KVCache(k=upd(self.k, k.astype(self.k.dtype), (0, i, 0, 0)),
                       v=upd(self.v, v.astype(self.v.dtype), (0, i, 0, 0)),
                       valid=upd(self.valid, valid, (0, i)), pos=upd(self.pos, pos.astype(jnp.int32), (0, i)),
                       index=i + k.shape[1])


class Mlp(nnx.Module):
    """Dense FFN ``wo(act(x wi))`` or gated ``wo(act(x wi_0) * x wi_1)``; ``[..., d] -> [..., d]``."""

    def __init__(self, d: int, f: int, *, activation: str = "swiglu", use_bias: bool = False, dtype=jnp.float32,
                 param_dtype=jnp.float32, rngs: nnx.Rngs):
        self.act, self.gated = activation_fn(activation)
        init = nnx.initializers.variance_scaling(1.0, "fan_in", "truncated_normal")
        if self.gated:
            self.wi_0 = param(rngs, init, (d, f * gate_width(activation)), param_dtype, ("embed", "mlp"))
            self.wi_1 = param(rngs, init, (d, f), param_dtype, ("embed", "mlp"))
        else:
            self.wi = param(rngs, init, (d, f), param_dtype, ("embed", "mlp"))
        self.wo = param(rngs, init, (f, d), param_dtype, ("mlp", "embed"))
        self.use_bias = use_bias
        if use_bias:
            self.bi = param(rngs, nnx.initializers.zeros, (f,), param_dtype, ("mlp",))
            self.bo = param(rngs, nnx.initializers.zeros, (d,), param_dtype, ("embed",))
        self.dtype = dtype

    def __call__(self, x: jax.Array) -> jax.Array:
        dt = self.dtype
        x = x.astype(dt)
        if self.gated:
            h = self.act(x @ self.wi_0[...].astype(dt)) * (x @ self.wi_1[...].astype(dt))
        else:
            pre = x @ self.wi[...].astype(dt)
            if self.use_bias:
                pre = pre + self.bi[...].astype(dt)
            h = self.act(pre)
        y = h @ self.wo[...].astype(dt)
        if self.use_bias:
            y = y + self.bo[...].astype(dt)
        return y
