"""The MoE layer: routers, capacity buckets, dispatch backends, experts, losses.

Pure and self-contained: it knows nothing of models or training. Entry point:
:class:`MoeLayer` configured by :class:`MoeConfig`.
"""

from moejax.moe.capacity import assign_slots, expert_capacity, num_groups
from moejax.moe.config import MoeConfig
from moejax.moe.dispatch import BACKENDS, combine_tensor, dispatch_mask
from moejax.moe.experts import DenseFFN, Experts
from moejax.moe.layer import MoeLayer, MoeStats
from moejax.moe.losses import importance_loss, load_balancing_loss, load_loss, router_z_loss
from moejax.moe.routing import Router, RoutingPlan, expert_choice_route, top_k_route

__all__ = [
    "BACKENDS", "DenseFFN", "Experts", "MoeConfig", "MoeLayer", "MoeStats", "Router", "RoutingPlan",
    "assign_slots", "combine_tensor", "dispatch_mask", "expert_capacity", "expert_choice_route",
    "importance_loss", "load_balancing_loss", "load_loss", "num_groups", "router_z_loss", "top_k_route",
]
