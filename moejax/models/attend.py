"""Attention kernels behind :class:`moejax.models.layers.Attention` (``attention_impl``).

All compute ``softmax(q.k * scale + bias, masked) v`` with the scores in float32 and take the
same inputs: ``q [b, s, h, x]``, ``k [b, m, j, x]``, ``v [b, m, j, y]`` (``h`` a multiple of ``j``: grouped
queries), a boolean ``mask`` broadcastable to ``[b, h, s, m]`` (True = attend) and an optional
additive ``bias [1|b, h, s, m]`` (T5 relative positions); they return ``[b, s, h, y]``.

* ``xla``: the whole ``[b, h, s, m]`` score matrix at once (fastest for short sequences);
* ``chunked``: queries in blocks of ``chunk`` (``lax.map`` over blocks, each block under
  ``jax.checkpoint``), so forward and backward hold ``[b, h, chunk, m]`` scores instead of
  ``[b, h, s, m]``: exact, any mask / bias / window, any platform;
* ``dot_product``: ``jax.nn.dot_product_attention``, asked for cuDNN's fused flash attention on a
  GPU with fp16/bf16 inputs where its shape rules allow (:func:`cudnn_eligible`; the boolean mask
  and any bias go in as an additive bias), its XLA implementation otherwise (float32 on GPU, CPU,
  TPU). jax's own default (``implementation=None``) is the XLA one even on a GPU, so the choice is
  made here;
* ``splash``: Pallas splash attention (``jax.experimental.pallas.ops.tpu.splash_attention``:
  a block-sparse flash kernel that skips the blocks a causal / sliding-window mask leaves empty)
  for self-attention whose mask is structural (:class:`Structure`: causal and / or a window over
  positions that are the token indices, padding as segment ids); anything else (an additive bias,
  sinks, a KV cache, a value head dim other than the query's, lengths no block of 128 / 256 / 512
  divides) runs ``chunked``. Off a TPU the kernel runs in Pallas's interpreter (for tests: exact,
  slow);
* ``auto``: ``splash`` on TPU where it applies, ``dot_product`` on GPU; elsewhere ``chunked`` when
  the queries exceed one chunk, else ``xla``.
"""

from __future__ import annotations

import enum
from typing import NamedTuple

import jax
import jax.numpy as jnp


class AttentionImpl(enum.StrEnum):
    AUTO = "auto"
    XLA = "xla"
    CHUNKED = "chunked"
    DOT_PRODUCT = "dot_product"
    SPLASH = "splash"


class Structure(NamedTuple):
    """What a self-attention mask is made of when the query and key positions are the token
    indices ``0..s-1`` (no cache): ``causal`` (keys at or before the query), ``window`` (keys fewer
    than ``window`` back, or None) and ``valid [b, s]`` (real tokens). The boolean mask given beside
    it must be ``valid[key] & causal & window``; block-sparse kernels (``splash``) use this instead."""

    causal: bool
    window: int | None
    valid: jax.Array


def check_impl(name: str, chunk: int) -> None:
    """ValueError naming a bad ``attention_impl`` or ``attention_chunk``."""
    if name not in set(AttentionImpl):
        raise ValueError(f"unknown attention_impl {name!r}; valid: {', '.join(a.value for a in AttentionImpl)}")
    if chunk < 1:
        raise ValueError(f"attention_chunk must be >= 1, got {chunk}")


def resolve(name: str, s: int, chunk: int) -> str:
    """The kernel ``auto`` stands for at ``s`` queries on this platform."""
    if name != AttentionImpl.AUTO:
        return name
    platform = jax.devices()[0].platform
    if platform == "gpu":
        return AttentionImpl.DOT_PRODUCT
    if platform == "tpu":
        return AttentionImpl.SPLASH
    return AttentionImpl.CHUNKED if s > chunk else AttentionImpl.XLA


