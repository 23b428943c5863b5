"""RoutingPlan: the one data structure between routing and dispatch.

Shape letters (README legend): ``g`` groups, ``t`` tokens per group, ``e`` experts,
``k`` top-k, ``c`` capacity, ``a`` assignments per group, ``r`` router outputs, ``d`` d_model.

A plan is a flat list of assignments per group, each a (token, expert, slot, weight) tuple with
``routed`` (asked for an expert) and ``kept`` (got a slot) masks. The order of the assignments is
the plan's *layout*, and each layout is its own class:

* :class:`TokenChoicePlan` (tokens choose): ``a = k * t``, assignment ``j * t + i`` is token
  ``i``'s ``j``-th choice; all first choices come before any second choice.
* :class:`ExpertChoicePlan` (experts choose): ``a = e * c``, assignment ``i * c + j`` is slot ``j``
  of expert ``i``.

The few operations whose fastest form depends on the layout are methods of the plan (dense
one-hot tensors, buffer fill and collect, the ragged unsort, drop counts), so the dispatch backends
never ask which layout they hold.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import struct

from moejax.moe.rows import combine_rows, dispatch_rows, pad_row, scatter_rows, sum_choices, take_rows


@struct.dataclass
class RoutingPlan:
    """Where every token goes. Shapes ``[g, a]`` unless noted.

    token: int32 token index within its group. expert: int32 expert index. slot: int32 position in
    the expert's capacity buffer (valid where ``kept``). weight: float32 combine weight (0 where
    not kept). routed: bool, the assignment was requested (not padding, not removed by the
    second-expert policy). kept: bool, routed and within capacity.
    selected: ``[g, t, k]`` int32 experts chosen per token before policy and capacity (for the
    load-balancing loss; ``[g, t, 0]`` for expert choice). probs: ``[g, t, r]`` float32 router
    probabilities (``r`` router outputs), for the losses and metrics.
    """

    token: jax.Array
    expert: jax.Array
    slot: jax.Array
    weight: jax.Array
    routed: jax.Array
    kept: jax.Array
    selected: jax.Array
    probs: jax.Array
    num_experts: int = struct.field(pytree_node=False)
    capacity: int = struct.field(pytree_node=False)

    @property
    def tokens_per_group(self) -> int:
        return self.selected.shape[1]

    def max_load(self) -> jax.Array:
        """int32 scalar: the most kept assignments any expert holds in any group (dropless: routed)."""
        return jnp.max(jnp.where(self.kept, self.slot + 1, 0)).astype(jnp.int32)

    def kept_weight(self) -> jax.Array:
        """``[g, a]`` combine weights, 0 where not kept."""
        return jnp.where(self.kept, self.weight, 0.0)

    def sort_by_expert(self) -> tuple[jax.Array, jax.Array, jax.Array]:
        """For the ragged backend: ``(order [g*a], group_sizes [e], rows [g*a])`` — the kept
        assignments sorted by expert (not-kept ones last), the kept count per expert, and the
        global token row (``group * t + token``) of each sorted assignment."""
        g, _ = self.token.shape
        t, e = self.tokens_per_group, self.num_experts
        tok_global = (self.token + jnp.arange(g, dtype=jnp.int32)[:, None] * t).reshape(-1)
        key = jnp.where(self.kept, self.expert, e).reshape(-1)
        order = jnp.argsort(key, stable=True)
        group_sizes = jnp.zeros((e + 1,), jnp.int32).at[key].add(1)[:e]
        return order, group_sizes, tok_global[order]

    # ---- layout-specific operations (overridden by each layout)
    def dispatch_mask(self) -> jax.Array:
        """Boolean dispatch tensor ``[g, t, e, c]`` (True at each kept (token, expert, slot))."""
        raise NotImplementedError

    def combine_tensor(self) -> jax.Array:
        """Dense combine tensor ``[g, t, e, c]`` float32 (weight at each kept (token, expert, slot))."""
        raise NotImplementedError

    def slot_tokens(self) -> jax.Array:
        """``[g, e*c]`` int32: the token in each buffer slot, ``t`` (a sentinel) where empty."""
        raise NotImplementedError

    def fill(self, x: jax.Array) -> jax.Array:
        """``x [g, t, d]`` -> buffers ``[g, e*c, d]`` (empty slots are 0)."""
        raise NotImplementedError

    def collect(self, out: jax.Array) -> jax.Array:
        """Expert outputs ``[g, e*c, d]`` -> ``[g, t, d]``, weighted and summed per token."""
        raise NotImplementedError

    def collect_sorted(self, ys: jax.Array, order: jax.Array, rows: jax.Array) -> jax.Array:
        """Ragged outputs ``ys [g*a, d]`` in :meth:`sort_by_expert` order (``order`` and the global
        token ``rows`` it returned) -> ``[g, t, d]``."""
        raise NotImplementedError

    def drop_counts(self, mask: jax.Array, token_dropped: jax.Array, pos: jax.Array, seq_len: int):
        """``(num_routed, num_dropped, dropped [s], routed [s])``: int32 totals and float32 counts per
        sequence position (``pos [g, t]``) of what this layout calls routed and dropped. ``mask`` /
        ``token_dropped [g, t]`` bool: real tokens / real tokens that no expert processed."""
        raise NotImplementedError


@struct.dataclass
class TokenChoicePlan(RoutingPlan):
    """Tokens choose their experts: ``a = k * t``, choice-major (see the module docstring)."""

    @property
    def choices(self) -> int:
        return self.token.shape[1] // self.tokens_per_group

    def _dest(self, sentinel: int) -> jax.Array:
        return jnp.where(self.kept, self.expert * self.capacity + self.slot, sentinel)

    def dispatch_mask(self) -> jax.Array:
        e, c, t, k = self.num_experts, self.capacity, self.tokens_per_group, self.choices
        g = self.token.shape[0]
        oe = jax.nn.one_hot(jnp.where(self.kept, self.expert, e), e, dtype=jnp.float32)
        oc = jax.nn.one_hot(self.slot, c, dtype=jnp.float32)
        return jnp.einsum("gkte,gktc->gtec", oe.reshape(g, k, t, e), oc.reshape(g, k, t, c)) > 0

    def combine_tensor(self) -> jax.Array:
        e, c, t, k = self.num_experts, self.capacity, self.tokens_per_group, self.choices
        g = self.token.shape[0]
        oe = jax.nn.one_hot(self.expert, e, dtype=jnp.float32) * self.kept_weight()[..., None]  # [g, a, e]
        oc = jax.nn.one_hot(jnp.where(self.kept, self.slot, c), c, dtype=jnp.float32)  # [g, a, c]
        return jnp.einsum("gkte,gktc->gtec", oe.reshape(g, k, t, e), oc.reshape(g, k, t, c))

    def slot_tokens(self) -> jax.Array:
        n, t = self.num_experts * self.capacity, self.tokens_per_group
        return jax.vmap(lambda d, tok: jnp.full((n,), t, jnp.int32).at[d].set(tok, mode="drop"))(
            self._dest(n), self.token)   # n is out of bounds -> dropped

    def slot_assignments(self) -> jax.Array:
        """``[g, e*c]`` int32: the assignment held by each buffer slot (0 where empty)."""
        n, a = self.num_experts * self.capacity, self.token.shape[1]
        return jax.vmap(lambda dd: jnp.zeros((n,), jnp.int32).at[dd].set(jnp.arange(a, dtype=jnp.int32),
                                                                         mode="drop"))(self._dest(n))

    def fill(self, x: jax.Array) -> jax.Array:
        return dispatch_rows(x, self.slot_tokens(), self._dest(0), self.kept)

    def collect(self, out: jax.Array) -> jax.Array:
        w = self.kept_weight().astype(out.dtype)
        return combine_rows(self.tokens_per_group, out, w, self._dest(0), self.slot_tokens(),
                            self.slot_assignments())

    def collect_sorted(self, ys: jax.Array, order: jax.Array, rows: jax.Array) -> jax.Array:
        g, a = self.token.shape
        inv = jnp.argsort(order)
        rows = jnp.take(ys, inv, axis=0) * self.kept_weight().reshape(-1).astype(ys.dtype)[:, None]
        return sum_choices(rows.reshape(g, a, ys.shape[-1]), self.choices)

    def drop_counts(self, mask, token_dropped, pos, seq_len):
        routed, kept = self.routed, self.kept
        ppos = jnp.take_along_axis(pos, self.token, axis=1).reshape(-1)
        dropped = routed & ~kept
        drop_cnt = jnp.zeros((seq_len,), jnp.float32).at[ppos].add(dropped.reshape(-1))
        rout_cnt = jnp.zeros((seq_len,), jnp.float32).at[ppos].add(routed.reshape(-1))
        return jnp.sum(routed).astype(jnp.int32), jnp.sum(dropped).astype(jnp.int32), drop_cnt, rout_cnt


@struct.dataclass
class ExpertChoicePlan(RoutingPlan):
    """Experts choose their tokens: ``a = e * c``, expert-major (see the module docstring)."""

    def _token_one_hot(self, token: jax.Array) -> jax.Array:
        g, e, c, t = self.token.shape[0], self.num_experts, self.capacity, self.tokens_per_group
        return jax.nn.one_hot(token, t, dtype=jnp.float32).reshape(g, e, c, t)

    def dispatch_mask(self) -> jax.Array:
        ot = self._token_one_hot(jnp.where(self.kept, self.token, self.tokens_per_group))
        return jnp.transpose(ot, (0, 3, 1, 2)) > 0

    def combine_tensor(self) -> jax.Array:
        e, c = self.num_experts, self.capacity
        g, t = self.token.shape[0], self.tokens_per_group
        ot = jax.nn.one_hot(self.token, t, dtype=jnp.float32) * self.kept_weight()[..., None]  # [g, e*c, t]
        return jnp.transpose(ot.reshape(g, e, c, t), (0, 3, 1, 2))

    def slot_tokens(self) -> jax.Array:
        return jnp.where(self.kept, self.token, self.tokens_per_group)

    def fill(self, x: jax.Array) -> jax.Array:
        return take_rows(pad_row(x), self.slot_tokens())

    def collect(self, out: jax.Array) -> jax.Array:
        rows = out * self.kept_weight()[..., None].astype(out.dtype)
        return scatter_rows(rows, self.token, self.tokens_per_group)

    def collect_sorted(self, ys: jax.Array, order: jax.Array, rows: jax.Array) -> jax.Array:
        g, t, d = self.token.shape[0], self.tokens_per_group, ys.shape[-1]
        weighted = ys * self.kept_weight().reshape(-1)[order][:, None].astype(ys.dtype)
        return jnp.zeros((g * t, d), ys.dtype).at[rows].add(weighted).reshape(g, t, d)

    def drop_counts(self, mask, token_dropped, pos, seq_len):
        tok_dropped = token_dropped
        drop_cnt = jnp.zeros((seq_len,), jnp.float32).at[pos.reshape(-1)].add(tok_dropped.reshape(-1))
        rout_cnt = jnp.zeros((seq_len,), jnp.float32).at[pos.reshape(-1)].add(mask.reshape(-1))
        return jnp.sum(mask).astype(jnp.int32), jnp.sum(tok_dropped).astype(jnp.int32), drop_cnt, rout_cnt
