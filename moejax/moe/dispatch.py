"""Dispatch backends: move tokens to ``[e, g, c, d]`` expert buffers and back, or run dropless.

All consume one :class:`~moejax.moe.routing.RoutingPlan` and give the same numbers:

* ``einsum``: one-hot dispatch / combine tensors ``[g, t, e, c]`` (the T5X / GShard reference);
  cost O(t * e * c * d) per group.
* ``gather``: index arithmetic; the buffer is filled by a gather of token rows and the output
  collected by a gather of buffer rows (token-major) or a scatter-add (expert-major); cost
  O((t * k + e * c) * d). The default on CPU / GPU.
* ``ragged``: no buffers; assignments are sorted by expert and run through
  ``jax.lax.ragged_dot`` (grouped matmul), so no capacity padding is computed. Dropless by
  nature (it processes exactly the plan's kept assignments).

Buffers are constrained to ``('batch', None, 'capacity', 'embed')`` before and
``('expert', 'expert_group', 'capacity', 'embed')`` after the swap of the group and expert axes,
which on an expert-parallel mesh compiles to an all-to-all over the ``expert`` axis.
"""

from __future__ import annotations

from functools import partial
from typing import Callable

import jax
import jax.numpy as jnp

from moejax.moe.routing import RoutingPlan
from moejax.sharding import Rules, constrain

ExpertFn = Callable[..., jax.Array]


def _to_experts(buf: jax.Array, rules: Rules) -> jax.Array:
    """``[g, e, c, d]`` -> ``[e, g, c, d]`` with the all-to-all sharding constraints."""
    buf = constrain(buf, ("batch", None, "capacity", "embed"), rules)
    buf = jnp.swapaxes(buf, 0, 1)
    return constrain(buf, ("expert", "expert_group", "capacity", "embed"), rules)


def _from_experts(buf: jax.Array, rules: Rules) -> jax.Array:
    """``[e, g, c, d]`` -> ``[g, e, c, d]`` (the return all-to-all)."""
    buf = constrain(buf, ("expert", "expert_group", "capacity", "embed"), rules)
    buf = jnp.swapaxes(buf, 0, 1)
    return constrain(buf, ("batch", None, "capacity", "embed"), rules)


# ----------------------------------------------------------------------------- einsum

def combine_tensor(plan: RoutingPlan, tokens: int) -> jax.Array:
    """Dense combine tensor ``[g, t, e, c]`` float32 (weight at each kept (token, expert, slot))."""
    e, c = plan.num_experts, plan.capacity
    g = plan.token.shape[0]
    w = jnp.where(plan.kept, plan.weight, 0.0)
    if plan.layout == "token_major":
        k = plan.token.shape[1] // tokens
        oe = jax.nn.one_hot(plan.expert, e, dtype=jnp.float32) * w[..., None]  # [g, a, e]
        oc = jax.nn.one_hot(jnp.where(plan.kept, plan.slot, c), c, dtype=jnp.float32)  # [g, a, c]
        return jnp.einsum("gkte,gktc->gtec", oe.reshape(g, k, tokens, e), oc.reshape(g, k, tokens, c))
    ot = jax.nn.one_hot(plan.token, tokens, dtype=jnp.float32) * w[..., None]  # [g, e*c, t]
    return jnp.transpose(ot.reshape(g, e, c, tokens), (0, 3, 1, 2))


def dispatch_mask(plan: RoutingPlan, tokens: int) -> jax.Array:
    """Boolean dispatch tensor ``[g, t, e, c]`` (True at each kept (token, expert, slot))."""
    e, c = plan.num_experts, plan.capacity
    g = plan.token.shape[0]
    if plan.layout == "token_major":
        k = plan.token.shape[1] // tokens
        oe = jax.nn.one_hot(jnp.where(plan.kept, plan.expert, e), e, dtype=jnp.float32)
        oc = jax.nn.one_hot(plan.slot, c, dtype=jnp.float32)
        m = jnp.einsum("gkte,gktc->gtec", oe.reshape(g, k, tokens, e), oc.reshape(g, k, tokens, c))
        return m > 0
    ot = jax.nn.one_hot(jnp.where(plan.kept, plan.token, tokens), tokens, dtype=jnp.float32)
    return jnp.transpose(ot.reshape(g, e, c, tokens), (0, 3, 1, 2)) > 0