def _xla(q, k, v, mask, bias, scale, dtype, sinks=None):
    b, s, h, x = q.shape
    j = k.shape[2]
    g = h // j
    qg = q.reshape(b, s, j, g, x)
    scores = jnp.einsum("bsjgx,bmjx->bjgsm", qg, k).astype(jnp.float32) * scale
    if bias is not None:
        scores = scores + bias.astype(jnp.float32).reshape(bias.shape[0], j, g, *bias.shape[2:])
    m5 = mask.reshape(mask.shape[0], 1, 1, *mask.shape[2:]) if mask.shape[1] == 1 else \
        mask.reshape(mask.shape[0], j, g, *mask.shape[2:])
    scores = jnp.where(m5, scores, jnp.finfo(jnp.float32).min)
    if sinks is not None:       # one more logit per head with no value row: exp(sink) joins the denominator
        col = jnp.broadcast_to(sinks.astype(jnp.float32).reshape(1, j, g, 1, 1), scores.shape[:-1] + (1,))
        probs = jax.nn.softmax(jnp.concatenate([scores, col], axis=-1), axis=-1)[..., :-1].astype(dtype)
    else:
        probs = jax.nn.softmax(scores, axis=-1).astype(dtype)
    return jnp.einsum("bjgsm,bmjy->bsjgy", probs, v).reshape(b, s, h, v.shape[-1])


