"""Shared model pieces: RMSNorm, embeddings, rotary positions, GQA attention, dense MLP.

Shape letters (README legend): ``b`` batch, ``s`` query length, ``m`` key
(memory) length, ``d`` d_model, ``h`` heads, ``j`` kv heads, ``x`` head dim, ``f`` d_ff, ``v`` vocab.
"""

from __future__ import annotations

import dataclasses
import math

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx, struct

from moejax.models.attend import Structure, attend, check_impl


def param(rngs, init, shape, dtype, axes):
    """An ``nnx.Param`` of ``init(rngs.params(), shape, dtype)`` with ``logical_axes`` metadata."""
    return nnx.Param(init(rngs.params(), shape, dtype), logical_axes=axes)


class RMSNorm(nnx.Module):
    """``x * rsqrt(mean(x^2) + eps) * scale``, variance in float32 (T5 / Llama / Mixtral)."""

    def __init__(self, d: int, *, eps: float = 1e-6, param_dtype=jnp.float32, axis: str | None = "embed"):
        self.scale = nnx.Param(jnp.ones((d,), param_dtype), logical_axes=(axis,))
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


@dataclasses.dataclass(frozen=True)
class Yarn:
    """YaRN RoPE scaling (Peng et al. 2023) as transformers computes it (``rope_type: yarn``):
    frequencies blended between interpolated (``/ factor``) and original ones by a linear ramp
    over the dims whose wavelengths fall between ``beta_fast`` and ``beta_slow`` rotations in
    ``original_max_position`` tokens (floor / ceil of the range when ``truncate``); cos and sin
    times ``attention_factor`` (default: ``mscale(factor, mscale) / mscale(factor, mscale_all_dim)``
    when both are set, else ``mscale(factor)``, with ``mscale(f, m) = 0.1 m ln f + 1``)."""

    factor: float
    original_max_position: int
    beta_fast: float = 32.0
    beta_slow: float = 1.0
    mscale: float = 0.0
    mscale_all_dim: float = 0.0
    truncate: bool = True
    attention_factor: float | None = None

    def validate(self) -> Yarn:
        if not self.factor >= 1.0:
            raise ValueError(f"YaRN factor must be >= 1, got {self.factor}")
        if self.original_max_position < 1:
            raise ValueError(f"YaRN original_max_position must be >= 1, got {self.original_max_position}")
        if not self.beta_fast >= self.beta_slow > 0:     # equal betas (Kimi-K2): the ramp spans one dim
            raise ValueError(f"YaRN needs beta_fast >= beta_slow > 0, got {self.beta_fast}, {self.beta_slow}")
        return self

    @staticmethod
    def get_mscale(factor: float, m: float = 1.0) -> float:
        return 1.0 if factor <= 1 else 0.1 * m * math.log(factor) + 1.0

    def cos_sin_factor(self) -> float:
        if self.attention_factor is not None:
            return float(self.attention_factor)
        if self.mscale and self.mscale_all_dim:
            return self.get_mscale(self.factor, self.mscale) / self.get_mscale(self.factor, self.mscale_all_dim)
        return self.get_mscale(self.factor)

    def inv_freq(self, dim: int, theta: float) -> np.ndarray:
        """``[dim / 2]`` float32 inverse frequencies."""
        def corr(rot):
            return dim * math.log(self.original_max_position / (rot * 2 * math.pi)) / (2 * math.log(theta))

        low, high = corr(self.beta_fast), corr(self.beta_slow)
        if self.truncate:
            low, high = math.floor(low), math.ceil(high)
        low, high = max(low, 0), min(high, dim - 1)
        if low == high:
            high += 0.001
        ramp = np.clip((np.arange(dim // 2, dtype=np.float32) - low) / (high - low), 0, 1)
        pos = theta ** (np.arange(0, dim, 2, dtype=np.float32) / dim)
        extra = 1 - ramp
        return ((1.0 / (self.factor * pos)) * (1 - extra) + (1.0 / pos) * extra).astype(np.float32)


@dataclasses.dataclass(frozen=True)
class Llama3Rope:
    """Llama 3.1's RoPE scaling as transformers computes it (``rope_type: llama3``): wavelengths
    longer than ``original_max_position / low_freq_factor`` are divided by ``factor``, those
    shorter than ``original_max_position / high_freq_factor`` kept, and the band between blended
    linearly in ``original_max_position / wavelength``; cos and sin are not rescaled."""

    factor: float
    low_freq_factor: float
    high_freq_factor: float
    original_max_position: int

    def validate(self) -> Llama3Rope:
        if not self.factor >= 1.0:
            raise ValueError(f"llama3 RoPE factor must be >= 1, got {self.factor}")
        if not self.high_freq_factor > self.low_freq_factor > 0:
            raise ValueError(f"llama3 RoPE needs high_freq_factor > low_freq_factor > 0, got "
                             f"{self.high_freq_factor}, {self.low_freq_factor}")
        if self.original_max_position < 1:
            raise ValueError(f"llama3 RoPE original_max_position must be >= 1, got {self.original_max_position}")
        return self

    def cos_sin_factor(self) -> float:
        return 1.0

    def inv_freq(self, dim: int, theta: float) -> np.ndarray:
        """``[dim / 2]`` float32 inverse frequencies."""
        inv = (1.0 / np.float32(theta) ** (np.arange(0, dim, 2, dtype=np.float32) / np.float32(dim))).astype(np.float32)
        wavelen = np.float32(2 * math.pi) / inv
        low_wavelen = self.original_max_position / self.low_freq_factor
        high_wavelen = self.original_max_position / self.high_freq_factor
        scaled = np.where(wavelen > low_wavelen, inv / np.float32(self.factor), inv)
        smooth = (self.original_max_position / wavelen - self.low_freq_factor) / (
            self.high_freq_factor - self.low_freq_factor)
        smoothed = (1 - smooth) * scaled / np.float32(self.factor) + smooth * scaled
        medium = ~(wavelen < high_wavelen) & ~(wavelen > low_wavelen)
        return np.where(medium, smoothed, scaled).astype(np.float32)


def rope_tables(positions: jax.Array, head_dim: int, theta: float,
                scaling: Yarn | Llama3Rope | None = None) -> tuple[jax.Array, jax.Array]:
    """cos, sin ``[b, s, x]`` for rotate-half RoPE (the HF Llama / Mixtral layout); with a
    ``scaling`` (YaRN, llama3), its frequencies and cos/sin factor."""
    if scaling is None:
        inv_freq, factor = 1.0 / (theta ** (jnp.arange(0, head_dim, 2, dtype=jnp.float32) / head_dim)), 1.0
    else:
        inv_freq, factor = jnp.asarray(scaling.inv_freq(head_dim, theta)), scaling.cos_sin_factor()
    freqs = positions.astype(jnp.float32)[..., None] * inv_freq  # [b, s, x/2]
    emb = jnp.concatenate([freqs, freqs], axis=-1)
    if factor == 1.0:
        return jnp.cos(emb), jnp.sin(emb)
    return jnp.cos(emb) * factor, jnp.sin(emb) * factor


def apply_rope(x: jax.Array, cos: jax.Array, sin: jax.Array) -> jax.Array:
    """``x [b, s, h, x]``; ``x*cos + rotate_half(x)*sin``."""
    half = x.shape[-1] // 2
    rot = jnp.concatenate([-x[..., half:], x[..., :half]], axis=-1)
    return (x * cos[:, :, None, :] + rot * sin[:, :, None, :]).astype(x.dtype)


QK_NORMS = ("none", "head", "full")


def check_qk_norm(qk_norm: str) -> None:
    if qk_norm not in QK_NORMS:
        raise ValueError(f"unknown qk_norm {qk_norm!r}; valid: {', '.join(QK_NORMS)}")


class Attention(nnx.Module):
    """Multi-head / grouped-query attention, the one attention module of every family.

    Self-attention (``kv`` None) or cross-attention (``kv [b, m, d]``); RoPE when ``rope_theta`` is
    set (Llama / Mistral / Mixtral / OpenMoE), none for T5 / NLLB (their position information is an
    additive ``bias`` or is in the embeddings). Params: ``q [d, h, x]``, ``k``/``v [d, j, x]``,
    ``o [h, x, d]`` (logical ``('embed', 'heads', 'kv')`` / ``('heads', 'kv', 'embed')``), optional
    biases; kernels drawn from a fan-in variance-scaling ``init`` distribution (``truncated_normal``,
    or ``normal`` as T5 / fairseq). Scores are ``q.k * scale`` (default ``x^-0.5``; T5 and T5X-trained
    OpenMoE use 1.0) plus ``bias``, soft-maxed in float32, by the kernel ``impl`` (``xla``,
    ``chunked`` in query blocks of ``chunk``, ``dot_product``, ``auto``: :mod:`moejax.models.attend`).

    Projection variants of today's decoder families: ``use_bias`` biases q, k, v and (unless
    ``out_bias=False``: Qwen2-MoE) o; ``qk_norm`` RMS-normalises queries and keys before RoPE,
    ``'head'`` over each head's ``x`` dims (Qwen3-MoE; scales ``[x]``) or ``'full'`` over the whole
    projection (OLMoE; scales ``[h*x]`` and ``[j*x]``), with ``norm_eps``; ``qkv_clip`` clamps q, k
    and v to ``[-c, c]`` after the norms (OLMoE's ``clip_qkv``). ``rope_scaling``: a :class:`Yarn`.
    ``sinks``: gpt-oss's per-head attention-sink logits (param ``sinks [h]``, see
    :func:`moejax.models.attend.attend`).
    """

    def __init__(self, d: int, num_heads: int, num_kv_heads: int, head_dim: int, *, use_bias: bool = False,
                 rope_theta: float | None = 10000.0, sliding_window: int | None = None, scale: float | None = None,
                 init: str = "truncated_normal", impl: str = "xla", chunk: int = 512, out_bias: bool | None = None,
                 qk_norm: str = "none", norm_eps: float = 1e-6, qkv_clip: float | None = None,
                 rope_scaling: Yarn | None = None, sinks: bool = False, dtype=jnp.float32, param_dtype=jnp.float32,
                 rngs: nnx.Rngs):
        check_impl(impl, chunk)
        check_qk_norm(qk_norm)
        if num_heads % num_kv_heads:
            raise ValueError(f"num_heads={num_heads} must be a multiple of num_kv_heads={num_kv_heads}")
        qinit = nnx.initializers.variance_scaling(1.0, "fan_in", init, in_axis=0, out_axis=(1, 2))
        self.q = param(rngs, qinit, (d, num_heads, head_dim), param_dtype, ("embed", "heads", "kv"))
        self.k = param(rngs, qinit, (d, num_kv_heads, head_dim), param_dtype, ("embed", "heads", "kv"))
        self.v = param(rngs, qinit, (d, num_kv_heads, head_dim), param_dtype, ("embed", "heads", "kv"))
        oinit = nnx.initializers.variance_scaling(1.0, "fan_in", init, in_axis=(0, 1), out_axis=2)
        self.o = param(rngs, oinit, (num_heads, head_dim, d), param_dtype, ("heads", "kv", "embed"))
        self.use_bias = use_bias
        self.out_bias = use_bias if out_bias is None else bool(out_bias and use_bias)
        z = nnx.initializers.zeros
        if use_bias:
            self.q_bias = param(rngs, z, (num_heads, head_dim), param_dtype, ("heads", "kv"))
            self.k_bias = param(rngs, z, (num_kv_heads, head_dim), param_dtype, ("heads", "kv"))
            self.v_bias = param(rngs, z, (num_kv_heads, head_dim), param_dtype, ("heads", "kv"))
        if self.out_bias:
            self.o_bias = param(rngs, z, (d,), param_dtype, ("embed",))
        self.qk_norm, self.qkv_clip = qk_norm, qkv_clip
        if qk_norm != "none":
            qd, kd = (head_dim, head_dim) if qk_norm == "head" else (num_heads * head_dim, num_kv_heads * head_dim)
            self.q_norm = RMSNorm(qd, eps=norm_eps, param_dtype=param_dtype, axis="kv")
            self.k_norm = RMSNorm(kd, eps=norm_eps, param_dtype=param_dtype, axis="kv")
        self.num_heads, self.num_kv_heads, self.head_dim = num_heads, num_kv_heads, head_dim
        self.rope_theta, self.sliding_window, self.dtype = rope_theta, sliding_window, dtype
        self.rope_scaling = rope_scaling
        self.sinks = param(rngs, nnx.initializers.zeros, (num_heads,), param_dtype, ("heads",)) if sinks else None
        self.scale = head_dim**-0.5 if scale is None else float(scale)
        self.impl, self.chunk = impl, chunk

    def __call__(self, x: jax.Array, *, positions: jax.Array | None = None, padding_mask: jax.Array | None = None,
                 causal: bool = True, kv: jax.Array | None = None, bias: jax.Array | None = None,
                 mask: jax.Array | None = None, cache: KVCache | None = None):
        """``x [b, s, d]`` -> ``[b, s, d]``.

        Masking: an explicit boolean ``mask`` broadcastable to ``[b, h, s, m]`` (e.g. ``[b, 1, s|1, m]``)
        is used as given; otherwise the mask is built from ``padding_mask [b, m]`` (real keys), the
        query / key ``positions [b, s]`` (``causal``) and the sliding window. ``bias [1|b, h, s, m]``:
        an additive score bias (T5 relative positions). ``positions`` also drive RoPE; left out they
        are the token indices (continuing from the cache's index), which lets ``attention_impl``
        ``'splash'`` / ``'auto'`` on TPU run a block-sparse kernel on the causal / window structure.

        With ``cache`` (a :class:`KVCache` of length ``m``), the new keys / values are written at
        ``cache.index`` (at ``positions``, or ``index + 0..s-1``) and attention runs over the whole
        cache; returns ``(y, new_cache)``.
        """
        dt = self.dtype
        x = x.astype(dt)
        src = x if kv is None else kv.astype(dt)
        q = jnp.einsum("bsd,dhx->bshx", x, self.q[...].astype(dt))
        k = jnp.einsum("bmd,djx->bmjx", src, self.k[...].astype(dt))
        v = jnp.einsum("bmd,djx->bmjx", src, self.v[...].astype(dt))
        if self.use_bias:
            q, k, v = q + self.q_bias[...].astype(dt), k + self.k_bias[...].astype(dt), v + self.v_bias[...].astype(dt)
        if self.qk_norm == "head":
            q, k = self.q_norm(q), self.k_norm(k)
        elif self.qk_norm == "full":
            q = self.q_norm(q.reshape(q.shape[:2] + (-1,))).reshape(q.shape)
            k = self.k_norm(k.reshape(k.shape[:2] + (-1,))).reshape(k.shape)
        if self.qkv_clip is not None:
            c = self.qkv_clip
            q, k, v = jnp.clip(q, -c, c), jnp.clip(k, -c, c), jnp.clip(v, -c, c)
        b, s = x.shape[:2]
        # positions left out of a cacheless self-attention are the token indices (what block-sparse
        # kernels need to know); with a cache they continue from its index
        indexed = positions is None and cache is None and kv is None and mask is None
        if positions is None:
            start = 0 if cache is None else cache.index
            positions = jnp.broadcast_to(start + jnp.arange(s, dtype=jnp.int32), (b, s))
        if self.rope_theta is not None:
            cos, sin = rope_tables(positions, self.head_dim, self.rope_theta, self.rope_scaling)
            q, k = apply_rope(q, cos, sin), apply_rope(k, cos, sin)
        key_valid = jnp.ones(k.shape[:2], bool) if padding_mask is None else padding_mask
        kpos = positions
        if cache is not None:
            if kpos is None:
                kpos = jnp.broadcast_to(cache.index + jnp.arange(s, dtype=jnp.int32), (b, s))
            new = cache.write(k, v, key_valid, kpos)
            if cache.ring:       # attend over the window held before this write plus the new entries
                k = jnp.concatenate([cache.k.astype(dt), k], axis=1)
                v = jnp.concatenate([cache.v.astype(dt), v], axis=1)
                key_valid = jnp.concatenate([cache.valid, key_valid], axis=1)
                kpos = jnp.concatenate([cache.pos, kpos.astype(jnp.int32)], axis=1)
            else:
                k, v, key_valid, kpos = new.k.astype(dt), new.v.astype(dt), new.valid, new.pos
            cache = new
        if mask is None:
            mask = self_mask(key_valid, positions, kpos, causal, self.sliding_window)
        structure = Structure(causal, self.sliding_window, key_valid) if indexed else None
        out = attend(q, k, v, mask=mask, bias=bias, scale=self.scale, dtype=dt, impl=self.impl, chunk=self.chunk,
                     sinks=None if self.sinks is None else self.sinks[...], structure=structure)
        y = jnp.einsum("bshx,hxd->bsd", out, self.o[...].astype(dt))
        if self.out_bias:
            y = y + self.o_bias[...].astype(dt)
        return y if cache is None else (y, cache)


def self_mask(key_valid: jax.Array, positions: jax.Array | None, kpos: jax.Array | None, causal: bool,
              window: int | None) -> jax.Array:
    """Boolean attention mask ``[b, 1, s|1, m]`` from ``key_valid [b, m]`` (real keys), query /
    key positions ``[b, s]`` / ``[b, m]`` (``causal``: keys at or before the query) and a sliding
    ``window`` (keys fewer than ``window`` positions back)."""
    mask = key_valid[:, None, :]
    if causal or window is not None:
        qp, kp = positions[:, :, None], kpos[:, None, :]
        if causal:
            mask = mask & (kp <= qp)
        if window is not None:
            mask = mask & (qp - kp < window)
    return mask[:, None]


@struct.dataclass
class KVCache:
    """Static-shape key/value cache of one attention layer.

    ``k``, ``v [b, m, j, x]``; ``valid [b, m]`` (slot holds a real token); ``pos [b, m]`` (its
    position); ``index`` int32 scalar: how many entries were written (the next slot, modulo ``m``
    for a ring). ``ring`` (static): a sliding-window cache of ``m = window`` slots that overwrites
    the oldest entry (entry ``i`` lives in slot ``i % m``), so decoding a Mistral / Mixtral-style
    model holds the window, not the whole sequence.
    """

    k: jax.Array
    v: jax.Array
    valid: jax.Array
    pos: jax.Array
    index: jax.Array
    ring: bool = struct.field(pytree_node=False, default=False)

    @classmethod
    def zeros(cls, batch: int, length: int, kv_heads: int, head_dim: int, dtype=jnp.float32,
              ring: bool = False, v_dim: int | None = None) -> KVCache:
        """Empty cache; ``v_dim`` (default ``head_dim``): the last dim of ``v`` when it differs (the
        latent cache of :class:`moejax.models.mla.MLAttention` holds ``c_kv`` as ``k`` and the
        shared RoPE key as ``v``)."""
        z = jnp.zeros((batch, length, kv_heads, head_dim), dtype)
        zv = z if v_dim is None else jnp.zeros((batch, length, kv_heads, v_dim), dtype)
        return cls(k=z, v=zv, valid=jnp.zeros((batch, length), bool), pos=jnp.zeros((batch, length), jnp.int32),
                   index=jnp.zeros((), jnp.int32), ring=ring)

    def write(self, k, v, valid, pos) -> KVCache:
        """Append ``s`` new entries (``k``/``v [b, s, j, x]``) at ``index`` (a ring keeps the last ``m``)."""
        i = self.index
        k, v, pos = k.astype(self.k.dtype), v.astype(self.v.dtype), pos.astype(jnp.int32)
        if not self.ring:
            upd = jax.lax.dynamic_update_slice
            return self.replace(k=upd(self.k, k, (0, i, 0, 0)), v=upd(self.v, v, (0, i, 0, 0)),
                                valid=upd(self.valid, valid, (0, i)), pos=upd(self.pos, pos, (0, i)),
                                index=i + k.shape[1])
        m, s = self.k.shape[1], k.shape[1]
        drop = max(s - m, 0)                                   # only the last m entries survive
        k, v, valid, pos = k[:, drop:], v[:, drop:], valid[:, drop:], pos[:, drop:]
        slots = (i + drop + jnp.arange(s - drop)) % m
        return self.replace(k=self.k.at[:, slots].set(k), v=self.v.at[:, slots].set(v),
                            valid=self.valid.at[:, slots].set(valid), pos=self.pos.at[:, slots].set(pos),
                            index=i + s)
