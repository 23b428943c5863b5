"""Every string-valued option of the MoE layer, defined once as an ``enum.StrEnum``.

Configs keep plain strings (they serialise to JSON and bind from gin as they are); each enum is
the one list of valid values, used by :meth:`moejax.moe.MoeConfig.validate` for the error message
and by :mod:`moejax.moe.factory` to turn a string into an object. Because the members are
``str``, ``Backend.GATHER == "gather"`` holds.
"""

from __future__ import annotations

import enum


class Router(enum.StrEnum):
    """``MoeConfig.router``: which router class routes the tokens (see :mod:`moejax.moe.routing`)."""

    TOP_K = "top_k"
    EXPERT_CHOICE = "expert_choice"
    NOISY_TOP_K = "noisy_top_k"
    TASK = "task"


class SecondExpertPolicy(enum.StrEnum):
    """``MoeConfig.second_expert_policy`` (top-2 only)."""

    ALL = "all"
    RANDOM = "random"
    SAMPLING = "sampling"


class RouterScore(enum.StrEnum):
    """``MoeConfig.router_score``: how logits become expert scores (softmax over experts, or an
    independent sigmoid per expert: DeepSeek-V3)."""

    SOFTMAX = "softmax"
    SIGMOID = "sigmoid"


class GroupScore(enum.StrEnum):
    """``MoeConfig.group_score``: how a group of experts is scored for group-limited routing: its
    best expert (``max``: DeepSeek-V2) or the sum of its best two selection scores (``top2_sum``:
    DeepSeek-V3)."""

    MAX = "max"
    TOP2_SUM = "top2_sum"


class BalanceScope(enum.StrEnum):
    """``MoeConfig.balance_loss_scope``: over which tokens the load-balancing loss's ``f_e`` and
    ``P_e`` are taken before ``E * sum_e f_e P_e`` is averaged: each routing ``group`` (Switch /
    GShard), each ``sequence`` (DeepSeek-V3's sequence-wise balance loss), or the ``global`` batch
    of the call, all groups and data-parallel devices pooled (Qwen3's global-batch balance)."""

    GROUP = "group"
    SEQUENCE = "sequence"
    GLOBAL = "global"


class WeightNorm(enum.StrEnum):
    """``MoeConfig.weight_norm``: how the combine weights of a token's choices are normalised."""

    NONE = "none"
    TOPK = "topk"
    KEPT = "kept"


class Backend(enum.StrEnum):
    """``MoeConfig.backend``: the dispatch backend (see :mod:`moejax.moe.dispatch`); ``auto`` is
    ``bucket`` for dropless layers and ``gather`` otherwise."""

    AUTO = "auto"
    BUCKET = "bucket"
    GATHER = "gather"
    EINSUM = "einsum"
    RAGGED = "ragged"


class GroupedMatmul(enum.StrEnum):
    """``MoeConfig.grouped_matmul``: the ragged backend's kernel (see :mod:`moejax.moe.grouped`)."""

    AUTO = "auto"
    RAGGED_DOT = "ragged_dot"
    MEGABLOX = "megablox"


class Activation(enum.StrEnum):
    """``MoeConfig.activation`` and the dense FFNs' activation (see :mod:`moejax.moe.experts`)."""

    RELU = "relu"
    GELU = "gelu"
    GELU_EXACT = "gelu_exact"
    SILU = "silu"
    GATED_GELU = "gated-gelu"
    GATED_GELU_EXACT = "gated-gelu_exact"
    SWIGLU = "swiglu"
    SPLIT_SWIGLU = "split-swiglu"
    CLAMPED_SWIGLU = "clamped-swiglu"


#: ``MoeConfig.quant_bits``: weight-only quantization widths of the experts.
QUANT_BITS = (8, 4)


def values(option: type[enum.Enum]) -> tuple[str, ...]:
    """The valid strings of an option enum, in definition order."""
    return tuple(m.value for m in option)


def check(name: str, value, option: type[enum.Enum]) -> None:
    """Raise ``ValueError("unknown NAME 'x'; valid: a, b, c")`` unless ``value`` is a member."""
    if value not in values(option):
        raise ValueError(f"unknown {name} {value!r}; valid: {', '.join(values(option))}")