def _chunked(q, k, v, mask, bias, scale, dtype, chunk, sinks=None):
    b, s, h, x = q.shape
    n = -(-s // chunk)
    pad = n * chunk - s

    def padded(a, axis):
        if a is None or a.shape[axis] == 1 or not pad:
            return a
        widths = [(0, 0)] * a.ndim
        widths[axis] = (0, pad)
        return jnp.pad(a, widths)

    qp, maskp, biasp = padded(q, 1), padded(mask, 2), padded(bias, 2)

    def block(i):
        def piece(a, axis):
            if a is None or a.shape[axis] == 1:
                return a
            return jax.lax.dynamic_slice_in_dim(a, i * chunk, chunk, axis)

        return _xla(piece(qp, 1), k, v, piece(maskp, 2), piece(biasp, 2), scale, dtype, sinks)

    out = jax.lax.map(jax.checkpoint(block, prevent_cse=False), jnp.arange(n))     # [n, b, chunk, h, y]
    return jnp.moveaxis(out, 0, 1).reshape(b, n * chunk, h, v.shape[-1])[:, :s]


def cudnn_eligible(q, k, bias_or_mask: bool = True) -> bool:
    """Whether cuDNN's fused flash attention takes these shapes here: a GPU, fp16/bf16 inputs, a
    head dim that is a multiple of 8 and at most 256 (Hopper and later) or 128, and — with a mask or
    bias, which cuDNN adds to the scores — even query and key lengths (its backward needs them)."""
    dev = jax.devices()[0]
    if dev.platform != "gpu" or q.dtype not in (jnp.bfloat16, jnp.float16):
        return False
    x = q.shape[-1]
    major = int(str(getattr(dev, "compute_capability", "0")).split(".")[0] or 0)
    if x % 8 or x > (256 if major >= 9 else 128):
        return False
    return not (bias_or_mask and (q.shape[1] % 2 or k.shape[1] % 2))


def _dot_product(q, k, v, mask, bias, scale, dtype):
    b, s, h, _ = q.shape
    mask = jnp.broadcast_to(mask, (mask.shape[0], mask.shape[1], s, k.shape[1]))
    bias = None if bias is None else bias.astype(q.dtype)
    if cudnn_eligible(q, k):
        try:          # cuDNN's own trace-time checks (cuDNN version, compute capability) have the last word
            return jax.nn.dot_product_attention(q, k, v, bias=bias, mask=mask, scale=scale,
                                                implementation="cudnn").astype(dtype)
        except NotImplementedError:
            pass
    return jax.nn.dot_product_attention(q, k, v, bias=bias, mask=mask, scale=scale, implementation="xla").astype(dtype)


def _splash_block(s: int, m: int) -> int | None:
    """The largest of 512 / 256 / 128 dividing both lengths (the kernel's block), or None."""
    return next((blk for blk in (512, 256, 128) if s % blk == 0 and m % blk == 0), None)


def _splash(q, k, v, structure: Structure, scale, dtype):
    """Splash attention over ``[b, s, h, x]`` queries and ``[b, m, j, x]`` keys / values (grouped
    queries: the kv heads repeated), the mask from ``structure``. Padding is a segment id shared by
    query and key: a real query attends real keys only (as the boolean mask); a padding query
    attends padding keys, never nothing (its output is discarded either way)."""
    from jax.experimental.pallas.ops.tpu.splash_attention import splash_attention_kernel as sk
    from jax.experimental.pallas.ops.tpu.splash_attention import splash_attention_mask as sm

    b, s, h, x = q.shape
    m, j = k.shape[1], k.shape[2]
    if structure.window is not None:
        # keys fewer than ``window`` back; ahead: none when causal, all otherwise (as the boolean mask)
        one = sm.LocalMask((s, m), (structure.window - 1, 0 if structure.causal else None), 0)
    elif structure.causal:
        one = sm.CausalMask((s, m))
    else:
        one = sm.FullMask((s, m))
    blk = _splash_block(s, m)
    sizes = sk.BlockSizes(block_q=blk, block_kv=blk, block_kv_compute=blk, block_q_dkv=blk, block_kv_dkv=blk,
                          block_kv_dkv_compute=blk, block_q_dq=blk, block_kv_dq=blk)
    kernel = sk.make_splash_mha(sm.MultiHeadMask([one] * h), head_shards=1, q_seq_shards=1, block_sizes=sizes,
                                interpret=jax.devices()[0].platform != "tpu")
    qh = jnp.swapaxes(q * jnp.asarray(scale, q.dtype), 1, 2)                    # [b, h, s, x]
    kh = jnp.repeat(jnp.swapaxes(k, 1, 2), h // j, axis=1)                     # [b, h, m, x]
    vh = jnp.repeat(jnp.swapaxes(v, 1, 2), h // j, axis=1)
    seg = structure.valid.astype(jnp.int32)
    out = jax.vmap(lambda q1, k1, v1, s1: kernel(q1, k1, v1, segment_ids=sk.SegmentIds(s1, s1)))(qh, kh, vh, seg)
    return jnp.swapaxes(out, 1, 2).astype(dtype)                                # [b, s, h, y]


def splash_applies(q, k, v, bias, sinks, structure) -> bool:
    """Can ``splash`` compute this attention (see the module docstring)?"""
    return (structure is not None and bias is None and sinks is None and v.shape[-1] == q.shape[-1]
            and q.shape[1] == k.shape[1] and _splash_block(q.shape[1], k.shape[1]) is not None)


def attend(q, k, v, *, mask, bias=None, scale: float, dtype, impl: str = "xla", chunk: int = 512, sinks=None,
           structure: Structure | None = None):
    """Attention output ``[b, s, h, y]`` with kernel ``impl`` (see the module docstring); ``y`` is
    ``v``'s head dim, which may differ from the query / key dim ``x`` (multi-head latent attention:
    ``dot_product`` then pads ``v`` to ``x`` and slices the output, as transformers does).
    ``sinks [h]``: gpt-oss's attention sinks, a learned logit per head appended to every query's
    scores (with no value), so ``exp(sink)`` joins the softmax denominator; ``jax.nn.
    dot_product_attention`` has no such input, so ``dot_product`` runs ``chunked`` instead.
    ``structure``: what ``mask`` is made of (self-attention over token-index positions), which
    ``splash`` needs; without it ``splash`` runs ``chunked``."""
    impl = resolve(impl, q.shape[1], chunk)
    if impl == AttentionImpl.SPLASH:
        if splash_applies(q, k, v, bias, sinks, structure):
            return _splash(q, k, v, structure, scale, dtype)
        impl = AttentionImpl.CHUNKED
    if sinks is not None:
        if impl == AttentionImpl.XLA or q.shape[1] <= chunk:
            return _xla(q, k, v, mask, bias, scale, dtype, sinks)
        return _chunked(q, k, v, mask, bias, scale, dtype, chunk, sinks)
    if impl == AttentionImpl.DOT_PRODUCT and v.shape[-1] != q.shape[-1]:
        y = v.shape[-1]
        if y > q.shape[-1]:
            raise ValueError(f"dot_product attention needs the value head dim ({y}) <= the query / key dim "
                             f"({q.shape[-1]}); use attention_impl 'xla' or 'chunked'")
        v = jnp.pad(v, [(0, 0)] * 3 + [(0, q.shape[-1] - y)])
        return _dot_product(q, k, v, mask, bias, scale, dtype)[..., :y]
    if impl == AttentionImpl.XLA or (impl == AttentionImpl.CHUNKED and q.shape[1] <= chunk):
        return _xla(q, k, v, mask, bias, scale, dtype)
    if impl == AttentionImpl.CHUNKED:
        return _chunked(q, k, v, mask, bias, scale, dtype, chunk)
    return _dot_product(q, k, v, mask, bias, scale, dtype)
