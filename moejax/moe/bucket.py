"""The ``bucket`` dispatch backend: exact dropless MoE at the cost of the real expert loads.

Shape letters (README legend): ``g`` groups, ``t`` tokens per group, ``e`` experts, ``k``
choices per token, ``a`` assignments per group (``k * t``, choice-major), ``c`` capacity,
``d`` d_model, ``f`` d_ff.

A dropless layer must process every routed assignment, and with static shapes the capacity
buffers must hold the largest expert load ``L`` (the most assignments any expert receives in any
group). ``gather`` sizes them for the worst case, ``C = t``: ``e / k`` times the useful work.
This backend compiles a short ladder of capacities instead — ``ceil(f * k * t / e)`` for the
factors ``f`` of ``MoeConfig.capacity_buckets`` (default 1, 1.0625, 1.125, 1.1875, 1.25, 1.375,
1.5, 1.75, 2, 3), rounded up to a multiple of 8 and capped at ``t`` — and picks at run time, with
``jax.lax.switch`` on ``L``, the smallest one that holds every assignment. Loads above the largest
bucket ``C_top`` run ``ceil(L / C_top)`` rounds of it (round ``r`` takes slots
``[r C_top, (r+1) C_top)`` of every expert), so nothing is ever dropped whatever the router does,
and the buffers never exceed ``[e, g, C_top, d]``.

Under ``jax.lax.switch`` autodiff would keep every branch's residuals (zero-filled when not
taken), so the layer has its own VJP: the forward saves capacity-independent residuals — each
assignment's expert output row ``[g, a, d]`` and up-projection rows ``[g, a, f]`` — and the
backward switches on the same bucket, rebuilds the buffers from them and runs the experts'
own VJPs (their forward matmuls are dead code there and are not recomputed). Buffers cross the
same sharding constraints as ``gather``'s (``to_experts`` / ``from_experts``), so on an
expert-parallel mesh each bucket compiles to all-to-alls over the ``expert`` axis.

With a capacity limit ``C`` (not dropless) the ladder is capped at ``C`` and the load is that of the
kept assignments: the layer drops exactly what ``gather`` drops and computes with a smaller bucket
when no expert fills ``C`` (e.g. in eval at capacity factor 2).
"""

from __future__ import annotations

import dataclasses
import math

import jax
import jax.numpy as jnp
import numpy as np

from moejax.moe.dispatch import Backend, ExpertStages, from_experts, to_experts
from moejax.moe.plan import RoutingPlan, TokenChoicePlan
from moejax.moe.rows import pad_row, sum_choices, take_rows
from moejax.sharding import constrain

DEFAULT_BUCKETS = (1.0, 1.0625, 1.125, 1.1875, 1.25, 1.375, 1.5, 1.75, 2.0, 3.0)
MULTIPLE = 8


