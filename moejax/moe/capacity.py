"""Token groups, expert-capacity arithmetic and slot assignment, all with static shapes.

Shape letters (README legend): ``g`` groups, ``t`` tokens per group, ``e`` experts,
``c`` capacity, ``a`` assignments ((token, choice) pairs) of a group.
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp

from moejax.sharding import logical_to_spec, spec_divisor


def num_groups(num_tokens: int, max_group_size: int, multiple: int = 1) -> int:
    """Smallest number of equal groups ``g`` with ``num_tokens / g <= max_group_size``.

    ``g`` divides ``num_tokens``; among those, a multiple of ``multiple`` (the number of batch
    shards) is preferred so that the group axis can be sharded. Raises if none exists.
    """
    if num_tokens < 1:
        raise ValueError(f"cannot route {num_tokens} tokens; the input must have at least one token")
    lo = max(1, -(-num_tokens // max_group_size))
    candidates = [g for g in range(lo, num_tokens + 1) if num_tokens % g == 0]
    for g in candidates:
        if g % multiple == 0:
            return g
    raise ValueError(
        f"{num_tokens} tokens cannot be split into a multiple of {multiple} groups of at most "
        f"{max_group_size} tokens; make batch*length divisible by {multiple}"
    )


def group_multiple(cfg, batch_shards: int | None = None) -> int:
    """The multiple the number of token groups is made of for ``cfg`` (a :class:`MoeConfig`) on a
    mesh of ``batch_shards`` batch shards (default: those of the current ``jax.set_mesh`` mesh under
    ``cfg.axis_rules``; none: 1): ``cfg.group_multiple``, raised to a multiple of the batch shards
    when the grouping cannot change the layer's result: a dropless layer (every assignment is
    computed, whatever the groups) whose load-balancing loss is not taken per group
    (``balance_loss_scope`` ``'global'`` or ``'sequence'``; the z-loss and the selection-bias load
    are means over all tokens). Then the group axis splits over the devices instead of every device
    computing every group."""
    if not cfg.dropless or cfg.balance_loss_scope == "group":
        return cfg.group_multiple
    if batch_shards is None:
        mesh = jax.sharding.get_abstract_mesh()
        empty = mesh is None or mesh.empty
        batch_shards = 1 if empty else spec_divisor(logical_to_spec(("batch",), cfg.axis_rules, mesh), mesh, 0)
    return math.lcm(cfg.group_multiple, batch_shards)


def layer_groups(cfg, batch: int, seq_len: int, batch_shards: int | None = None) -> int:
    """Token groups of an MoE layer called on ``[batch, seq_len]`` tokens: one per sequence with
    ``sequence_groups``, else :func:`num_groups` with :func:`group_multiple` (``cfg.group_multiple``
    when the tokens do not split into the mesh's multiple)."""
    if cfg.sequence_groups:
        return batch
    n = batch * seq_len
    m = group_multiple(cfg, batch_shards)
    if m != cfg.group_multiple:
        try:
            return num_groups(n, cfg.max_group_size, m)
        except ValueError:
            pass
    return num_groups(n, cfg.max_group_size, cfg.group_multiple)


def expert_capacity(
    tokens_per_group: int, num_experts: int, capacity_factor: float, top_k: int, min_capacity: int
) -> int:
    """Expert capacity ``C = max(ceil(cf * k * t / E), min_capacity)``.

    ``t`` = tokens per group, ``E`` = experts, ``k`` = experts per token. Unlike flaxformer (which
    rounds and ignores ``k``), the k factor makes top-2 at cf=1.0 leave room for both choices.
    """
    return max(int(math.ceil(capacity_factor * top_k * tokens_per_group / num_experts)), int(min_capacity))


def assign_slots(
    expert: jax.Array, priority: jax.Array, valid: jax.Array, num_experts: int, capacity: int
) -> tuple[jax.Array, jax.Array]:
    """Give every valid assignment a slot in its expert's buffer, in priority order.

    Args:
      expert: ``[g, a]`` int expert index of each assignment.
      priority: ``[g, a]`` int, a permutation of ``0..a-1`` per group; lower = placed first.
      valid: ``[g, a]`` bool, assignments that ask for a slot (routed, not padding).
      num_experts: ``E``.
      capacity: ``C``; slots ``>= C`` are dropped.

    Returns:
      slot ``[g, a]`` int32 (position among the valid assignments to the same expert, 0-based,
      in priority order; arbitrary where not valid) and kept ``[g, a]`` bool
      (``valid & slot < C``).

    Cost O(a log a) per group (one sort), independent of ``E``.
    """
    g, a = expert.shape
    e_key = jnp.where(valid, expert, num_experts).astype(jnp.int32)
    key = e_key * a + priority.astype(jnp.int32)
    order = jnp.argsort(key, axis=-1)
    sorted_e = jnp.take_along_axis(e_key, order, axis=-1)
    counts = jax.vmap(lambda ee: jnp.zeros((num_experts + 1,), jnp.int32).at[ee].add(1))(e_key)
    starts = jnp.cumsum(counts, axis=-1) - counts
    slot_sorted = jnp.arange(a, dtype=jnp.int32)[None, :] - jnp.take_along_axis(starts, sorted_e, axis=-1)
    slot = jax.vmap(lambda o, s: jnp.zeros((a,), jnp.int32).at[o].set(s))(order, slot_sorted)
    kept = valid & (slot < capacity)
    return slot, kept


def layer_capacity(cfg, tokens_per_group: int, deterministic: bool) -> int:
    """Slots per expert and group of an MoE layer configured by ``cfg`` (a :class:`MoeConfig`).

    Dropless: ``C = t`` (merged experts can receive up to k choices of one token: ``k * t``); a
    fixed ``expert_capacity`` wins next; else :func:`expert_capacity` with the eval or train
    capacity factor, chosen by ``deterministic``.
    """
    if cfg.dropless:
        return tokens_per_group * (cfg.top_k if cfg.expert_map is not None else 1)
    if cfg.expert_capacity is not None:
        return cfg.expert_capacity
    cf = cfg.capacity_factor_eval if deterministic else cfg.capacity_factor_train
    return expert_capacity(tokens_per_group, cfg.num_experts, cf, cfg.top_k, cfg.min_capacity)
