"""Router losses in the Hugging Face conventions, rebuilt from moejax's per-layer MoeStats.

moejax reports per-layer losses (load balancing = k at balance, averaged over groups). HF pools
differently; these helpers reproduce HF's numbers from stats stacked over layers ``[l, ...]`` so
checkpoints can be checked (and users can match a HF training recipe).
"""

from __future__ import annotations

import jax.numpy as jnp

from moejax.moe import MoeStats


def mixtral_aux_loss(stats: MoeStats) -> jnp.ndarray:
    """HF ``load_balancing_loss_func`` (Mixtral, Qwen2-MoE, Qwen3-MoE, OLMoE): all layers' tokens pooled,
    ``E * sum_e f_e * P_e`` with ``f`` counting all top-k choices (2.0 at balance for top-2).
    Needs equal non-padding token counts per layer (true within one forward pass)."""
    f = jnp.mean(stats.selection_fraction, axis=0)
    p = jnp.mean(stats.router_prob_mean, axis=0)
    return f.shape[-1] * jnp.sum(f * p)


def switch_z_loss(stats: MoeStats) -> jnp.ndarray:
    """HF Switch ``router_z_loss_func`` over a stack's sparse layers (logits concatenated along the
    sequence): the mean of the per-layer z-losses."""
    return jnp.mean(stats.router_z_loss)
