"""Routers: logits (float32, whatever the param dtype) -> one RoutingPlan for every backend.

Letters: ``g`` groups, ``t`` tokens per group, ``e`` experts, ``k`` top-k, ``c`` capacity,
``a`` assignments per group, ``d`` d_model.

A :class:`RoutingPlan` is a flat list of assignments per group, each a (token, expert, slot,
weight) tuple with ``routed`` (asked for an expert) and ``kept`` (got a slot) masks. Two layouts:

* ``token_major`` (tokens choose): ``a = k * t``, assignment ``j * t + i`` is token ``i``'s
  ``j``-th choice; all first choices come before any second choice.
* ``expert_major`` (expert choice): ``a = e * c``, assignment ``x * c + s`` is slot ``s`` of
  expert ``x``.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import nnx, struct

from moejax.moe.capacity import assign_slots


@struct.dataclass
class RoutingPlan:
    """Where every token goes. Shapes ``[g, a]`` unless noted.

    token: int32 token index within its group. expert: int32 expert index. slot: int32 position in
    the expert's capacity buffer (valid where ``kept``). weight: float32 combine weight (0 where
    not kept). routed: bool, the assignment was requested (not padding, not removed by the
    second-expert policy). kept: bool, routed and within capacity.
    selected: ``[g, t, k]`` int32 experts chosen per token before policy and capacity (for the
    load-balancing loss; ``[g, t, 0]`` for expert choice).
    """

    token: jax.Array
    expert: jax.Array
    slot: jax.Array
    weight: jax.Array
    routed: jax.Array
    kept: jax.Array
    selected: jax.Array
    num_experts: int = struct.field(pytree_node=False)
    capacity: int = struct.field(pytree_node=False)
    layout: str = struct.field(pytree_node=False)

    @property
    def tokens_per_group(self) -> int:
        return self.selected.shape[1]


class Router(nnx.Module):
    """Linear router ``logits = x @ W (+ b)`` computed in float32 ("selective precision").

    With ``noisy=True`` it also owns the noise projection of noisy top-k gating. Params:
    ``kernel [d, e]`` (logical ``('embed', 'unmodeled')``), optional ``bias [e]``,
    ``noise_kernel [d, e]``.
    """

    def __init__(self, d_model: int, num_experts: int, *, use_bias: bool = False, noisy: bool = False,
                 init_std: float = 0.02, param_dtype=jnp.float32, compute_dtype=jnp.float32, rngs: nnx.Rngs):
        self.compute_dtype = compute_dtype
        self.kernel = nnx.Param(
            jax.random.normal(rngs.params(), (d_model, num_experts), jnp.float32).astype(param_dtype) * init_std,
            logical_axes=("embed", "unmodeled"),
        )
        self.bias = (
            nnx.Param(jnp.zeros((num_experts,), param_dtype), logical_axes=("unmodeled",)) if use_bias else None
        )
        # Shazeer et al. initialise the noise weights to zero (noise std softplus(0) ~ 0.69).
        self.noise_kernel = (
            nnx.Param(jnp.zeros((d_model, num_experts), param_dtype), logical_axes=("embed", "unmodeled"))
            if noisy else None
        )

    def __call__(self, x: jax.Array) -> jax.Array:
        """``x [g, t, d]`` -> logits ``[g, t, e]`` float32 (computed in ``compute_dtype``: float32
        unless an experiment asks for a bfloat16 router)."""
        dt = self.compute_dtype
        logits = jnp.einsum("gtd,de->gte", x.astype(dt), self.kernel[...].astype(dt))
        if self.bias is not None:
            logits = logits + self.bias[...].astype(dt)
        return logits.astype(jnp.float32)

    def noise_std(self, x: jax.Array) -> jax.Array:
        """Noisy top-k: ``softplus(x @ W_noise)`` ``[g, t, e]`` float32."""
        return jax.nn.softplus(
            jnp.einsum("gtd,de->gte", x.astype(jnp.float32), self.noise_kernel[...].astype(jnp.float32))
        )


class TaskRouter(nnx.Module):
    """Task-level router: a learned logit table ``table [num_tasks, e]`` (logical
    ``('unmodeled', 'unmodeled')``); ``task_ids [b]`` -> logits ``[b, e]`` float32."""

    def __init__(self, num_tasks: int, num_experts: int, *, init_std: float = 0.02, param_dtype=jnp.float32,
                 rngs: nnx.Rngs):
        self.table = nnx.Param(
            jax.random.normal(rngs.params(), (num_tasks, num_experts), jnp.float32).astype(param_dtype) * init_std,
            logical_axes=("unmodeled", "unmodeled"))
        self.num_tasks = num_tasks

    def __call__(self, task_ids: jax.Array) -> jax.Array:
        return jnp.take(self.table[...].astype(jnp.float32), task_ids.astype(jnp.int32), axis=0)


def _priority(probs: jax.Array, k: int, batch_prioritized: bool) -> jax.Array:
    """``[g, k*t]`` priority of each token-major assignment: choice first, then token order
    (or descending top-1 probability with BPR)."""
    g, t, _ = probs.shape
    if batch_prioritized:
        order = jnp.argsort(-jnp.max(probs, axis=-1), axis=-1, stable=True)
        rank = jnp.argsort(order, axis=-1)
    else:
        rank = jnp.broadcast_to(jnp.arange(t), (g, t))
    prio = jnp.arange(k)[None, :, None] * t + rank[:, None, :]
    return prio.reshape(g, k * t).astype(jnp.int32)


def top_k_route(
    logits: jax.Array,
    *,
    k: int,
    capacity: int,
    token_mask: jax.Array,
    policy: str = "all",
    weight_norm: str = "none",
    batch_prioritized: bool = False,
    train: bool = False,
    rng: jax.Array | None = None,
    probs: jax.Array | None = None,
    expert_map: jax.Array | None = None,
    num_experts: int | None = None,
) -> RoutingPlan:
    """Tokens choose their top-k experts (Switch k=1, GShard / Mixtral k=2, or any k).

    Args:
      logits: ``[g, t, e]`` float32 router logits.
      k: experts per token.
      capacity: slots per expert and group; assignments beyond it are dropped.
      token_mask: ``[g, t]`` bool, False for padding (never routed, never counted).
      policy: second-expert policy for k == 2 (``all`` / ``random`` / ``sampling``); the random
        policies act only when ``train``; in eval both behave as ``all``.
      weight_norm: ``none`` (raw softmax prob), ``topk`` (renormalised over the k choices before
        capacity, Mixtral), ``kept`` (renormalised over the kept choices, GShard/fairseq).
      batch_prioritized: fill capacity by descending top-1 probability instead of token order.
      train: training mode (enables the random policies).
      rng: PRNG key for the random policies.
      probs: optional ``[g, t, e]`` probabilities to use instead of ``softmax(logits)``.
      expert_map: optional ``[e]`` int: router output ``i`` is served by expert ``expert_map[i]``
        of ``num_experts`` physical experts (merged experts); ``selected`` stays in router space.

    Returns:
      a token-major :class:`RoutingPlan` with ``a = k * t``.
    """
    g, t, e = logits.shape
    if probs is None:
        probs = jax.nn.softmax(logits, axis=-1)
    random_policy = train and policy in ("random", "sampling") and k == 2
    if random_policy and rng is None:
        raise ValueError(f"second_expert_policy={policy!r} needs an RNG in training")
    if random_policy and policy == "sampling":
        first = jnp.argmax(probs, axis=-1)
        gumbel = jax.random.gumbel(rng, logits.shape, jnp.float32)
        noisy = jnp.where(jax.nn.one_hot(first, e, dtype=bool), -jnp.inf, logits + gumbel)
        idx = jnp.stack([first, jnp.argmax(noisy, axis=-1)], axis=-1)
    else:
        _, idx = jax.lax.top_k(probs, k)
    idx = idx.astype(jnp.int32)  # [g, t, k]
    gate = jnp.take_along_axis(probs, idx, axis=-1)  # [g, t, k]
    routed = jnp.broadcast_to(token_mask[..., None], (g, t, k))
    if random_policy and policy == "random":
        u = jax.random.uniform(rng, (g, t), jnp.float32)
        keep2 = 2.0 * gate[..., 1] > u
        routed = routed.at[..., 1].set(routed[..., 1] & keep2)

    # token-major flattening: [g, t, k] -> [g, k*t]
    def flat(z):
        return jnp.swapaxes(z, 1, 2).reshape(g, k * t)

    phys = e if expert_map is None else int(num_experts)
    expert_f, routed_f = flat(idx if expert_map is None else jnp.asarray(expert_map, jnp.int32)[idx]), flat(routed)
    slot, kept = assign_slots(expert_f, _priority(probs, k, batch_prioritized), routed_f, phys, capacity)
    gate_f = flat(gate)
    if weight_norm == "topk":
        denom = flat(jnp.broadcast_to(jnp.sum(gate, axis=-1, keepdims=True), gate.shape))
        weight = gate_f / denom
    elif weight_norm == "kept":
        kept_tk = jnp.swapaxes(kept.reshape(g, k, t), 1, 2)
        denom = jnp.sum(gate * kept_tk, axis=-1, keepdims=True)
        denom = jnp.maximum(denom, jnp.finfo(jnp.float32).eps)
        weight = flat(gate / denom)
    else:
        weight = gate_f
    weight = jnp.where(kept, weight, 0.0)
    token = jnp.broadcast_to(jnp.tile(jnp.arange(t, dtype=jnp.int32), k), (g, k * t))
    return RoutingPlan(token=token, expert=expert_f, slot=slot, weight=weight, routed=routed_f, kept=kept,
                       selected=idx, num_experts=phys, capacity=capacity, layout="token_major")


def expert_choice_route(logits: jax.Array, *, capacity: int, token_mask: jax.Array) -> RoutingPlan:
    """Expert choice (Zhou et al. 2022): each expert takes its top-C tokens of the group.

    Not causal: whether token i is processed depends on the scores of every token of its group,
    later ones included, so it must not be used for autoregressive decoding.

    Args:
      logits: ``[g, t, e]`` float32. capacity: C (clipped to ``t``). token_mask: ``[g, t]`` bool.

    Returns:
      an expert-major :class:`RoutingPlan` with ``a = e * C``; the weight is the token's softmax
      probability (over experts) for that expert. Padding tokens are never chosen over real ones
      and are marked not kept if a group has fewer than C real tokens.
    """
    g, t, e = logits.shape
    c = min(capacity, t)
    probs = jax.nn.softmax(logits, axis=-1)
    scores = jnp.where(token_mask[..., None], probs, -1.0)
    vals, tok = jax.lax.top_k(jnp.swapaxes(scores, 1, 2), c)  # [g, e, c]
    tok = tok.astype(jnp.int32).reshape(g, e * c)
    kept = jnp.take_along_axis(token_mask, tok, axis=-1)
    weight = jnp.where(kept, vals.reshape(g, e * c), 0.0)
    expert = jnp.broadcast_to(jnp.repeat(jnp.arange(e, dtype=jnp.int32), c), (g, e * c))
    slot = jnp.broadcast_to(jnp.tile(jnp.arange(c, dtype=jnp.int32), e), (g, e * c))
    return RoutingPlan(token=tok, expert=expert, slot=slot, weight=weight, routed=kept, kept=kept,
                       selected=jnp.zeros((g, t, 0), jnp.int32), num_experts=e, capacity=c,
                       layout="expert_major")
