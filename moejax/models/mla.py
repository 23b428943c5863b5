"""Multi-head Latent Attention (DeepSeek-V2/V3): low-rank queries and keys/values, a decoupled
RoPE key shared by all heads, and a KV cache that holds the compressed latent.

Shape letters (README legend): ``b`` batch, ``s`` query length, ``m`` key length, ``d`` d_model,
``h`` heads, ``n`` the no-RoPE part of a query/key head (``qk_nope_dim``), ``p`` its RoPE part
(``qk_rope_dim``), ``y`` value head dim, ``r`` the KV latent rank, ``q`` the query latent rank.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import nnx

from moejax.models.attend import attend, check_impl
from moejax.models.layers import KVCache, RMSNorm, Yarn, apply_rope, param, rope_tables, self_mask


class MLAttention(nnx.Module):
    """Multi-head latent attention (DeepSeek-V2 §2.1).

    Queries: ``x @ q [d, h, n+p]`` (``q_lora_rank`` None: V2-Lite) or ``RMSNorm(x @ q_a [d, q]) @
    q_b [q, h, n+p]`` (V2 / V3). Keys and values: ``x @ kv_a [d, r+p]`` splits into the latent
    ``c`` (RMS-normalised, ``kv_norm``) and one RoPE key ``k_pe [p]`` shared by every head; ``c @
    kv_b [r, h, n+y]`` gives each head's no-RoPE key and its value. Each head attends with query
    ``[q_nope | rope(q_pe)]`` and key ``[k_nope | rope(k_pe)]`` (dim ``n+p``) over values of dim
    ``y``; ``o [h, y, d]``. Scores ``q.k * scale`` (default ``(n+p)^-0.5``; DeepSeek with YaRN
    multiplies it by ``mscale(factor, mscale_all_dim)^2``, set by the converter), soft-maxed in
    float32 by the kernel ``impl``. RoPE is rotate-half over the ``p`` dims (the converter moves
    DeepSeek's interleaved pairs into that layout), optionally YaRN-scaled. The latent norms use
    ``latent_eps`` (transformers: 1e-6 whatever ``rms_norm_eps`` is).

    With ``cache`` (a :class:`KVCache` whose ``k [b, m, 1, r]`` holds the normalised latent and ``v
    [b, m, 1, p]`` the rotated RoPE key, :meth:`cache_dims`), the new entries are written at
    ``cache.index`` and the heads' keys and values are rebuilt from the cached latents: the cache
    holds ``r + p`` numbers per token instead of ``h * (n + p + y)``.
    """

    def __init__(self, d: int, num_heads: int, *, kv_lora_rank: int, qk_nope_dim: int, qk_rope_dim: int,
                 v_dim: int, q_lora_rank: int | None = None, rope_theta: float = 10000.0,
                 rope_scaling: Yarn | None = None, scale: float | None = None, latent_eps: float = 1e-6,
                 impl: str = "xla", chunk: int = 512, dtype=jnp.float32, param_dtype=jnp.float32, rngs: nnx.Rngs):
        check_impl(impl, chunk)
        if qk_rope_dim % 2:
            raise ValueError(f"qk_rope_dim={qk_rope_dim} must be even for rotary embeddings")
        h, n, p, y, r = num_heads, qk_nope_dim, qk_rope_dim, v_dim, kv_lora_rank
        init = lambda in_axis, out_axis: nnx.initializers.variance_scaling(1.0, "fan_in", "truncated_normal",
                                                                            in_axis=in_axis, out_axis=out_axis)
        if q_lora_rank is None:
            self.q = param(rngs, init(0, (1, 2)), (d, h, n + p), param_dtype, ("embed", "heads", "kv"))
            self.q_a = self.q_norm = self.q_b = None
        else:
            self.q = None
            self.q_a = param(rngs, init(0, 1), (d, q_lora_rank), param_dtype, ("embed", "unmodeled"))
            self.q_norm = RMSNorm(q_lora_rank, eps=latent_eps, param_dtype=param_dtype, axis="unmodeled")
            self.q_b = param(rngs, init(0, (1, 2)), (q_lora_rank, h, n + p), param_dtype, ("unmodeled", "heads", "kv"))
        self.kv_a = param(rngs, init(0, 1), (d, r + p), param_dtype, ("embed", "unmodeled"))
        self.kv_norm = RMSNorm(r, eps=latent_eps, param_dtype=param_dtype, axis="unmodeled")
        self.kv_b = param(rngs, init(0, (1, 2)), (r, h, n + y), param_dtype, ("unmodeled", "heads", "kv"))
        self.o = param(rngs, init((0, 1), 2), (h, y, d), param_dtype, ("heads", "kv", "embed"))
        self.num_heads, self.nope, self.rope, self.v_dim, self.rank = h, n, p, y, r
        self.rope_theta, self.rope_scaling, self.dtype = rope_theta, rope_scaling, dtype
        self.scale = (n + p) ** -0.5 if scale is None else float(scale)
        self.impl, self.chunk = impl, chunk

    def cache_dims(self) -> tuple[int, int]:
        """``(k dim, v dim)`` of this layer's latent :class:`KVCache` (``r`` and ``p``, one head)."""
        return self.rank, self.rope

    def __call__(self, x: jax.Array, *, positions: jax.Array | None = None, padding_mask: jax.Array | None = None,
                 causal: bool = True, cache: KVCache | None = None, **unused):
        """``x [b, s, d]`` -> ``[b, s, d]`` (``(y, new_cache)`` with ``cache``); masking as
        :class:`moejax.models.layers.Attention` (padding, positions, causal)."""
        if unused.get("mask") is not None or unused.get("kv") is not None or unused.get("bias") is not None:
            raise ValueError("MLAttention is causal self-attention: an explicit mask, kv or bias is not supported")
        dt = self.dtype
        x = x.astype(dt)
        b, s = x.shape[:2]
        if self.q is not None:
            q = jnp.einsum("bsd,dhx->bshx", x, self.q[...].astype(dt))
        else:
            q = jnp.einsum("bsq,qhx->bshx", self.q_norm(x @ self.q_a[...].astype(dt)).astype(dt),
                           self.q_b[...].astype(dt))
        q_nope, q_pe = q[..., :self.nope], q[..., self.nope:]
        ckv = x @ self.kv_a[...].astype(dt)                                    # [b, s, r+p]
        c = self.kv_norm(ckv[..., :self.rank]).astype(dt)                      # [b, s, r]
        k_pe = ckv[..., self.rank:][:, :, None, :]                             # [b, s, 1, p]
        if positions is None:
            start = 0 if cache is None else cache.index
            positions = jnp.broadcast_to(start + jnp.arange(s, dtype=jnp.int32), (b, s))
        cos, sin = rope_tables(positions, self.rope, self.rope_theta, self.rope_scaling)
        q_pe, k_pe = apply_rope(q_pe, cos, sin), apply_rope(k_pe, cos, sin)
        key_valid = jnp.ones((b, s), bool) if padding_mask is None else padding_mask
        kpos = positions
        if cache is not None:
            cache = cache.write(c[:, :, None, :], k_pe, key_valid, positions)
            c, k_pe = cache.k[:, :, 0].astype(dt), cache.v.astype(dt)
            key_valid, kpos = cache.valid, cache.pos
        kv = jnp.einsum("bmr,rhx->bmhx", c, self.kv_b[...].astype(dt))         # [b, m, h, n+y]
        k_nope, v = kv[..., :self.nope], kv[..., self.nope:]
        m = k_nope.shape[1]
        k = jnp.concatenate([k_nope, jnp.broadcast_to(k_pe, (b, m, self.num_heads, self.rope))], axis=-1)
        q = jnp.concatenate([q_nope, q_pe], axis=-1)
        mask = self_mask(key_valid, positions, kpos, causal, None)
        out = attend(q, k, v, mask=mask, scale=self.scale, dtype=dt, impl=self.impl, chunk=self.chunk)
        y = jnp.einsum("bshy,hyd->bsd", out, self.o[...].astype(dt))
        return y if cache is None else (y, cache)