def bucket_capacities(tokens_per_group: int, num_experts: int, choices: int, exact: int,
                      factors=DEFAULT_BUCKETS, multiple: int = MULTIPLE) -> tuple[int, ...]:
    """The ladder: ``min(round_up(ceil(f * choices * t / e), multiple), exact)`` for each factor,
    sorted, without repeats (``exact``: the most slots one expert can need, ``t`` or ``k * t``)."""
    mean = choices * tokens_per_group / num_experts
    caps = {min(-(-max(1, math.ceil(f * mean)) // multiple) * multiple, exact) for f in factors}
    return tuple(sorted(caps))


def pick_bucket(caps: tuple[int, ...], need: jax.Array) -> jax.Array:
    """int32 index of the smallest capacity in ``caps`` holding ``need`` slots (the last if none)."""
    return jnp.minimum(jnp.sum(jnp.asarray(caps) < need), len(caps) - 1)


def _zeros_cotangent(tree):
    """Zero cotangents of the non-differentiable inputs (float0 for ints, bools and keys)."""
    def z(a):
        if jnp.issubdtype(a.dtype, jnp.inexact):
            return jnp.zeros_like(a)
        return np.zeros(a.shape, jax.dtypes.float0)
    return jax.tree.map(z, tree)


class _Round:
    """Index maps of one round of capacity ``c``: the assignments with slot in ``[r c, (r+1) c)``."""

    def __init__(self, plan_arrays, c: int, r, num_experts: int, t: int):
        token, expert, slot, kept = plan_arrays
        g, a = token.shape
        n = num_experts * c
        lslot = slot - r * c
        self.inside = kept & (lslot >= 0) & (lslot < c)                       # [g, a]
        self.dest = jnp.where(self.inside, expert * c + lslot, n)             # [g, a], n = out of bounds
        self.slot_tokens = jax.vmap(lambda dd, tok: jnp.full((n,), t, jnp.int32).at[dd].set(tok, mode="drop"))(
            self.dest, token)                                                 # [g, e*c], t = empty
        self.slot_assign = jax.vmap(lambda dd: jnp.full((n,), a, jnp.int32).at[dd].set(
            jnp.arange(a, dtype=jnp.int32), mode="drop"))(self.dest)          # [g, e*c], a = empty
        self.shape = (g, num_experts, c)

    def to_buffers(self, rows, sentinel_rows, rules, last: str):
        """``rows [g, z, w]`` gathered at ``sentinel_rows [g, e*c]`` (``z`` = empty) -> ``[e, g*c, w]``."""
        g, e, c = self.shape
        buf = take_rows(pad_row(rows), sentinel_rows).reshape(g, e, c, rows.shape[-1])
        buf = to_experts(buf, rules, last)
        return buf.reshape(e, g * c, rows.shape[-1])

    def from_buffers(self, buf, rules, last: str):
        """``[e, g*c, w]`` -> rows per assignment ``[g, a, w]`` (0 outside this round)."""
        g, e, c = self.shape
        out = from_experts(buf.reshape(e, g, c, buf.shape[-1]), rules, last).reshape(g, e * c, buf.shape[-1])
        rows = take_rows(out, self.dest)
        rows = jnp.where(self.inside[..., None], rows, jnp.zeros((), rows.dtype))
        return constrain(rows, ("batch", None, last), rules)


def _bucketed(stages: ExpertStages, caps: tuple[int, ...], exact: int, num_experts: int, rules, autodiff=False):
    """``f(params, x [g,t,d], w [g,a], nd) -> y [g,t,d]`` with the bucket VJP; ``nd`` = (rest state,
    key, token, expert, slot, kept, need): the non-differentiable inputs."""
    top = caps[-1]
    loops = top < exact          # only the top bucket may need more than one round

    def rounds(c, need):
        return (need + c - 1) // c if (c == top and loops) else 1

    def fold(key, r):
        return None if key is None else jax.random.fold_in(key, r)

    def forward_round(c, r, params, x, nd, acc):
        rest, key, *arrays, need = nd
        t = x.shape[1]
        rd = _Round(arrays, c, r, num_experts, t)
        buf = rd.to_buffers(x, rd.slot_tokens, rules, "embed")
        pre = stages.up(params, rest, buf)
        yb = stages.down(params, rest, pre, fold(key, r))
        y_rows, pre_rows = acc
        y_rows = y_rows + rd.from_buffers(yb, rules, "embed")
        pre_rows = jax.tree.map(lambda old, p: old + rd.from_buffers(p, rules, "mlp"), pre_rows, pre)
        return y_rows, pre_rows

    def run_forward(c, params, x, w, nd):
        need = nd[-1]
        g, t, d = x.shape
        a = w.shape[1]
        pre_shapes = jax.eval_shape(lambda: stages.up(params, nd[0], jnp.zeros((num_experts, 1, d), x.dtype)))
        acc = (jnp.zeros((g, a, d), stages.out_dtype),
               jax.tree.map(lambda s: jnp.zeros((g, a, s.shape[-1]), s.dtype), pre_shapes))
        n = rounds(c, need)
        if isinstance(n, int):
            acc = forward_round(c, 0, params, x, nd, acc)
        elif autodiff:           # reverse-differentiable: every possible round, unrolled
            for r in range(-(-exact // c)):
                acc = forward_round(c, r, params, x, nd, acc)
        else:
            acc = jax.lax.fori_loop(0, n, lambda r, acc: forward_round(c, r, params, x, nd, acc), acc)
        y_rows, pre_rows = acc
        y = sum_choices(y_rows * w[..., None].astype(y_rows.dtype), a // t)
        return y.astype(stages.out_dtype), y_rows, pre_rows

    def switch(need, fns, *operands):
        if len(fns) == 1:
            return fns[0](*operands)
        return jax.lax.switch(pick_bucket(caps, need), fns, *operands)

    def primal(params, x, w, nd):
        fns = [lambda p, x, w, nd, c=c: run_forward(c, p, x, w, nd)[0] for c in caps]
        return switch(nd[-1], fns, params, x, w, nd)

    if autodiff:
        return primal
    f = jax.custom_vjp(primal)

    def f_fwd(params, x, w, nd):
        fns = [lambda p, x, w, nd, c=c: run_forward(c, p, x, w, nd) for c in caps]
        y, y_rows, pre_rows = switch(nd[-1], fns, params, x, w, nd)
        return y, (params, x, w, nd, y_rows, pre_rows)

    def backward_round(c, r, params, x, w, nd, pre_rows, dy, acc):
        rest, key, *arrays, need = nd
        g, t, d = x.shape
        rd = _Round(arrays, c, r, num_experts, t)
        w_slot = jnp.where(rd.slot_assign < w.shape[1],
                           jnp.take_along_axis(w, jnp.minimum(rd.slot_assign, w.shape[1] - 1), axis=1), 0.0)
        dyb = take_rows(pad_row(dy), rd.slot_tokens) * w_slot[..., None].astype(dy.dtype)     # [g, e*c, d]
        dyb = to_experts(dyb.reshape(g, num_experts, c, d), rules, "embed").reshape(num_experts, g * c, d)
        pre = jax.tree.map(lambda p: rd.to_buffers(p, rd.slot_assign, rules, "mlp"), pre_rows)
        buf = rd.to_buffers(x, rd.slot_tokens, rules, "embed")
        k_r = fold(key, r)
        _, vjp_down = jax.vjp(lambda p, pr: stages.down(p, rest, pr, k_r), params, pre)
        dp_down, dpre = vjp_down(dyb.astype(stages.out_dtype))
        _, vjp_up = jax.vjp(lambda p, b: stages.up(p, rest, b), params, buf)
        dp_up, dbuf = vjp_up(dpre)
        dparams, dx_rows = acc
        dparams = jax.tree.map(lambda s, u, v: s + u + v, dparams, dp_down, dp_up)
        return dparams, dx_rows + rd.from_buffers(dbuf, rules, "embed")

    def run_backward(c, params, x, w, nd, pre_rows, dy):
        g, t, d = x.shape
        a = w.shape[1]
        acc = (jax.tree.map(jnp.zeros_like, params), jnp.zeros((g, a, d), x.dtype))
        n = rounds(c, nd[-1])
        if isinstance(n, int):
            acc = backward_round(c, 0, params, x, w, nd, pre_rows, dy, acc)
        else:
            acc = jax.lax.fori_loop(0, n, lambda r, acc: backward_round(c, r, params, x, w, nd, pre_rows, dy, acc),
                                    acc)
        dparams, dx_rows = acc
        return dparams, sum_choices(dx_rows, a // t)

    def f_bwd(res, dy):
        params, x, w, nd, y_rows, pre_rows = res
        g, t, d = x.shape
        a = w.shape[1]
        k = a // t
        # dw[g, j*t+i] = <y_rows[g, j*t+i], dy[g, i]> (a batched dot; zero where not kept)
        dw = jnp.einsum("gktd,gtd->gkt", y_rows.reshape(g, k, t, d), dy.astype(y_rows.dtype)).reshape(g, a)
        fns = [lambda p, x, w, nd, pr, dy, c=c: run_backward(c, p, x, w, nd, pr, dy) for c in caps]
        dparams, dx = switch(nd[-1], fns, params, x, w, nd, pre_rows, dy)
        return dparams, dx.astype(x.dtype), dw.astype(w.dtype), _zeros_cotangent(nd)

    f.defvjp(f_fwd, f_bwd)
    return f


@dataclasses.dataclass(frozen=True)
class BucketBackend(Backend):
    """Dispatch with run-time capacity buckets, the default for dropless layers (see the module
    docstring); token-choice routers only, plain experts only. ``factors``:
    the ladder of capacity factors (``MoeConfig.capacity_buckets``). ``autodiff``: differentiate
    with JAX's own rules through the switch instead of the bucket VJP (every branch's residuals are
    kept; for checking the VJP)."""

    factors: tuple[float, ...] = DEFAULT_BUCKETS
    autodiff: bool = False
    supports_hierarchical = False
    token_choice_only = True

    @classmethod
    def from_config(cls, cfg) -> BucketBackend:
        return cls(cfg.axis_rules, tuple(cfg.capacity_buckets))

    @classmethod
    def check_config(cls, cfg) -> None:
        super().check_config(cfg)
        if not cfg.capacity_buckets or not all(f > 0 for f in cfg.capacity_buckets):
            raise ValueError(f"capacity_buckets must be a non-empty tuple of factors > 0, got "
                             f"{cfg.capacity_buckets!r}")

    def capacities(self, plan: RoutingPlan) -> tuple[int, ...]:
        """The compiled ladder for this plan's group size (``plan.capacity`` is the exact bound)."""
        a = plan.token.shape[1]
        return bucket_capacities(plan.tokens_per_group, plan.num_experts, a // plan.tokens_per_group,
                                 plan.capacity, self.factors)

    def buffer_capacity(self, capacity: int, tokens_per_group: int, choices: int, num_experts: int) -> int:
        """Slots per expert and group of the largest buffers this backend allocates."""
        return bucket_capacities(tokens_per_group, num_experts, choices, capacity, self.factors)[-1]

    def capacity_used(self, plan: RoutingPlan) -> jax.Array:
        caps = self.capacities(plan)
        need = plan.max_load()
        c = jnp.asarray(caps)[pick_bucket(caps, need)]
        return (jnp.maximum((need + c - 1) // c, 1) * c).astype(jnp.int32)

    def __call__(self, x, plan, experts):
        if not isinstance(plan, TokenChoicePlan):
            raise ValueError(f"backend='bucket' needs a token-choice routing plan, got {type(plan).__name__}")
        stages = experts.stages()
        nd = (stages.rest, stages.key, plan.token, plan.expert, plan.slot, plan.kept, plan.max_load())
        f = _bucketed(stages, self.capacities(plan), plan.capacity, plan.num_experts, self.rules, self.autodiff)
        return f(stages.params, x, plan.kept_weight(), nd)
