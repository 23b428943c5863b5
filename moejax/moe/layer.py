"""MoeLayer: router + capacity + dispatch backend + experts, returning output and MoeStats.

Letters: ``b`` batch, ``s`` sequence, ``d`` d_model, ``g`` groups, ``t`` tokens per group,
``e`` experts.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import nnx, struct

from moejax.moe import losses
from moejax.moe.capacity import expert_capacity, num_groups
from moejax.moe.config import MoeConfig
from moejax.moe.dispatch import BACKENDS
from moejax.moe.experts import DenseFFN, Experts
from moejax.moe.routing import TaskRouter, Router, RoutingPlan, expert_choice_route, top_k_route
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
    ``capacity`` (slots per expert and group, static).
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
    capacity: int = struct.field(pytree_node=False, default=0)


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
    train or eval capacity factor; a fixed ``expert_capacity`` overrides it; in dropless mode
    ``C = t``. Tokens beyond capacity get an MoE output of 0 (the caller's residual
    carries them) and are counted in ``stats``.

    RNG streams (from the ``rngs`` given at construction, or per call): ``jitter`` (router
    input jitter), ``routing`` (random / sampling policy and router noise), ``dropout`` (expert
    dropout); each falls back to ``default`` when absent.
    """

    def __init__(self, cfg: MoeConfig, *, rngs: nnx.Rngs):
        cfg.validate()
        self.cfg = cfg
        self.deterministic = False
        self.router = TaskRouter(cfg.num_tasks, cfg.router_width, init_std=cfg.router_init_std,
                                 param_dtype=cfg.param_dtype, rngs=rngs) if cfg.router == "task" else Router(
            cfg.d_model, cfg.router_width, use_bias=cfg.router_bias, noisy=cfg.router == "noisy_top_k",
            init_std=cfg.router_init_std, param_dtype=cfg.param_dtype, compute_dtype=cfg.router_dtype, rngs=rngs)
        if cfg.inner is not None:
            if cfg.backend == "ragged":
                raise ValueError("hierarchical experts (inner MoE) need backend 'gather' or 'einsum', not 'ragged'")
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
        self.rngs = rngs

    # ------------------------------------------------------------------ helpers
    def capacity(self, tokens_per_group: int, deterministic: bool) -> int:
        """Slots per expert and group for this call (see the class docstring)."""
        cfg = self.cfg
        if cfg.dropless:   # merged experts can receive up to k choices of one token
            return tokens_per_group * (cfg.top_k if cfg.expert_map is not None else 1)
        if cfg.expert_capacity is not None:
            return cfg.expert_capacity
        cf = cfg.capacity_factor_eval if deterministic else cfg.capacity_factor_train
        return expert_capacity(tokens_per_group, cfg.num_experts, cf, cfg.top_k, cfg.min_capacity)

    def _route(self, xg, mask, deterministic, rngs, task_logits=None) -> tuple[RoutingPlan, jax.Array, jax.Array, dict]:
        cfg = self.cfg
        train = not deterministic
        router_in = xg
        if train and cfg.jitter_eps > 0 and task_logits is None:
            noise = jax.random.uniform(rngs.jitter(), xg.shape, jnp.float32, 1.0 - cfg.jitter_eps,
                                       1.0 + cfg.jitter_eps)
            router_in = xg.astype(jnp.float32) * noise
        logits = self.router(router_in) if task_logits is None else task_logits
        extra = {}
        t = xg.shape[1]
        cap = self.capacity(t, deterministic)
        if cfg.router == "expert_choice":
            return expert_choice_route(logits, capacity=cap, token_mask=mask), logits, jax.nn.softmax(logits), extra
        rng = None
        if cfg.router == "noisy_top_k":
            clean = logits
            if train:
                std = self.router.noise_std(router_in)
                logits = clean + jax.random.normal(rngs.routing(), clean.shape, jnp.float32) * std
                extra["load_loss"] = losses.load_loss(clean, logits, std, cfg.top_k, mask)
        elif train and cfg.second_expert_policy != "all":
            rng = rngs.routing()
        plan = top_k_route(logits, k=cfg.top_k, capacity=cap, token_mask=mask, policy=cfg.second_expert_policy,
                           weight_norm=cfg.weight_norm, batch_prioritized=cfg.batch_prioritized, train=train,
                           rng=rng, expert_map=None if cfg.expert_map is None else jnp.asarray(cfg.expert_map),
                           num_experts=cfg.num_experts)
        probs = jax.nn.softmax(logits, axis=-1)
        if cfg.router == "noisy_top_k":
            g = xg.shape[0]
            dense = jnp.zeros((g, t, cfg.num_experts), jnp.float32)
            dense = jax.vmap(lambda z, tok, ex, w: z.at[tok, ex].add(w))(dense, plan.token, plan.expert,
                                                                        jnp.where(plan.routed, plan.weight, 0.0))
            extra["importance_loss"] = losses.importance_loss(dense, mask)
        return plan, logits, probs, extra

    def _run_inner(self, buf, slot_mask, deterministic):
        """Hierarchical experts: ``buf [e, g, c, d]``; each outer expert routes its buffer as a batch
        of ``g`` rows of ``c`` slots (empty slots are padding) through its own inner MoE layer
        (functional vmap over the stacked inner state). Returns ``(out, stacked inner MoeStats)``."""
        graphdef, state = nnx.split(self.experts)

        def one(st, xb, mb):
            inner_layer = nnx.merge(graphdef, st)
            out, stats = inner_layer(xb, padding_mask=mb, deterministic=deterministic)
            return out, stats, nnx.state(inner_layer, nnx.RngState)

        out, stats, new_rng = jax.vmap(one)(state, buf, slot_mask)
        if not deterministic:  # persist the inner layers' advanced RNG counters
            nnx.update(self.experts, new_rng)
        return out, stats

    def _eom(self, out, deterministic, rngs):
        """NLLB expert output masking (see MoeConfig.eom_rate)."""
        rate = self.cfg.eom_rate
        if rate == 0.0:
            return out
        if deterministic:
            return out * (1.0 - rate)
        keep = jax.random.bernoulli(rngs.dropout(), 1.0 - rate, out.shape)
        return jnp.where(keep, out / (1.0 - rate), 0.0).astype(out.dtype)

    # ------------------------------------------------------------------ call
    def __call__(self, x: jax.Array, *, padding_mask: jax.Array | None = None, deterministic: bool | None = None,
                 rngs: nnx.Rngs | None = None, task_ids: jax.Array | None = None) -> tuple[jax.Array, MoeStats]:
        """``task_ids [b]`` int: each example's task (``router='task'`` only; may be omitted when
        ``num_tasks == 1``)."""
        cfg = self.cfg
        if deterministic is None:
            deterministic = self.deterministic
        rngs = self.rngs if rngs is None else rngs
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
        n = b * s
        g = b if cfg.sequence_groups else num_groups(n, cfg.max_group_size, cfg.group_multiple)
        t = n // g
        xg = constrain(x.reshape(g, t, d), ("batch", None, "embed"), cfg.axis_rules)
        mask = padding_mask.astype(bool).reshape(g, t)

        task_logits = None
        if cfg.router == "task":
            if task_ids is None:
                if cfg.num_tasks != 1:
                    raise ValueError(f"router='task' with num_tasks={cfg.num_tasks} needs task_ids [batch]")
                task_ids = jnp.zeros((b,), jnp.int32)
            if task_ids.shape != (b,):
                raise ValueError(f"task_ids shape {task_ids.shape} must be [batch] = {(b,)}")
            tl = self.router(task_ids)                                         # [b, e]
            task_logits = jnp.broadcast_to(tl[:, None, :], (b, s, tl.shape[-1])).reshape(g, t, tl.shape[-1])
        plan, logits, probs, extra = self._route(xg, mask, deterministic, rngs, task_logits)

        inner_stats = []  # filled by the hierarchical expert call

        def expert_call(buf, slot_mask):
            if cfg.inner is not None:
                out, st = self._run_inner(buf, slot_mask, deterministic)
                inner_stats.append(st)
                return out
            return self._eom(self.experts(buf, deterministic=deterministic, rngs=rngs), deterministic, rngs)

        if cfg.backend == "ragged":
            def ragged_fn(xs, gs):
                return self._eom(self.experts.ragged(xs, gs, deterministic=deterministic, rngs=rngs),
                                 deterministic, rngs)
            yg = BACKENDS["ragged"](xg, plan, ragged_fn, cfg.axis_rules)
        else:
            yg = BACKENDS[cfg.backend](xg, plan, expert_call, cfg.axis_rules)
        y = yg.reshape(b, s, d)
        if self.shared is not None:
            y = y + self.shared(x.astype(cfg.dtype)).astype(y.dtype)
        y = y.astype(x.dtype)
        stats = self._stats(plan, logits, probs, mask, extra, s)
        if inner_stats:
            inner_stats = inner_stats[0]
            stats = stats.replace(
                load_balancing_loss=stats.load_balancing_loss + jnp.mean(inner_stats.load_balancing_loss),
                router_z_loss=stats.router_z_loss + jnp.mean(inner_stats.router_z_loss),
                importance_loss=stats.importance_loss + jnp.mean(inner_stats.importance_loss),
                load_loss=stats.load_loss + jnp.mean(inner_stats.load_loss),
            )
        return y, stats

    def _stats(self, plan: RoutingPlan, logits, probs, mask, extra, seq_len) -> MoeStats:
        cfg = self.cfg
        g, t = mask.shape
        e = cfg.num_experts
        zero = jnp.zeros((), jnp.float32)
        lb = losses.load_balancing_loss(probs, plan.selected, mask) if plan.layout == "token_major" else zero
        z = losses.router_z_loss(logits, mask)
        num_real = jnp.maximum(jnp.sum(mask), 1)
        # per-token: processed by at least one expert?
        processed = jax.vmap(lambda tok, kp: jnp.zeros((t,), bool).at[tok].max(kp))(plan.token, plan.kept)
        tok_dropped = mask & ~processed
        tokens_dropped = jnp.sum(tok_dropped).astype(jnp.int32)
        pos = (jnp.arange(g * t) % seq_len).reshape(g, t)
        if plan.layout == "token_major":
            routed, kept = plan.routed, plan.kept
            num_routed = jnp.sum(routed).astype(jnp.int32)
            num_dropped = jnp.sum(routed & ~kept).astype(jnp.int32)
            ppos = jnp.take_along_axis(pos, plan.token, axis=1)
            drop_cnt = jnp.zeros((seq_len,), jnp.float32).at[ppos.reshape(-1)].add((routed & ~kept).reshape(-1))
            rout_cnt = jnp.zeros((seq_len,), jnp.float32).at[ppos.reshape(-1)].add(routed.reshape(-1))
        else:
            num_routed = jnp.sum(mask).astype(jnp.int32)
            num_dropped = tokens_dropped
            drop_cnt = jnp.zeros((seq_len,), jnp.float32).at[pos.reshape(-1)].add(tok_dropped.reshape(-1))
            rout_cnt = jnp.zeros((seq_len,), jnp.float32).at[pos.reshape(-1)].add(mask.reshape(-1))
        # per-expert counts as scatter-adds / dots (XLA:CPU reduces non-minor axes slowly)
        load = jnp.zeros((e,), jnp.float32).at[plan.expert.reshape(-1)].add(plan.kept.reshape(-1).astype(jnp.float32))
        load = load / jnp.maximum(jnp.sum(load), 1.0)
        m = mask.astype(jnp.float32)
        sel_count = jnp.zeros((probs.shape[-1],), jnp.float32).at[plan.selected.reshape(-1)].add(
            jnp.broadcast_to(m[..., None], plan.selected.shape).reshape(-1))  # router space
        ent = -jnp.sum(probs * jnp.log(jnp.maximum(probs, 1e-30)), axis=-1)
        return MoeStats(
            load_balancing_loss=lb,
            router_z_loss=z,
            importance_loss=extra.get("importance_loss", zero),
            load_loss=extra.get("load_loss", zero),
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
            capacity=plan.capacity,
        )
