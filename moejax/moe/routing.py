"""Routers: each turns a group of tokens into one :class:`~moejax.moe.plan.RoutingPlan` plus its
:class:`RouterLosses`.

Shape letters (README legend): ``g`` groups, ``t`` tokens per group, ``e``
experts, ``r`` router outputs (``e`` unless experts were merged), ``k`` top-k, ``c`` capacity, ``a``
assignments per group, ``d`` d_model, ``b`` batch.

Every router is an ``nnx.Module`` with one call signature,
``router(x [g, t, d], mask [g, t], *, deterministic, rngs, task_ids=None) -> (plan, losses)``, and
computes its logits in float32 ("selective precision") whatever the parameter dtype. The base
:class:`Router` owns what all routers share (capacity, jitter, the z-loss and the load-balancing
loss); a subclass overrides :meth:`Router.plan` (and, for other inputs than the token's hidden
state, :meth:`Router.logits`):

* :class:`TopKRouter`: tokens choose their top-k experts (Switch k=1, GShard / Mixtral k=2; with
  sigmoid scores, group-limited selection, a :class:`SelectionBias` and ``routed_scale``:
  DeepSeek-V2/V3, see :meth:`TopKRouter.scored_plan`).
* :class:`NoisyTopKRouter`: Shazeer et al. 2017 noisy top-k gating with importance / load losses.
* :class:`ExpertChoiceRouter`: each expert takes its top-C tokens (Zhou et al. 2022; not causal).
* :class:`TaskRouter`: task-level routing from a learned ``[num_tasks, r]`` logit table.

:func:`moejax.moe.factory.make_router` maps ``MoeConfig.router`` to these classes.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import nnx, struct

from moejax.moe.capacity import assign_slots, layer_capacity
from moejax.moe.losses import importance_loss, load_balancing_loss, load_loss, router_z_loss
from moejax.moe.options import GroupScore, RouterScore, SecondExpertPolicy, WeightNorm
from moejax.moe.plan import ExpertChoicePlan, RoutingPlan, TokenChoicePlan


@struct.dataclass
class RouterLosses:
    """The auxiliary losses of one routing call (float32 scalars, unweighted).

    ``load_balancing_loss``: ``E * sum_e f_e * P_e`` (k at perfect balance; 0 for expert choice,
    which is balanced by construction). ``router_z_loss``: ``mean(logsumexp(logits)^2)``.
    ``importance_loss`` / ``load_loss``: Shazeer et al.'s CV^2 losses (noisy top-k in training,
    else 0).
    """

    load_balancing_loss: jax.Array
    router_z_loss: jax.Array
    importance_loss: jax.Array
    load_loss: jax.Array

    @classmethod
    def zeros(cls) -> RouterLosses:
        z = jnp.zeros((), jnp.float32)
        return cls(load_balancing_loss=z, router_z_loss=z, importance_loss=z, load_loss=z)

    def __add__(self, other: RouterLosses) -> RouterLosses:
        return jax.tree.map(jnp.add, self, other)


class Router(nnx.Module):
    """Base router: ``(x [g, t, d], mask [g, t], *, deterministic, rngs, task_ids=None) ->
    (RoutingPlan, RouterLosses)``.

    Class attributes state what the router supports, checked by :meth:`check_config` (called from
    ``MoeConfig.validate``): ``uses_task_ids`` (routes by the example's task id, ``task_ids [b]``
    needed), ``fixed_capacity`` (capacity is the routing rule itself: dropless is invalid),
    ``second_expert_policies`` (top-2 policies other than ``all`` it implements), ``expert_map``
    (can serve merged experts), ``scored_routing`` (implements the sigmoid / group-limited /
    selection-bias / routed-scale options).
    """

    uses_task_ids: bool = False
    scored_routing: bool = False
    fixed_capacity: bool = False
    second_expert_policies: tuple[str, ...] = ()
    expert_map: bool = False
    jitter: bool = True

    def __init__(self, cfg):
        self.cfg = cfg

    @classmethod
    def check_config(cls, cfg) -> None:
        """Raise a ValueError naming the field when ``cfg`` asks for what this router cannot do."""
        policy = cfg.second_expert_policy
        if policy != SecondExpertPolicy.ALL and not (policy in cls.second_expert_policies and cfg.top_k == 2):
            raise ValueError(
                f"second_expert_policy={policy!r} needs router='top_k' with top_k=2 (got router={cfg.router!r}, "
                f"top_k={cfg.top_k}); use 'all' otherwise")
        if cfg.expert_map is not None:
            bad = [v for v in cfg.expert_map if not 0 <= int(v) < cfg.num_experts]
            if bad or not cls.expert_map:
                raise ValueError(f"expert_map entries must lie in [0, {cfg.num_experts}) and need router='top_k'; "
                                 f"got {bad or cfg.router!r}")
        if cfg.deepseek_routing and not cls.scored_routing:
            raise ValueError(f"router_score / num_expert_groups / selection_bias / routed_scale need router='top_k', "
                             f"got router={cfg.router!r}")
        if cls.fixed_capacity and cfg.dropless:
            raise ValueError(f"router={cfg.router!r} has a fixed capacity by design; dropless=True is invalid")

    def logits(self, x: jax.Array, task_ids: jax.Array | None = None) -> jax.Array:
        """Router logits ``[g, t, r]`` float32."""
        raise NotImplementedError

    def plan(self, logits: jax.Array, mask: jax.Array, *, capacity: int, router_in: jax.Array,
             deterministic: bool, rngs: nnx.Rngs) -> tuple[RoutingPlan, RouterLosses]:
        """``logits [g, t, r]`` -> the plan and the router-specific losses (importance / load);
        the base call adds the z-loss and the load-balancing loss."""
        raise NotImplementedError

    def __call__(self, x: jax.Array, mask: jax.Array, *, deterministic: bool, rngs: nnx.Rngs,
                 task_ids: jax.Array | None = None, seq_len: int | None = None) -> tuple[RoutingPlan, RouterLosses]:
        cfg = self.cfg
        router_in = x
        if not deterministic and self.jitter and cfg.jitter_eps > 0:
            noise = jax.random.uniform(rngs.jitter(), x.shape, jnp.float32, 1.0 - cfg.jitter_eps, 1.0 + cfg.jitter_eps)
            router_in = x.astype(jnp.float32) * noise
        logits = self.logits(router_in, task_ids)
        cap = layer_capacity(cfg, x.shape[1], deterministic)
        plan, extra = self.plan(logits, mask, capacity=cap, router_in=router_in, deterministic=deterministic,
                                rngs=rngs)
        scope = lambda a: balance_view(a, cfg.balance_loss_scope, seq_len or x.shape[1])
        return plan, extra.replace(
            load_balancing_loss=load_balancing_loss(scope(plan.probs), scope(plan.selected), scope(mask)),
            router_z_loss=router_z_loss(logits, mask))


def balance_view(a: jax.Array, scope: str, seq_len: int) -> jax.Array:
    """``a [g, t, ...]`` regrouped for the load-balancing loss of ``scope`` (``MoeConfig.
    balance_loss_scope``): as is (``group``), ``[g*t / seq_len, seq_len, ...]`` (``sequence``: the
    groups hold the flattened ``[b, s]`` tokens in order) or ``[1, g*t, ...]`` (``global``)."""
    g, t = a.shape[:2]
    if scope == "global":
        return a.reshape((1, g * t) + a.shape[2:])
    if scope == "sequence" and (g, t) != (g * t // seq_len, seq_len):
        return a.reshape((g * t // seq_len, seq_len) + a.shape[2:])
    return a


class SelectionBias(nnx.Param):
    """A per-expert bias ``[r]`` (float32) added to the expert scores for top-k selection only
    (DeepSeek-V3's ``e_score_correction_bias``): it never enters the combine weights, so it has no
    derivative. Its gradient slot carries instead the expert's share of this call's selections
    minus the mean share (``f_e - k / r``, over real tokens): positive when the expert is
    overloaded. The trainer's aux-loss-free balancing (:mod:`moejax.training.balance`) turns that
    into DeepSeek-V3's update ``b_e += gamma * sign(mean load - load_e)`` after each step; summed
    over micro-batches and data-parallel devices, the sign is the global batch's."""


@jax.custom_vjp
def _carry_load(bias: jax.Array, deviation: jax.Array) -> jax.Array:
    """``bias`` unchanged; its cotangent is replaced by ``deviation`` (see :class:`SelectionBias`)."""
    return bias


_carry_load.defvjp(lambda b, dev: (b, dev), lambda dev, ct: (dev, jnp.zeros_like(dev)))


class LinearRouter(Router):
    """A linear router ``logits = x @ W (+ b)`` computed in ``cfg.router_dtype`` (float32 unless an
    experiment asks for bfloat16), cast to float32. Params: ``kernel [d, r]`` (logical
    ``('embed', 'unmodeled')``), optional ``bias [r]``."""

    def __init__(self, cfg, *, rngs: nnx.Rngs):
        super().__init__(cfg)
        r = cfg.router_width
        self.kernel = nnx.Param(
            jax.random.normal(rngs.params(), (cfg.d_model, r), jnp.float32).astype(cfg.param_dtype)
            * cfg.router_init_std, logical_axes=("embed", "unmodeled"))
        self.bias = (nnx.Param(jnp.zeros((r,), cfg.param_dtype), logical_axes=("unmodeled",))
                     if cfg.router_bias else None)
        self.selection_bias = (SelectionBias(jnp.zeros((r,), jnp.float32), logical_axes=("unmodeled",))
                               if cfg.selection_bias else None)

    def logits(self, x: jax.Array, task_ids: jax.Array | None = None) -> jax.Array:
        """``x [g, t, d]`` -> ``[g, t, r]`` float32 (token-level routers do not read ``task_ids``)."""
        dt = self.cfg.router_dtype
        logits = jnp.einsum("gtd,dr->gtr", x.astype(dt), self.kernel[...].astype(dt))
        if self.bias is not None:
            logits = logits + self.bias[...].astype(dt)
        return logits.astype(jnp.float32)


def _top_k_plan(cfg, logits, mask, capacity, deterministic, rng=None) -> TokenChoicePlan:
    return top_k_route(logits, k=cfg.top_k, capacity=capacity, token_mask=mask, policy=cfg.second_expert_policy,
                       weight_norm=cfg.weight_norm, batch_prioritized=cfg.batch_prioritized, train=not deterministic,
                       rng=rng, expert_map=None if cfg.expert_map is None else jnp.asarray(cfg.expert_map),
                       num_experts=cfg.num_experts)


class TopKRouter(LinearRouter):
    """Tokens choose their top-k experts (:func:`top_k_route`), with the second-expert policies of
    GShard (``random``) and Gumbel ``sampling`` acting in training (RNG stream ``routing``)."""

    second_expert_policies = (SecondExpertPolicy.RANDOM.value, SecondExpertPolicy.SAMPLING.value)
    expert_map = True
    scored_routing = True

    def plan(self, logits, mask, *, capacity, router_in, deterministic, rngs):
        cfg = self.cfg
        if cfg.deepseek_routing:
            return self.scored_plan(logits, mask, capacity), RouterLosses.zeros()
        rng = None if deterministic or cfg.second_expert_policy == SecondExpertPolicy.ALL else rngs.routing()
        return _top_k_plan(cfg, logits, mask, capacity, deterministic, rng), RouterLosses.zeros()

    def scored_plan(self, logits: jax.Array, mask: jax.Array, capacity: int) -> TokenChoicePlan:
        """DeepSeek-style top-k (``logits [g, t, r]``): scores ``s`` (softmax or sigmoid), selection
        scores ``s + selection_bias``, restricted to the ``top_k_groups`` best of
        ``num_expert_groups`` contiguous expert groups; weights ``s`` at the chosen experts,
        normalised per ``weight_norm``, times ``routed_scale``."""
        cfg = self.cfg
        g, t, r = logits.shape
        s = jax.nn.sigmoid(logits) if cfg.router_score == RouterScore.SIGMOID else jax.nn.softmax(logits, axis=-1)
        select = s
        if self.selection_bias is not None:
            select = s + jax.lax.stop_gradient(self.selection_bias[...].astype(jnp.float32))
        n = cfg.num_expert_groups
        if n > 1:
            grouped = select.reshape(g, t, n, r // n)
            if cfg.group_score == GroupScore.MAX:
                score = jnp.max(grouped, axis=-1)
            else:
                score = jnp.sum(jax.lax.top_k(grouped, 2)[0], axis=-1)
            _, best = jax.lax.top_k(score, cfg.top_k_groups)                               # [g, t, kg]
            allowed = jnp.any(jax.nn.one_hot(best, n, dtype=bool), axis=-2)                # [g, t, n]
            select = jnp.where(jnp.repeat(allowed, r // n, axis=-1), select, -jnp.inf)
        probs = s if cfg.router_score == RouterScore.SOFTMAX else s / jnp.sum(s, axis=-1, keepdims=True)
        plan = top_k_route(logits, k=cfg.top_k, capacity=capacity, token_mask=mask, weight_norm=cfg.weight_norm,
                           batch_prioritized=cfg.batch_prioritized, probs=probs, select=select, gates=s,
                           scale=cfg.routed_scale,
                           expert_map=None if cfg.expert_map is None else jnp.asarray(cfg.expert_map),
                           num_experts=cfg.num_experts)
        if self.selection_bias is not None:
            real = mask.astype(jnp.float32)
            chosen = jnp.einsum("gtkr,gt->r", jax.nn.one_hot(plan.selected, r, dtype=jnp.float32), real)
            share = chosen / jnp.maximum(jnp.sum(real), 1.0)                               # [r], sums to k
            deviation = jax.lax.stop_gradient(share - cfg.top_k / r)
            tie = 0.0 * jnp.sum(_carry_load(self.selection_bias[...], deviation))
            plan = plan.replace(weight=plan.weight + tie)       # a zero that carries the load to the bias
        return plan


class NoisyTopKRouter(LinearRouter):
    """Noisy top-k gating (Shazeer et al. 2017): in training, ``logits + N(0, 1) * softplus(x @
    W_noise)`` (RNG stream ``routing``) and the importance and load losses; the softmax is over the
    noisy logits. Params: those of :class:`LinearRouter` plus ``noise_kernel [d, r]`` (zero-init:
    noise std softplus(0) ~ 0.69)."""

    def __init__(self, cfg, *, rngs: nnx.Rngs):
        super().__init__(cfg, rngs=rngs)
        self.noise_kernel = nnx.Param(jnp.zeros((cfg.d_model, cfg.router_width), cfg.param_dtype),
                                      logical_axes=("embed", "unmodeled"))

    def noise_std(self, x: jax.Array) -> jax.Array:
        """``softplus(x @ W_noise)`` ``[g, t, r]`` float32."""
        return jax.nn.softplus(
            jnp.einsum("gtd,dr->gtr", x.astype(jnp.float32), self.noise_kernel[...].astype(jnp.float32)))

    def plan(self, logits, mask, *, capacity, router_in, deterministic, rngs):
        cfg = self.cfg
        if deterministic:
            return _top_k_plan(cfg, logits, mask, capacity, deterministic), RouterLosses.zeros()
        std = self.noise_std(router_in)
        noisy = logits + jax.random.normal(rngs.routing(), logits.shape, jnp.float32) * std
        plan = _top_k_plan(cfg, noisy, mask, capacity, deterministic)
        g, t = mask.shape
        dense = jnp.zeros((g, t, cfg.num_experts), jnp.float32)
        dense = jax.vmap(lambda z, tok, ex, w: z.at[tok, ex].add(w))(dense, plan.token, plan.expert,
                                                                    jnp.where(plan.routed, plan.weight, 0.0))
        extra = RouterLosses.zeros().replace(importance_loss=importance_loss(dense, mask),
                                             load_loss=load_loss(logits, noisy, std, cfg.top_k, mask))
        return plan, extra


class ExpertChoiceRouter(LinearRouter):
    """Expert choice (:func:`expert_choice_route`): each expert takes its top-C tokens of the group.
    **Not causal** (a token's routing depends on later tokens of its group): do not use it in
    autoregressive decoders."""

    fixed_capacity = True

    def plan(self, logits, mask, *, capacity, router_in, deterministic, rngs):
        return expert_choice_route(logits, capacity=capacity, token_mask=mask), RouterLosses.zeros()


class TaskRouter(Router):
    """Task-level routing: a learned logit table ``table [num_tasks, r]`` (logical ``('unmodeled',
    'unmodeled')``) indexed by each example's task id; every token of an example goes to the same
    top-k experts (dropless, weights renormalised over the k). No jitter (the logits do not depend
    on the tokens)."""

    uses_task_ids = True
    expert_map = True
    jitter = False

    def __init__(self, cfg, *, rngs: nnx.Rngs):
        super().__init__(cfg)
        self.table = nnx.Param(
            jax.random.normal(rngs.params(), (cfg.num_tasks, cfg.router_width), jnp.float32).astype(cfg.param_dtype)
            * cfg.router_init_std, logical_axes=("unmodeled", "unmodeled"))
        self.num_tasks = cfg.num_tasks

    @classmethod
    def check_config(cls, cfg) -> None:
        super().check_config(cfg)
        if cfg.num_tasks < 1 or not cfg.dropless or cfg.weight_norm != WeightNorm.TOPK:
            raise ValueError(f"router='task' needs num_tasks >= 1 (got {cfg.num_tasks}), dropless=True and "
                             f"weight_norm='topk' (every token of a task goes to the same experts)")

    def task_logits(self, task_ids: jax.Array) -> jax.Array:
        """``task_ids [b]`` int -> ``[b, r]`` float32."""
        return jnp.take(self.table[...].astype(jnp.float32), task_ids.astype(jnp.int32), axis=0)

    def logits(self, x: jax.Array, task_ids: jax.Array | None = None) -> jax.Array:
        """``x [g, t, d]`` (only its shape is read) and ``task_ids [b]`` -> ``[g, t, r]``, each token
        with the logits of its example's task (the layer's groups are whole examples' tokens in
        order: ``g * t = b * s``)."""
        g, t = x.shape[:2]
        b = task_ids.shape[0]
        tl = self.task_logits(task_ids)
        s = g * t // b
        return jnp.broadcast_to(tl[:, None, :], (b, s, tl.shape[-1])).reshape(g, t, tl.shape[-1])

    def plan(self, logits, mask, *, capacity, router_in, deterministic, rngs):
        return _top_k_plan(self.cfg, logits, mask, capacity, deterministic), RouterLosses.zeros()


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
    select: jax.Array | None = None,
    gates: jax.Array | None = None,
    scale: float = 1.0,
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
      select: optional ``[g, t, e]`` scores the top-k is taken over (default ``probs``; -inf
        excludes an expert).
      gates: optional ``[g, t, e]`` scores the combine weights are read from (default ``probs``).
      scale: multiplies the combine weights after normalisation (DeepSeek's routed scaling).

    Returns:
      a :class:`TokenChoicePlan` with ``a = k * t``.
    """
    g, t, e = logits.shape
    if probs is None:
        probs = jax.nn.softmax(logits, axis=-1)
    random_policy = train and policy != SecondExpertPolicy.ALL and k == 2
    if random_policy and rng is None:
        raise ValueError(f"second_expert_policy={policy!r} needs an RNG in training")
    if random_policy and policy == SecondExpertPolicy.SAMPLING:
        first = jnp.argmax(probs, axis=-1)
        gumbel = jax.random.gumbel(rng, logits.shape, jnp.float32)
        noisy = jnp.where(jax.nn.one_hot(first, e, dtype=bool), -jnp.inf, logits + gumbel)
        idx = jnp.stack([first, jnp.argmax(noisy, axis=-1)], axis=-1)
    else:
        _, idx = jax.lax.top_k(probs if select is None else select, k)
    idx = idx.astype(jnp.int32)  # [g, t, k]
    gate = jnp.take_along_axis(probs if gates is None else gates, idx, axis=-1)  # [g, t, k]
    routed = jnp.broadcast_to(token_mask[..., None], (g, t, k))
    if random_policy and policy == SecondExpertPolicy.RANDOM:
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
    if weight_norm == WeightNorm.TOPK:
        denom = flat(jnp.broadcast_to(jnp.sum(gate, axis=-1, keepdims=True), gate.shape))
        weight = gate_f / denom
    elif weight_norm == WeightNorm.KEPT:
        kept_tk = jnp.swapaxes(kept.reshape(g, k, t), 1, 2)
        denom = jnp.sum(gate * kept_tk, axis=-1, keepdims=True)
        denom = jnp.maximum(denom, jnp.finfo(jnp.float32).eps)
        weight = flat(gate / denom)
    else:
        weight = gate_f
    weight = jnp.where(kept, weight * scale if scale != 1.0 else weight, 0.0)
    token = jnp.broadcast_to(jnp.tile(jnp.arange(t, dtype=jnp.int32), k), (g, k * t))
    return TokenChoicePlan(token=token, expert=expert_f, slot=slot, weight=weight, routed=routed_f, kept=kept,
                           selected=idx, probs=probs, num_experts=phys, capacity=capacity)


def expert_choice_route(logits: jax.Array, *, capacity: int, token_mask: jax.Array) -> RoutingPlan:
    """Expert choice (Zhou et al. 2022): each expert takes its top-C tokens of the group.

    Not causal: whether token i is processed depends on the scores of every token of its group,
    later ones included, so it must not be used for autoregressive decoding.

    Args:
      logits: ``[g, t, e]`` float32. capacity: C (clipped to ``t``). token_mask: ``[g, t]`` bool.

    Returns:
      an :class:`ExpertChoicePlan` with ``a = e * C``; the weight is the token's softmax
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
    return ExpertChoicePlan(token=tok, expert=expert, slot=slot, weight=weight, routed=kept, kept=kept,
                            selected=jnp.zeros((g, t, 0), jnp.int32), probs=probs, num_experts=e, capacity=c)