def einsum_backend(x: jax.Array, plan: RoutingPlan, experts: ExpertFn, rules: Rules) -> jax.Array:
    """``x [g, t, d]`` -> ``[g, t, d]`` via one-hot dispatch / combine einsums."""
    t = x.shape[1]
    mask = dispatch_mask(plan, t)
    buf = jnp.einsum("gtec,gtd->gecd", mask.astype(x.dtype), x)
    slot_mask = jnp.swapaxes(jnp.any(mask, axis=1), 0, 1)  # [e, g, c]
    out = _from_experts(experts(_to_experts(buf, rules), slot_mask=slot_mask), rules)
    comb = combine_tensor(plan, t).astype(out.dtype)
    return jnp.einsum("gecd,gtec->gtd", out, comb)


# ----------------------------------------------------------------------------- gather

def slot_tokens(plan: RoutingPlan, tokens: int) -> jax.Array:
    """``[g, e*c]`` int32: the token in each buffer slot, ``tokens`` (a sentinel) where empty."""
    e, c = plan.num_experts, plan.capacity
    if plan.layout == "expert_major":
        return jnp.where(plan.kept, plan.token, tokens)
    dest = jnp.where(plan.kept, plan.expert * c + plan.slot, e * c)  # e*c is out of bounds -> dropped
    return jax.vmap(lambda d, tok: jnp.full((e * c,), tokens, jnp.int32).at[d].set(tok, mode="drop"))(
        dest, plan.token)


def _take_rows(x: jax.Array, idx: jax.Array) -> jax.Array:
    """``x [g, n, d]``, ``idx [g, m]`` -> ``[g, m, d]`` (a batched row gather: one slice of ``d``
    per index, not an element-wise ``take_along_axis``, which is 2x slower on XLA:CPU)."""
    return jax.vmap(lambda a, i: jnp.take(a, i, axis=0, mode="clip"))(x, idx)


def sum_choices(rows: jax.Array, k: int) -> jax.Array:
    """``rows [g, k*t, d]`` (choice-major) -> ``[g, t, d]``, the sum over the ``k`` choices.

    Written as ``k - 1`` element-wise adds: XLA:CPU runs a reduction over a non-minor axis
    (``sum(reshape(g, k, t, d), axis=1)``) about 50x slower than the adds.
    """
    g, a, d = rows.shape
    t = a // k
    out = rows[:, :t]
    for j in range(1, k):
        out = out + rows[:, j * t:(j + 1) * t]
    return out


@jax.custom_vjp
def _dispatch_rows(x, src, idx, kept):
    """Fill the buffers: ``buf[g, s] = x[g, src[g, s]]`` (0 where ``src == t``, an empty slot).

    ``x [g, t, d]``, ``src [g, e*c]``. ``idx`` / ``kept [g, k*t]`` are the inverse map
    (token-major assignment -> slot) so that the backward pass is a gather, not a scatter-add.
    """
    g, t, d = x.shape
    x_pad = jnp.concatenate([x, jnp.zeros((g, 1, d), x.dtype)], axis=1)
    return _take_rows(x_pad, src)


def _dispatch_fwd(x, src, idx, kept):
    return _dispatch_rows(x, src, idx, kept), (src, idx, kept, x.shape)


def _dispatch_bwd(res, dbuf):
    src, idx, kept, (g, t, d) = res
    k = idx.shape[1] // t
    rows = _take_rows(dbuf, idx) * kept[..., None].astype(dbuf.dtype)  # [g, k*t, d]
    return sum_choices(rows, k), None, None, None


_dispatch_rows.defvjp(_dispatch_fwd, _dispatch_bwd)


