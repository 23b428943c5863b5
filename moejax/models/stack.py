"""What every model family shares around its blocks: a period of blocks, the scan over stacked
periods, empty KV caches for a scanned stack, and the model-level MoE aux output.

Shape letters (README legend): ``l`` scanned periods, ``b`` batch,
``m`` cache length, ``j`` kv heads, ``x`` head dim.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import nnx, struct

from moejax.models.layers import KVCache
from moejax.models.remat import rematerialise
from moejax.moe import MoeStats


class Period(nnx.Module):
    """A few consecutive blocks (e.g. ``[dense, sparse]``) scanned as one unit. Each block is called
    ``block(x, cache=..., **kw) -> (x, moe_stats or None, new_cache or None)``; a period has at most
    one sparse block, whose stats it returns."""

    def __init__(self, blocks: list[nnx.Module]):
        self.blocks = nnx.List(blocks)

    def __call__(self, x, caches=None, **kw):
        """``caches``: a tuple with one KVCache per block (or None)."""
        stats = None
        new = []
        for j, block in enumerate(self.blocks):
            x, s, c = block(x, cache=None if caches is None else caches[j], **kw)
            stats = s if s is not None else stats
            new.append(c)
        return x, stats, (None if caches is None else tuple(new))


def scan_periods(stack: nnx.Module, x: jax.Array, caches, deterministic: bool, remat: str = "none", **kw):
    """Apply stacked periods with ``jax.lax.scan``: ``(x, stacked stats, new caches)``.

    ``caches`` (or None) are scanned alongside the params; the periods' advanced RNG state is
    written back in training. ``remat``: the rematerialisation policy of each period
    (:mod:`moejax.models.remat`; not applied when decoding with caches).
    """
    graphdef, state = nnx.split(stack)

    def body(x, xs):
        st, cache_l = xs
        period = nnx.merge(graphdef, st)
        x, stats, cache_l = period(x, caches=cache_l, deterministic=deterministic, **kw)
        return x, (stats, cache_l, nnx.state(period, nnx.RngState))

    if caches is None:
        body = rematerialise(body, remat)
    x, (stats, caches, new_rng) = jax.lax.scan(body, x, (state, caches))
    if not deterministic:
        nnx.update(stack, new_rng)
    return x, stats, caches


def empty_caches(periods: int, period: int, batch: int, length: int, kv_heads: int, head_dim: int,
                 dtype, ring: bool = False, v_dim: int | None = None) -> tuple:
    """Empty KV caches of a scanned stack: one per block of a period, each stacked on ``[l]``
    (``ring``: sliding-window ring buffers of ``length`` slots; ``v_dim``: see :meth:`KVCache.zeros`)."""
    one = KVCache.zeros(batch, length, kv_heads, head_dim, dtype, ring=ring, v_dim=v_dim)
    return tuple(jax.tree.map(lambda z: jnp.broadcast_to(z, (periods,) + z.shape), one) for _ in range(period))


def mean_over_layers(stats: list[MoeStats], name: str) -> jax.Array:
    """Mean of ``MoeStats`` field ``name`` over every sparse layer of every stack (0 if none)."""
    if not stats:
        return jnp.zeros(())
    return jnp.mean(jnp.concatenate([jnp.ravel(getattr(s, name)) for s in stats]))


class MoeAux:
    """The model-level view of the MoE stats (shared by :class:`DecoderAux` and
    :class:`EncDecAux`): ``moe_stats()`` lists each sparse stack's stacked :class:`MoeStats`; the
    losses are means over every sparse layer (the convention the training loss uses)."""

    def moe_stats(self) -> list[MoeStats]:
        raise NotImplementedError

    def load_balancing_loss(self) -> jax.Array:
        """Mean over the sparse layers (k at perfect balance, see MoeStats)."""
        return mean_over_layers(self.moe_stats(), "load_balancing_loss")

    def router_z_loss(self) -> jax.Array:
        return mean_over_layers(self.moe_stats(), "router_z_loss")


@struct.dataclass
class DecoderAux(MoeAux):
    """Per-call extras of a decoder-only model: ``moe`` holds each sparse block's :class:`MoeStats`
    stacked on a leading ``[l]`` axis (None for dense models)."""

    moe: MoeStats | None

    def moe_stats(self) -> list[MoeStats]:
        return [] if self.moe is None else [self.moe]


@struct.dataclass
class EncDecAux(MoeAux):
    """MoE stats of the sparse encoder / decoder blocks, stacked on a leading axis (or None)."""

    encoder: MoeStats | None
    decoder: MoeStats | None

    def moe_stats(self) -> list[MoeStats]:
        return [s for s in (self.encoder, self.decoder) if s is not None]
