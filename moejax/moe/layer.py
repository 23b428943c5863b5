"""MoeLayer: router + capacity + dispatch backend + experts, returning output and MoeStats.

Shape letters (README legend): ``b`` batch, ``s`` sequence, ``d`` d_model, ``g`` groups,
``t`` tokens per group, ``e`` experts, ``c`` capacity.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import nnx, struct

from moejax.moe.capacity import layer_capacity, layer_groups
from moejax.moe.config import MoeConfig
from moejax.moe.experts import DenseFFN, Experts, FFNCall
from moejax.moe.factory import make_backend, make_router
from moejax.moe.plan import RoutingPlan
from moejax.moe.routing import RouterLosses
from moejax.sharding import constrain, current_mesh_axis_size, stack_modules


@struct.dataclass
class MoeStats:
    """Losses and metrics of one MoE layer call (a pytree; sum the losses in the model).

    Losses (scalars, unweighted): ``load_balancing_loss`` (``E*sum f*P``, = k at balance),
    ``router_z_loss``, ``importance_loss`` and ``load_loss`` (noisy top-k only, else 0). Inner
    (hierarchical) layers' losses are added in, averaged over the outer experts.

    Metrics: ``num_routed`` / ``num_dropped`` (int32 counts of (token, expert) assignments asked
    for / dropped by capacity), ``dropped_fraction`` (dropped / routed), ``tokens_dropped`` (int32
    non-padding tokens that no expert processes: their MoE output is 0 and only the residual carries
    them), ``tokens_dropped_fraction``, ``dropped_by_position [s]`` (fraction of routed assignments
    dropped at each sequence position; for expert choice, fraction of tokens no expert took),
    ``expert_load [e]`` (fraction of kept assignments per expert), ``router_confidence`` (mean top-1
    probability), ``router_entropy`` (mean entropy of the router distribution, nats),
    ``selection_fraction [e]`` (f_e: top-k selections per non-padding token, before capacity; sums
    to k) and ``router_prob_mean [e]`` (P_e: mean router probability) — the two factors of the
    load-balancing loss, so other conventions (e.g. HF's pooled over layers) can be rebuilt — and
    ``max_expert_load`` (int32: the most kept assignments one expert holds in one group),
    ``capacity_used`` (int32: slots per expert and group the backend computed — the bucket, times
    the rounds, for ``bucket``; ``capacity`` for the others) and ``capacity`` (the plan's slots per
    expert and group, static; ``t`` when dropless).
    """

    load_balancing_loss: jax.Array
    router_z_loss: jax.Array
    importance_loss: jax.Array
    load_loss: jax.Array
    num_routed: jax.Array
    num_dropped: jax.Array
    dropped_fraction: jax.Array
    tokens_dropped: jax.Array
    tokens_dropped_fraction: jax.Array
    dropped_by_position: jax.Array
    expert_load: jax.Array
    router_confidence: jax.Array
    router_entropy: jax.Array
    selection_fraction: jax.Array
    router_prob_mean: jax.Array
    max_expert_load: jax.Array
    capacity_used: jax.Array
    capacity: int = struct.field(pytree_node=False, default=0)

    def losses(self) -> RouterLosses:
        """The four router losses of this call."""
        return RouterLosses(load_balancing_loss=self.load_balancing_loss, router_z_loss=self.router_z_loss,
                            importance_loss=self.importance_loss, load_loss=self.load_loss)


class HierarchicalCall:
    """The :class:`moejax.moe.dispatch.ExpertCall` of hierarchical experts: ``experts`` is a stack
    of inner :class:`MoeLayer` s (one per outer expert). Each outer expert routes its buffer as a
    batch of ``g`` rows of ``c`` slots (empty slots are padding) through its own inner layer
    (functional vmap over the stacked inner state). ``losses`` holds the inner layers' losses
    (averaged over the outer experts) after the call."""

    def __init__(self, experts: nnx.Module, *, deterministic: bool):
        self.experts, self.deterministic = experts, deterministic
        self.losses = RouterLosses.zeros()

    def buffers(self, buf: jax.Array, slot_mask: jax.Array) -> jax.Array:
        graphdef, state = nnx.split(self.experts)

        def one(st, xb, mb):
            inner_layer = nnx.merge(graphdef, st)
            out, stats = inner_layer(xb, padding_mask=mb, deterministic=self.deterministic)
            return out, stats, nnx.state(inner_layer, nnx.RngState)

        out, stats, new_rng = jax.vmap(one)(state, buf, slot_mask)
        if not self.deterministic:  # persist the inner layers' advanced RNG counters
            nnx.update(self.experts, new_rng)
        self.losses = jax.tree.map(jnp.mean, stats.losses())
        return out

    def sorted_rows(self, xs: jax.Array, group_sizes: jax.Array) -> jax.Array:
        raise ValueError("hierarchical experts (inner MoE) have no grouped-matmul form; use backend 'gather' "
                         "or 'einsum'")

    def stages(self):
        raise ValueError("hierarchical experts (inner MoE) have no up / down form; use backend 'gather' or 'einsum'")


class MoeLayer(nnx.Module):
    """A Mixture-of-Experts FFN layer with static-shape capacity buckets.

    ``y, stats = layer(x, padding_mask=None, deterministic=None)`` with ``x [b, s, d]``,
    ``padding_mask [b, s]`` bool (True = real token; padding is never routed and never counted),
    ``y [b, s, d]`` in ``x.dtype`` and ``stats`` a :class:`MoeStats`.

    ``deterministic`` selects the eval capacity factor and disables jitter, random second-expert
    policies, router noise and expert dropout; when None the module attribute is used (toggled by
    ``nnx``'s ``model.train()`` / ``model.eval()``; default: training).

    Capacity per group: ``C = max(ceil(cf * k * t / E), min_capacity)`` with ``t`` the tokens
    per group (``max_group_size`` at most, or one sequence with ``sequence_groups``) and ``cf`` the
    train or eval capacity factor; a fixed ``expert_capacity`` overrides it. Tokens beyond capacity
    get an MoE output of 0 (the caller's residual carries them) and are counted in ``stats``. In
    dropless mode nothing is dropped: the default backend ``bucket`` computes with the smallest of a
    few compiled capacities that holds the largest expert load (:mod:`moejax.moe.bucket`).

    Parts: ``router`` (a :class:`moejax.moe.routing.Router` chosen by ``cfg.router``), ``experts``
    (:class:`moejax.moe.experts.Experts`, or a stack of inner MoE layers when ``cfg.inner`` is set),
    ``shared`` (always-on experts or None; ``shared_gate [d, 1]`` their sigmoid gate or None) and a
    dispatch backend chosen by ``cfg.backend``
    (:mod:`moejax.moe.factory` makes both).

    RNG streams (from the ``rngs`` given at construction, or per call): ``jitter`` (router
    input jitter), ``routing`` (random / sampling policy and router noise), ``dropout`` (expert
    dropout); each falls back to ``default`` when absent.
    """

    def __init__(self, cfg: MoeConfig, *, rngs: nnx.Rngs):
        cfg.validate()
        self.cfg = cfg
        self.deterministic = False
        self.router = make_router(cfg, rngs)
        self.backend = make_backend(cfg)
        if cfg.inner is not None:
            self.experts = stack_modules(lambda r: MoeLayer(cfg.inner, rngs=r), cfg.num_experts, rngs, "expert",
                                         rename={"expert": "expert_inner"})
        else:
            self.experts = Experts(cfg.num_experts, cfg.d_model, cfg.d_ff, activation=cfg.activation,
                                   use_bias=cfg.use_bias, dropout=cfg.expert_dropout, dtype=cfg.dtype,
                                   param_dtype=cfg.param_dtype, quant_bits=cfg.quant_bits,
                                   quant_group_size=cfg.quant_group_size, grouped_matmul=cfg.grouped_matmul,
                                   rngs=rngs)
        self.shared = (
            DenseFFN(cfg.d_model, (cfg.shared_d_ff or cfg.d_ff) * cfg.num_shared_experts,
                     activation=cfg.activation, use_bias=cfg.use_bias, dtype=cfg.dtype,
                     param_dtype=cfg.param_dtype, rngs=rngs)
            if cfg.num_shared_experts else None
        )
        self.shared_gate = nnx.Param(
            nnx.initializers.variance_scaling(1.0, "fan_in", "truncated_normal")(
                rngs.params(), (cfg.d_model, 1), cfg.param_dtype),
            logical_axes=("embed", None)) if cfg.shared_gate else None
        self.rngs = rngs

    def capacity(self, tokens_per_group: int, deterministic: bool) -> int:
        """Slots per expert and group for this call (:func:`moejax.moe.capacity.layer_capacity`)."""
        return layer_capacity(self.cfg, tokens_per_group, deterministic)

    def buffer_capacity(self, tokens_per_group: int, deterministic: bool) -> int:
        """Slots per expert and group of the largest dispatch buffers the backend allocates."""
        choices = 1 if self.router.fixed_capacity else min(self.cfg.top_k, self.cfg.router_width)
        return self.backend.buffer_capacity(self.capacity(tokens_per_group, deterministic), tokens_per_group,
                                            choices, self.cfg.num_experts)

    def _expert_call(self, deterministic: bool, rngs: nnx.Rngs):
        if self.cfg.inner is not None:
            return HierarchicalCall(self.experts, deterministic=deterministic)
        return FFNCall(self.experts, eom_rate=self.cfg.eom_rate, deterministic=deterministic, rngs=rngs)

    def _check_inputs(self, x, padding_mask, task_ids):
        cfg = self.cfg
        if x.ndim != 3:
            raise ValueError(f"MoeLayer expects x of rank 3 [batch, length, d_model]; got shape {x.shape}")
        b, s, d = x.shape
        if d != cfg.d_model:
            raise ValueError(f"MoeLayer input has d_model={d} but the layer was built with d_model={cfg.d_model}")
        if padding_mask is None:
            padding_mask = jnp.ones((b, s), bool)
        elif padding_mask.shape != (b, s):
            raise ValueError(f"padding_mask shape {padding_mask.shape} must equal x's [batch, length] = {(b, s)}")
        ep = current_mesh_axis_size("expert")
        if cfg.num_experts % ep:
            raise ValueError(
                f"num_experts={cfg.num_experts} is not divisible by the expert mesh axis of size {ep}; "
                f"use a multiple of {ep} experts or a mesh with an expert axis dividing {cfg.num_experts}"
            )
        if self.router.uses_task_ids:
            if task_ids is None:
                if cfg.num_tasks != 1:
                    raise ValueError(f"router={cfg.router!r} with num_tasks={cfg.num_tasks} needs task_ids [batch]")
                task_ids = jnp.zeros((b,), jnp.int32)
            if task_ids.shape != (b,):
                raise ValueError(f"task_ids shape {task_ids.shape} must be [batch] = {(b,)}")
        return padding_mask, task_ids

    def __call__(self, x: jax.Array, *, padding_mask: jax.Array | None = None, deterministic: bool | None = None,
                 rngs: nnx.Rngs | None = None, task_ids: jax.Array | None = None) -> tuple[jax.Array, MoeStats]:
        """``task_ids [b]`` int: each example's task (task-level routers only, which need it unless
        ``num_tasks == 1``; token-level routers do not read it)."""
        cfg = self.cfg
        if deterministic is None:
            deterministic = self.deterministic
        rngs = self.rngs if rngs is None else rngs
        padding_mask, task_ids = self._check_inputs(x, padding_mask, task_ids)
        b, s, d = x.shape
        n = b * s
        g = layer_groups(cfg, b, s)
        t = n // g
        xg = constrain(x.reshape(g, t, d), ("batch", None, "embed"), cfg.axis_rules)
        mask = padding_mask.astype(bool).reshape(g, t)

        plan, losses = self.router(xg, mask, deterministic=deterministic, rngs=rngs, task_ids=task_ids, seq_len=s)
        call = self._expert_call(deterministic, rngs)
        y = self.backend(xg, plan, call).reshape(b, s, d)
        if self.shared is not None:
            xs = x.astype(cfg.dtype)
            shared = self.shared(xs)
            if self.shared_gate is not None:
                shared = jax.nn.sigmoid(xs @ self.shared_gate[...].astype(cfg.dtype)) * shared
            y = y + shared.astype(y.dtype)
        if isinstance(call, HierarchicalCall):          # the inner layers' losses, averaged over the experts
            losses = losses + call.losses
        stats = _stats(plan, losses, mask, s, self.backend.capacity_used(plan))
        return y.astype(x.dtype), stats


def _stats(plan: RoutingPlan, losses: RouterLosses, mask: jax.Array, seq_len: int,
           capacity_used: jax.Array) -> MoeStats:
    """The :class:`MoeStats` of a plan (``mask [g, t]``: real tokens)."""
    g, t = mask.shape
    e = plan.num_experts
    probs = plan.probs
    num_real = jnp.maximum(jnp.sum(mask), 1)
    # per-token: processed by at least one expert?
    processed = jax.vmap(lambda tok, kp: jnp.zeros((t,), bool).at[tok].max(kp))(plan.token, plan.kept)
    tok_dropped = mask & ~processed
    tokens_dropped = jnp.sum(tok_dropped).astype(jnp.int32)
    pos = (jnp.arange(g * t) % seq_len).reshape(g, t)
    num_routed, num_dropped, drop_cnt, rout_cnt = plan.drop_counts(mask, tok_dropped, pos, seq_len)
    # per-expert counts as scatter-adds / dots (XLA:CPU reduces non-minor axes slowly)
    load = jnp.zeros((e,), jnp.float32).at[plan.expert.reshape(-1)].add(plan.kept.reshape(-1).astype(jnp.float32))
    load = load / jnp.maximum(jnp.sum(load), 1.0)
    m = mask.astype(jnp.float32)
    sel_count = jnp.zeros((probs.shape[-1],), jnp.float32).at[plan.selected.reshape(-1)].add(
        jnp.broadcast_to(m[..., None], plan.selected.shape).reshape(-1))  # router space
    ent = -jnp.sum(probs * jnp.log(jnp.maximum(probs, 1e-30)), axis=-1)
    return MoeStats(
        load_balancing_loss=losses.load_balancing_loss,
        router_z_loss=losses.router_z_loss,
        importance_loss=losses.importance_loss,
        load_loss=losses.load_loss,
        num_routed=num_routed,
        num_dropped=num_dropped,
        dropped_fraction=num_dropped / jnp.maximum(num_routed, 1),
        tokens_dropped=tokens_dropped,
        tokens_dropped_fraction=tokens_dropped / num_real,
        dropped_by_position=drop_cnt / jnp.maximum(rout_cnt, 1.0),
        expert_load=load,
        router_confidence=jnp.sum(jnp.max(probs, axis=-1) * m) / num_real,
        router_entropy=jnp.sum(ent * m) / num_real,
        selection_fraction=sel_count / num_real,
        router_prob_mean=jnp.einsum("gte,gt->e", probs, m) / num_real,
        max_expert_load=plan.max_load(),
        capacity_used=capacity_used,
        capacity=plan.capacity,
    )
