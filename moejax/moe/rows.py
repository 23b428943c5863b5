"""Row primitives of the dispatch backends: batched row gathers, the sum over top-k choices, and
the token <-> buffer-slot moves with gather-only custom VJPs.

Shape letters (README legend): ``g`` groups, ``t`` tokens per group, ``k`` choices
per token, ``a`` assignments per group (``k * t``, choice-major), ``e * c`` buffer slots per group,
``z`` rows, ``d`` d_model.

XLA:CPU runs a reduction over a non-minor axis ~50x slower than ``k - 1`` adds and a fused
multiply + reduction of gathered rows ~15x slower than a batched dot, so both are written that way
here (the DESIGN "platform-specific speed tricks"); the forms are pinned against plain numpy in
``tests/moe/test_dispatch.py``.
"""

from __future__ import annotations

from functools import partial

import jax
import jax.numpy as jnp


def take_rows(x: jax.Array, idx: jax.Array) -> jax.Array:
    """``x [g, z, d]``, ``idx [g, a]`` -> ``[g, a, d]`` (a batched row gather: one slice of ``d``
    per index, not an element-wise ``take_along_axis``, which is 2x slower on XLA:CPU)."""
    return jax.vmap(lambda a, i: jnp.take(a, i, axis=0, mode="clip"))(x, idx)


def sum_choices(rows: jax.Array, k: int) -> jax.Array:
    """``rows [g, k*t, d]`` (choice-major) -> ``[g, t, d]``, the sum over the ``k`` choices.

    Written as ``k - 1`` element-wise adds: XLA:CPU runs a reduction over a non-minor axis
    (``sum(reshape(g, k, t, d), axis=1)``) about 50x slower than the adds.
    """
    _, a, _ = rows.shape
    t = a // k
    out = rows[:, :t]
    for j in range(1, k):
        out = out + rows[:, j * t:(j + 1) * t]
    return out


def pad_row(x: jax.Array) -> jax.Array:
    """``x [g, t, d]`` -> ``[g, t + 1, d]`` with a zero row ``t`` (the empty-slot sentinel)."""
    g, _, d = x.shape
    return jnp.concatenate([x, jnp.zeros((g, 1, d), x.dtype)], axis=1)


@jax.custom_vjp
def dispatch_rows(x, src, idx, kept):
    """Fill the buffers: ``buf[g, s] = x[g, src[g, s]]`` (0 where ``src == t``, an empty slot).

    ``x [g, t, d]``, ``src [g, e*c]``. ``idx`` / ``kept [g, k*t]`` are the inverse map
    (token-major assignment -> slot) so that the backward pass is a gather, not a scatter-add.
    """
    return take_rows(pad_row(x), src)


def _dispatch_fwd(x, src, idx, kept):
    return dispatch_rows(x, src, idx, kept), (src, idx, kept, x.shape)


def _dispatch_bwd(res, dbuf):
    src, idx, kept, (_, t, _) = res
    k = idx.shape[1] // t
    rows = take_rows(dbuf, idx) * kept[..., None].astype(dbuf.dtype)  # [g, k*t, d]
    return sum_choices(rows, k), None, None, None


dispatch_rows.defvjp(_dispatch_fwd, _dispatch_bwd)


@partial(jax.custom_vjp, nondiff_argnums=(0,))
def combine_rows(t, out, w, idx, src, slot_assign):
    """``y[g, i] = sum_j w[g, j*t+i] * out[g, idx[g, j*t+i]]`` -> ``[g, t, d]``.

    ``out [g, e*c, d]``; ``w`` / ``idx [g, k*t]`` (w = 0 where not kept). ``src [g, e*c]``
    (slot -> token, ``t`` if empty) and ``slot_assign [g, e*c]`` (slot -> assignment) make the
    backward pass a gather.
    """
    rows = take_rows(out, idx) * w[..., None].astype(out.dtype)
    return sum_choices(rows, idx.shape[1] // t)


def _combine_fwd(t, out, w, idx, src, slot_assign):
    return combine_rows(t, out, w, idx, src, slot_assign), (out, w, idx, src, slot_assign)


def _combine_bwd(t, res, dy):
    out, w, idx, src, slot_assign = res
    g, _, d = out.shape
    k = idx.shape[1] // t
    w_slot = jnp.where(src < t, jnp.take_along_axis(w, jnp.minimum(slot_assign, w.shape[1] - 1), axis=1), 0.0)
    dout = take_rows(pad_row(dy), src) * w_slot[..., None].astype(dy.dtype)  # [g, e*c, d]
    # dw[g, j*t+i] = <out[g, idx[g, j*t+i]], dy[g, i]>: a batched dot (XLA:CPU runs the fused
    # multiply + minor-axis reduction of the same product ~15x slower)
    rows = take_rows(out, idx).reshape(g, k, t, d)
    dw = jnp.einsum("gktd,gtd->gkt", rows, dy).reshape(g, k * t).astype(w.dtype)
    return dout, dw, None, None, None


combine_rows.defvjp(_combine_fwd, _combine_bwd)


def scatter_rows(rows: jax.Array, token: jax.Array, t: int) -> jax.Array:
    """``rows [g, a, d]`` added into ``[g, t, d]`` at ``token [g, a]`` (a scatter-add)."""
    d = rows.shape[-1]
    return jax.vmap(lambda r, tok: jnp.zeros((t, d), rows.dtype).at[tok].add(r))(rows, token)
