"""Dispatch backends: move tokens to ``[e, g, c, d]`` expert buffers and back, or run dropless.

Every backend is one callable ``backend(x [g, t, d], plan, experts) -> y [g, t, d]`` consuming one
:class:`~moejax.moe.plan.RoutingPlan` and an :class:`ExpertCall`; they give the same numbers:

* :class:`EinsumBackend` (``"einsum"``): one-hot dispatch / combine tensors ``[g, t, e, c]`` (the
  T5X / GShard reference); cost O(t * e * c * d) per group.
* :class:`GatherBackend` (``"gather"``): index arithmetic; the buffers are filled by a gather of
  token rows and the output collected by a gather of buffer rows (token choice) or a scatter-add
  (expert choice); cost O((t * k + e * c) * d). The default on CPU / GPU.
* :class:`RaggedBackend` (``"ragged"``): no buffers; kept assignments are sorted by expert and run
  through a grouped matmul (``jax.lax.ragged_dot`` / Megablox), so no capacity padding is computed.
* :class:`moejax.moe.bucket.BucketBackend` (``"bucket"``): the dropless default; ``gather``'s buffers
  at a capacity picked at run time from a compiled ladder (its own module).

Buffers are constrained to ``('batch', None, 'capacity', 'embed')`` before and
``('expert', 'expert_group', 'capacity', 'embed')`` after the swap of the group and expert axes,
which on an expert-parallel mesh compiles to an all-to-all over the ``expert`` axis.
:func:`moejax.moe.factory.make_backend` maps ``MoeConfig.backend`` to these classes.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from typing import Any, NamedTuple, Protocol

import jax
import jax.numpy as jnp

from moejax.moe.plan import RoutingPlan
from moejax.sharding import DEFAULT_RULES, Rules, constrain


class ExpertStages(NamedTuple):
    """The experts of one call as pure functions, for backends with their own VJP (``bucket``).

    ``up(params, rest, buf [e, n, d]) -> pre`` (a pytree of ``[e, n, *]`` arrays) and
    ``down(params, rest, pre, key) -> [e, n, d]`` (in ``out_dtype``) compose to the experts'
    buffer form; ``params`` is the differentiable state, ``rest`` everything else (integer
    weights, RNG counters); ``key`` (None when deterministic) seeds the stochastic parts, drawn
    once per call so that a recomputation sees the same masks.
    """

    params: Any
    rest: Any
    up: Callable
    down: Callable
    key: jax.Array | None
    out_dtype: Any


class ExpertCall(Protocol):
    """What a backend may ask of the experts of one layer call."""

    def buffers(self, buf: jax.Array, slot_mask: jax.Array) -> jax.Array:
        """``buf [e, g, c, d]`` (expert ``i`` applied to ``buf[i]``), ``slot_mask [e, g, c]`` bool
        (filled slots) -> ``[e, g, c, d]``."""

    def sorted_rows(self, xs: jax.Array, group_sizes: jax.Array) -> jax.Array:
        """``xs [z, d]`` sorted by expert, ``group_sizes [e]`` -> ``[z, d]``."""

    def stages(self) -> ExpertStages:
        """The experts as pure up / down functions (see :class:`ExpertStages`)."""


def to_experts(buf: jax.Array, rules: Rules, last: str = "embed") -> jax.Array:
    """``[g, e, c, w]`` -> ``[e, g, c, w]`` with the all-to-all sharding constraints (``last``: the
    logical name of the row axis ``w``)."""
    buf = constrain(buf, ("batch", None, "capacity", last), rules)
    buf = jnp.swapaxes(buf, 0, 1)
    return constrain(buf, ("expert", "expert_group", "capacity", last), rules)


def from_experts(buf: jax.Array, rules: Rules, last: str = "embed") -> jax.Array:
    """``[e, g, c, w]`` -> ``[g, e, c, w]`` (the return all-to-all)."""
    buf = constrain(buf, ("expert", "expert_group", "capacity", last), rules)
    buf = jnp.swapaxes(buf, 0, 1)
    return constrain(buf, ("batch", None, "capacity", last), rules)


@dataclasses.dataclass(frozen=True)
class Backend:
    """Base of the dispatch backends (``rules``: the logical -> mesh axis table of the
    activation constraints). ``supports_hierarchical``: experts may themselves be MoE layers;
    ``expert_parallel``: the experts' buffers are split over the ``expert`` mesh axis;
    ``token_choice_only``: routers with a fixed capacity (expert choice) are refused."""

    rules: Rules = DEFAULT_RULES
    supports_hierarchical = True
    expert_parallel = True
    token_choice_only = False

    @classmethod
    def from_config(cls, cfg) -> Backend:
        """The backend of ``MoeConfig`` ``cfg`` (its activation axis rules)."""
        return cls(cfg.axis_rules)

    def buffer_capacity(self, capacity: int, tokens_per_group: int, choices: int, num_experts: int) -> int:
        """Slots per expert and group of the largest buffers this backend allocates for a layer of
        ``capacity`` (:func:`moejax.moe.capacity.layer_capacity`)."""
        return capacity

    def capacity_used(self, plan: RoutingPlan) -> jax.Array:
        """int32 scalar: the slots per expert and group this call computes (``plan.capacity``)."""
        return jnp.int32(plan.capacity)

    @classmethod
    def check_config(cls, cfg) -> None:
        """Raise a ValueError naming the field when ``cfg`` asks for what this backend cannot do."""
        if cfg.inner is not None and not cls.supports_hierarchical:
            raise ValueError(f"hierarchical experts (inner MoE) need backend 'gather' or 'einsum', not "
                             f"{cfg.backend!r}")

    def __call__(self, x: jax.Array, plan: RoutingPlan, experts: ExpertCall) -> jax.Array:
        raise NotImplementedError

    def _run_buffers(self, buf: jax.Array, plan: RoutingPlan, experts: ExpertCall) -> jax.Array:
        """``buf [g, e, c, d]`` -> expert outputs ``[g, e, c, d]`` across the all-to-all."""
        g, e, c, _ = buf.shape
        slot_mask = jnp.swapaxes((plan.slot_tokens() < plan.tokens_per_group).reshape(g, e, c), 0, 1)
        return from_experts(experts.buffers(to_experts(buf, self.rules), slot_mask), self.rules)


@dataclasses.dataclass(frozen=True)
class EinsumBackend(Backend):
    """One-hot dispatch / combine einsums (the reference)."""

    def __call__(self, x, plan, experts):
        mask = plan.dispatch_mask()
        buf = jnp.einsum("gtec,gtd->gecd", mask.astype(x.dtype), x)
        out = self._run_buffers(buf, plan, experts)
        return jnp.einsum("gecd,gtec->gtd", out, plan.combine_tensor().astype(out.dtype))


@dataclasses.dataclass(frozen=True)
class GatherBackend(Backend):
    """Index gathers into ``[e, g, c, d]`` buffers; token-choice plans use gathers in both
    directions, forward and backward (custom VJPs with the slot <-> assignment maps)."""

    def __call__(self, x, plan, experts):
        g, t, d = x.shape
        e, c = plan.num_experts, plan.capacity
        out = self._run_buffers(plan.fill(x).reshape(g, e, c, d), plan, experts)
        return plan.collect(out.reshape(g, e * c, d))


@dataclasses.dataclass(frozen=True)
class RaggedBackend(Backend):
    """Sort kept assignments by expert, grouped matmul, unsort. Only kept assignments are computed
    (``group_sizes`` counts them); capacity never pads. Expert weights are not sharded over an
    ``expert`` mesh axis by this path (use ``gather`` or ``einsum`` for expert parallelism)."""

    supports_hierarchical = False
    expert_parallel = False

    def __call__(self, x, plan, experts):
        g, t, d = x.shape
        order, group_sizes, rows = plan.sort_by_expert()
        ys = experts.sorted_rows(jnp.take(x.reshape(g * t, d), rows, axis=0), group_sizes)
        return plan.collect_sorted(ys, order, rows)