@partial(jax.custom_vjp, nondiff_argnums=(0,))
def _combine_rows(t, out, w, idx, src, slot_assign):
    """``y[g, i] = sum_j w[g, j*t+i] * out[g, idx[g, j*t+i]]`` -> ``[g, t, d]``.

    ``out [g, e*c, d]``; ``w`` / ``idx [g, k*t]`` (w = 0 where not kept). ``src [g, e*c]``
    (slot -> token, ``t`` if empty) and ``slot_assign [g, e*c]`` (slot -> assignment) make the
    backward pass a gather.
    """
    g, _, d = out.shape
    rows = _take_rows(out, idx) * w[..., None].astype(out.dtype)
    return sum_choices(rows, idx.shape[1] // t)


def _combine_fwd(t, out, w, idx, src, slot_assign):
    return _combine_rows(t, out, w, idx, src, slot_assign), (out, w, idx, src, slot_assign)


def _combine_bwd(t, res, dy):
    out, w, idx, src, slot_assign = res
    g, _, d = out.shape
    k = idx.shape[1] // t
    dy_pad = jnp.concatenate([dy, jnp.zeros((g, 1, d), dy.dtype)], axis=1)
    w_slot = jnp.where(src < t, jnp.take_along_axis(w, jnp.minimum(slot_assign, w.shape[1] - 1), axis=1), 0.0)
    dout = _take_rows(dy_pad, src) * w_slot[..., None].astype(dy.dtype)  # [g, e*c, d]
    # dw[g, j*t+i] = <out[g, idx[g, j*t+i]], dy[g, i]>: a batched dot (XLA:CPU runs the fused
    # multiply + minor-axis reduction of the same product ~15x slower)
    rows = _take_rows(out, idx).reshape(g, k, t, d)
    dw = jnp.einsum("gktd,gtd->gkt", rows, dy).reshape(g, k * t).astype(w.dtype)
    return dout, dw, None, None, None


_combine_rows.defvjp(_combine_fwd, _combine_bwd)


def slot_assignments(plan: RoutingPlan) -> jax.Array:
    """``[g, e*c]`` int32: the (token-major) assignment held by each buffer slot (0 where empty)."""
    e, c = plan.num_experts, plan.capacity
    a = plan.token.shape[1]
    dest = jnp.where(plan.kept, plan.expert * c + plan.slot, e * c)
    return jax.vmap(lambda dd: jnp.zeros((e * c,), jnp.int32).at[dd].set(jnp.arange(a, dtype=jnp.int32),
                                                                       mode="drop"))(dest)


def gather_backend(x: jax.Array, plan: RoutingPlan, experts: ExpertFn, rules: Rules) -> jax.Array:
    """``x [g, t, d]`` -> ``[g, t, d]`` via index gathers into ``[e, g, c, d]`` buffers.

    Token-major plans use gathers in both directions, forward and backward (custom VJPs with
    the slot <-> assignment maps); expert-major plans combine with a scatter-add.
    """
    g, t, d = x.shape
    e, c = plan.num_experts, plan.capacity
    src = slot_tokens(plan, t)  # [g, e*c]
    slot_mask = jnp.swapaxes((src < t).reshape(g, e, c), 0, 1)
    w = jnp.where(plan.kept, plan.weight, 0.0)
    if plan.layout == "token_major":
        idx = jnp.where(plan.kept, plan.expert * c + plan.slot, 0)
        buf = _dispatch_rows(x, src, idx, plan.kept).reshape(g, e, c, d)
        out = _from_experts(experts(_to_experts(buf, rules), slot_mask=slot_mask), rules).reshape(g, e * c, d)
        return _combine_rows(t, out, w.astype(out.dtype), idx, src, slot_assignments(plan))
    x_pad = jnp.concatenate([x, jnp.zeros((g, 1, d), x.dtype)], axis=1)
    buf = _take_rows(x_pad, src).reshape(g, e, c, d)
    out = _from_experts(experts(_to_experts(buf, rules), slot_mask=slot_mask), rules).reshape(g, e * c, d)
    rows = out * w[..., None].astype(out.dtype)
    return jax.vmap(lambda r, tok: jnp.zeros((t, d), out.dtype).at[tok].add(r))(rows, plan.token)

# ----------------------------------------------------------------------------- ragged

def ragged_backend(x: jax.Array, plan: RoutingPlan, experts_ragged: ExpertFn, rules: Rules) -> jax.Array:
    """``x [g, t, d]`` -> ``[g, t, d]``: sort kept assignments by expert, grouped matmul, unsort.

    Only kept assignments are computed (``group_sizes`` counts them); capacity never pads.
    Expert weights are not sharded over an ``expert`` mesh axis by this path (use ``gather`` or
    ``einsum`` for expert parallelism).
    """
    g, t, d = x.shape
    e = plan.num_experts
    a = plan.token.shape[1]
    tok_global = (plan.token + jnp.arange(g, dtype=jnp.int32)[:, None] * t).reshape(-1)
    key = jnp.where(plan.kept, plan.expert, e).reshape(-1)
    order = jnp.argsort(key, stable=True)
    group_sizes = jnp.zeros((e + 1,), jnp.int32).at[key].add(1)[:e]
    xs = jnp.take(x.reshape(g * t, d), tok_global[order], axis=0)
    ys = experts_ragged(xs, group_sizes)
    w = jnp.where(plan.kept, plan.weight, 0.0).reshape(-1).astype(ys.dtype)
    if plan.layout == "token_major":
        inv = jnp.argsort(order)
        rows = jnp.take(ys, inv, axis=0) * w[:, None]
        return sum_choices(rows.reshape(g, a, d), a // t)
    rows = ys * w[order][:, None]
    return jnp.zeros((g * t, d), ys.dtype).at[tok_global[order]].add(rows).reshape(g, t, d)


BACKENDS = {"einsum": einsum_backend, "gather": gather_backend, "ragged": ragged_backend}
