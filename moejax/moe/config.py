"""MoeConfig: every knob of the MoE layer in one validated dataclass."""

from __future__ import annotations

import dataclasses
from typing import Any

import jax.numpy as jnp

from moejax.moe.bucket import DEFAULT_BUCKETS
from moejax.moe.factory import check_config, router_class
from moejax.moe.options import (
    QUANT_BITS,
    Activation,
    Backend,
    BalanceScope,
    GroupedMatmul,
    GroupScore,
    Router,
    RouterScore,
    SecondExpertPolicy,
    WeightNorm,
    check,
)
from moejax.sharding import DEFAULT_RULES, Rules


@dataclasses.dataclass(frozen=True)
class MoeConfig:
    """Configuration of :class:`moejax.moe.MoeLayer`.

    Every string option's valid values are the members of its enum in :mod:`moejax.moe.options`.

    Routing
      router: ``"top_k"`` (tokens choose k experts: k=1 Switch, k=2 GShard / Mixtral),
        ``"expert_choice"`` (each expert takes its top-C tokens; **not causal**: a token's routing
        depends on later tokens of its group, so do not use it in autoregressive decoders), or
        ``"noisy_top_k"`` (Shazeer et al. 2017: learned softplus noise on the logits in training,
        softmax over the top-k noisy logits), or ``"task"`` (task-level routing: every token of an
        example goes to the top-k experts of a learned per-task logit table ``[num_tasks, e]``
        indexed by the example's task id; dropless, weights renormalised over the k; a task's
        sub-network can be extracted, see :mod:`moejax.inference.task_routing`).
      top_k: experts per token (for expert choice: the average number of experts per token, which
        sets the capacity).
      second_expert_policy: for top_k == 2: ``"all"`` (always keep the 2nd expert), ``"random"``
        (GShard: keep it iff ``2 * p2 > U(0,1)``), ``"sampling"`` (2nd expert = argmax of
        logits + Gumbel noise, first expert excluded). Random policies act only in training.
      weight_norm: combine weights are ``"none"``: the raw softmax probabilities (Switch/T5X);
        ``"topk"``: renormalised over the k selected experts before capacity (Mixtral);
        ``"kept"``: renormalised over the choices that survive policy and capacity (GShard/fairseq).
      router_score / num_expert_groups / top_k_groups / group_score / selection_bias /
        routed_scale (``router="top_k"`` only; DeepSeek-V2/V3): expert scores ``s`` are
        ``softmax(logits)`` or ``sigmoid(logits)`` (``router_score``); the selection score is
        ``s + b`` with ``b`` the per-expert ``selection_bias`` (DeepSeek-V3's
        ``e_score_correction_bias``; a :class:`~moejax.moe.routing.SelectionBias` param used only to
        choose experts, never in the weights, trained by the aux-loss-free balancing rule, see
        :mod:`moejax.training.balance`); with ``num_expert_groups = n > 1`` the experts form n
        contiguous groups, each scored by its best score (``group_score="max"``, V2) or the sum
        of its two best selection scores (``"top2_sum"``, V3), and a token chooses its top-k only
        among the ``top_k_groups`` best groups (the others masked to -inf, as DeepSeek's own code
        and transformers 5; transformers 4.57 masks V3's to 0.0). Combine weights are ``s`` at the
        chosen experts (``weight_norm`` as above), times ``routed_scale``
        (``routed_scaling_factor``). With sigmoid scores the load-balancing loss and router stats
        use ``s / sum(s)``.
      balance_loss_scope: the tokens ``f_e`` and ``P_e`` of the load-balancing loss are taken
        over: ``"group"`` (each routing group), ``"sequence"`` (each example: DeepSeek-V3's
        sequence-wise loss, which is this loss / k), ``"global"`` (all groups of the call pooled,
        across data-parallel devices too: global-batch balancing); the mean over the scopes.
      jitter_eps: multiplicative router-input jitter ``U[1-eps, 1+eps]`` in training only.
      batch_prioritized: fill capacity in order of descending top-1 probability instead of token
        order (BPR, Riquelme et al.); leave off for decoders.

    Capacity (see :func:`moejax.moe.capacity.expert_capacity`)
      capacity_factor_train / capacity_factor_eval: chosen by the explicit ``deterministic`` flag.
      min_capacity: lower bound on C.
      dropless: no capacity limit (every routed token is processed). With the default backend
        (``"auto"`` -> ``"bucket"``) the layer computes with the smallest capacity of a compiled ladder
        that holds the largest expert load, so the cost follows the real loads.
      capacity_buckets: the ladder's capacity factors (slots per expert = ``f * k * t / e``, rounded
        up to a multiple of 8, at most ``t``); loads above the largest run several rounds of it, so
        its size bounds the dispatch buffers (:mod:`moejax.moe.bucket`).
      max_group_size: tokens are regrouped into groups of at most this many tokens.
      group_multiple: the number of groups is made a multiple of this (set it to the number of batch
        shards so the group axis can be sharded).
      sequence_groups: each sequence is its own group (HF Switch / OpenMoE semantics), ignoring
        max_group_size.
      expert_capacity: a fixed C overriding the capacity-factor formula (HF Switch's
        ``expert_capacity``, 64 on the Hub).

    Experts
      d_model, d_ff, activation, use_bias, expert_dropout (dropout on the expert hidden layer in
      training), eom_rate (NLLB "expert output masking" as transformers implements it: element-wise
      inverted dropout on each expert's output in training, outputs scaled by ``1 - eom_rate`` in
      eval), num_shared_experts / shared_d_ff (always-on dense experts added to the output;
      ``shared_gate``: scaled per token by ``sigmoid(x . w)``, a learned ``[d, 1]`` gate: Qwen2-MoE),
      inner (an :class:`MoeConfig` making every expert itself an MoE layer: hierarchical MoE),
      expert_map (merged experts: a tuple with one entry per router output, router output ``i``
      being served by physical expert ``expert_map[i]``; the router keeps ``len(expert_map)``
      outputs, capacity is computed for the ``num_experts`` physical experts. Set by
      :mod:`moejax.inference.merging`; top-k routers only), quant_bits / quant_group_size
      (weight-only int8 / int4 expert weights with per-channel or per-group scales, dequantized
      inside the expert matmul; set by :mod:`moejax.inference.quantize`, inference only).

    Numerics and layout
      dtype: compute dtype of the experts; param_dtype: parameter dtype. The router computes in
      ``router_dtype`` — float32 by default ("selective precision"); bfloat16 exists for the
      ablation in ``experiments/router_precision.py``; its logits are cast to float32 either way.
      backend: ``"auto"`` (default: ``"bucket"`` when dropless, else ``"gather"``), ``"bucket"``
        (token choice; with a capacity limit it drops what ``gather`` drops), ``"gather"``,
        ``"einsum"`` or ``"ragged"``; see :mod:`moejax.moe.dispatch`.
      grouped_matmul: the ragged backend's kernel, ``"auto"`` (Megablox on TPU, else
      ``jax.lax.ragged_dot``), ``"ragged_dot"`` or ``"megablox"`` (:mod:`moejax.moe.grouped`).
      axis_rules: the logical -> mesh axis table for activation constraints.
    """

    num_experts: int = 8
    d_model: int = 64
    d_ff: int = 128
    top_k: int = 1
    router: str = "top_k"
    num_tasks: int = 0
    second_expert_policy: str = "all"
    weight_norm: str = "none"
    router_score: str = "softmax"
    num_expert_groups: int = 1
    top_k_groups: int = 1
    group_score: str = "max"
    selection_bias: bool = False
    routed_scale: float = 1.0
    balance_loss_scope: str = "group"
    router_bias: bool = False
    router_init_std: float = 0.02
    jitter_eps: float = 0.0
    batch_prioritized: bool = False
    capacity_factor_train: float = 1.25
    capacity_factor_eval: float = 2.0
    min_capacity: int = 4
    dropless: bool = False
    capacity_buckets: tuple = DEFAULT_BUCKETS
    max_group_size: int = 4096
    group_multiple: int = 1
    sequence_groups: bool = False
    expert_capacity: int | None = None
    activation: str = "relu"
    use_bias: bool = False
    expert_dropout: float = 0.0
    eom_rate: float = 0.0
    num_shared_experts: int = 0
    shared_d_ff: int | None = None
    shared_gate: bool = False
    inner: MoeConfig | None = None
    expert_map: tuple | None = None
    quant_bits: int | None = None
    quant_group_size: int | None = None
    backend: str = "auto"
    grouped_matmul: str = "auto"
    dtype: Any = jnp.float32
    param_dtype: Any = jnp.float32
    router_dtype: Any = jnp.float32
    axis_rules: Rules = DEFAULT_RULES

    def replace(self, **kw) -> MoeConfig:
        return dataclasses.replace(self, **kw)

    @property
    def uses_task_ids(self) -> bool:
        """Does the router route by each example's task id (the layer then needs ``task_ids [b]``)?"""
        return router_class(self.router).uses_task_ids

    @property
    def router_width(self) -> int:
        """Number of router outputs (``num_experts`` unless experts were merged)."""
        return self.num_experts if self.expert_map is None else len(self.expert_map)

    @property
    def deepseek_routing(self) -> bool:
        """Does the config ask for any of the scoring / group-limited / selection-bias / scaling
        options beyond plain softmax top-k (only ``router='top_k'`` implements them)?"""
        return (self.router_score != "softmax" or self.num_expert_groups != 1 or self.selection_bias
                or self.routed_scale != 1.0)

    def _check_grouped_routing(self) -> None:
        e, n = self.router_width, self.num_expert_groups
        if n < 1 or e % n:
            raise ValueError(f"num_expert_groups={n} must be >= 1 and divide num_experts={e}")
        if not 1 <= self.top_k_groups <= n:
            raise ValueError(f"top_k_groups={self.top_k_groups} must be in [1, num_expert_groups={n}]")
        if n > 1 and self.top_k > self.top_k_groups * (e // n):
            raise ValueError(f"top_k={self.top_k} > the {self.top_k_groups * (e // n)} experts of the top_k_groups="
                             f"{self.top_k_groups} groups of {e // n}; raise top_k_groups or lower top_k")
        if n > 1 and self.group_score == "top2_sum" and e // n < 2:
            raise ValueError(f"group_score='top2_sum' needs >= 2 experts per group, got {e // n}")
        if not self.routed_scale > 0:
            raise ValueError(f"routed_scale must be > 0, got {self.routed_scale}")
        if self.deepseek_routing and self.second_expert_policy != "all":
            raise ValueError(f"second_expert_policy={self.second_expert_policy!r} cannot be combined with "
                             f"router_score / num_expert_groups / selection_bias / routed_scale; use 'all'")

    def validate(self) -> MoeConfig:
        """Fail fast with a clear message naming the offending value."""

        check("router", self.router, Router)
        check("second_expert_policy", self.second_expert_policy, SecondExpertPolicy)
        check("weight_norm", self.weight_norm, WeightNorm)
        check("router_score", self.router_score, RouterScore)
        check("group_score", self.group_score, GroupScore)
        check("balance_loss_scope", self.balance_loss_scope, BalanceScope)
        check("backend", self.backend, Backend)
        check("grouped_matmul", self.grouped_matmul, GroupedMatmul)
        check("activation", self.activation, Activation)
        if self.num_experts < 1:
            raise ValueError(f"num_experts must be >= 1, got {self.num_experts}")
        if self.top_k < 1:
            raise ValueError(f"top_k must be >= 1, got {self.top_k}")
        if self.top_k > self.router_width:
            raise ValueError(
                f"top_k={self.top_k} > num_experts={self.router_width}; top_k must be in "
                f"[1, {self.router_width}]"
            )
        if self.quant_bits is not None and self.quant_bits not in QUANT_BITS:
            raise ValueError(f"unsupported quantization bit width {self.quant_bits}; "
                             f"valid: {', '.join(map(str, QUANT_BITS))}")
        self._check_grouped_routing()
        check_config(self)          # what the chosen router and backend support
        for name in ("capacity_factor_train", "capacity_factor_eval"):
            v = getattr(self, name)
            if not v > 0:
                raise ValueError(f"{name} must be > 0, got {v}")
        if self.min_capacity < 0:
            raise ValueError(f"min_capacity must be >= 0, got {self.min_capacity}")
        if self.max_group_size < 1:
            raise ValueError(f"max_group_size must be >= 1, got {self.max_group_size}")
        if self.expert_capacity is not None and self.expert_capacity < 1:
            raise ValueError(f"expert_capacity must be >= 1 or None, got {self.expert_capacity}")
        if self.group_multiple < 1:
            raise ValueError(f"group_multiple must be >= 1, got {self.group_multiple}")
        if not 0.0 <= self.expert_dropout < 1.0:
            raise ValueError(f"expert_dropout must be in [0, 1), got {self.expert_dropout}")
        if not 0.0 <= self.eom_rate < 1.0:
            raise ValueError(f"eom_rate must be in [0, 1), got {self.eom_rate}")
        if not 0.0 <= self.jitter_eps < 1.0:
            raise ValueError(f"jitter_eps must be in [0, 1), got {self.jitter_eps}")
        if self.num_shared_experts < 0:
            raise ValueError(f"num_shared_experts must be >= 0, got {self.num_shared_experts}")
        if self.shared_gate and not self.num_shared_experts:
            raise ValueError("shared_gate=True gates the shared experts, but num_shared_experts=0")
        if self.d_model < 1 or self.d_ff < 1:
            raise ValueError(f"d_model and d_ff must be >= 1, got {self.d_model}, {self.d_ff}")
        if self.inner is not None:
            self.inner.validate()
            if self.inner.d_model != self.d_model:
                raise ValueError(
                    f"inner MoE d_model={self.inner.d_model} must equal the outer d_model={self.d_model}"
                )
        return self
