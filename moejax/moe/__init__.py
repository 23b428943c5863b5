"""The MoE layer: routers, capacity buckets, dispatch backends, experts, losses.

Pure and self-contained: it knows nothing of models or training. Entry point:
:class:`MoeLayer` configured by :class:`MoeConfig`; :mod:`moejax.moe.factory` turns the config's
router and backend names into objects, :mod:`moejax.moe.options` lists every valid name.
"""

from moejax.moe.capacity import assign_slots, expert_capacity, layer_capacity, num_groups
from moejax.moe.config import MoeConfig
from moejax.moe.dispatch import Backend, EinsumBackend, ExpertCall, GatherBackend, RaggedBackend
from moejax.moe.experts import DenseFFN, Experts
from moejax.moe.factory import make_backend, make_router
from moejax.moe.layer import MoeLayer, MoeStats
from moejax.moe.losses import importance_loss, load_balancing_loss, load_loss, router_z_loss
from moejax.moe.plan import ExpertChoicePlan, RoutingPlan, TokenChoicePlan
from moejax.moe.routing import (
    ExpertChoiceRouter,
    LinearRouter,
    NoisyTopKRouter,
    Router,
    RouterLosses,
    TaskRouter,
    TopKRouter,
    expert_choice_route,
    top_k_route,
)

__all__ = [
    "Backend", "DenseFFN", "EinsumBackend", "ExpertCall", "ExpertChoicePlan", "ExpertChoiceRouter", "Experts",
    "GatherBackend", "LinearRouter", "MoeConfig", "MoeLayer", "MoeStats", "NoisyTopKRouter", "RaggedBackend",
    "Router", "RouterLosses", "RoutingPlan", "TaskRouter", "TokenChoicePlan", "TopKRouter", "assign_slots",
    "expert_capacity", "expert_choice_route", "importance_loss", "layer_capacity", "load_balancing_loss",
    "load_loss", "make_backend", "make_router", "num_groups", "router_z_loss", "top_k_route",
]
