"""Auxiliary router losses: load balancing, router z-loss, noisy top-k importance and load.

All take a ``token_mask [g, t]`` (False = padding) and ignore padding tokens entirely.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from jax.scipy.stats import norm


def _masked_mean(x: jax.Array, mask: jax.Array, axis) -> jax.Array:
    m = mask.astype(jnp.float32)
    return jnp.sum(x * m, axis=axis) / jnp.maximum(jnp.sum(m, axis=axis), 1.0)


def token_mean(x: jax.Array, token_mask: jax.Array) -> jax.Array:
    """``x [g, t, ..., e]`` -> ``[g, e]``: summed over any middle axes (e.g. the k choices) and
    averaged over each group's non-padding tokens.

    A contraction with the mask (a dot), not ``sum(x * m, axis=1)``: XLA:CPU runs reductions
    over a non-minor axis an order of magnitude slower.
    """
    m = token_mask.astype(jnp.float32)
    return jnp.einsum("gt...e,gt->ge", x, m) / jnp.maximum(jnp.sum(m, axis=-1), 1.0)[:, None]


def load_balancing_loss(probs: jax.Array, selected: jax.Array, token_mask: jax.Array) -> jax.Array:
    """Switch load-balancing loss ``E * sum_e f_e * P_e``, averaged over groups.

    Args:
      probs: ``[g, t, e]`` router probabilities.
      selected: ``[g, t, k]`` experts each token selected (before capacity and policy).
      token_mask: ``[g, t]``.

    ``f_e`` = (number of the k choices that went to e) / tokens and ``P_e`` = mean router
    probability of e, both over the non-padding tokens of a group. Convention: all k choices
    count, so ``sum_e f_e = k`` and the loss equals **k at perfect balance** (1.0 for Switch
    top-1, 2.0 for top-2 — the flaxformer and HF Mixtral convention). Divide by k for a
    k-independent scale.
    """
    e = probs.shape[-1]
    f = token_mean(jax.nn.one_hot(selected, e, dtype=jnp.float32), token_mask)  # [g, e], sums to k
    p = token_mean(probs, token_mask)
    return jnp.mean(e * jnp.sum(f * p, axis=-1))


def router_z_loss(logits: jax.Array, token_mask: jax.Array) -> jax.Array:
    """ST-MoE router z-loss ``mean_tokens(logsumexp_e(logits)^2)`` over non-padding tokens."""
    lse = jax.nn.logsumexp(logits, axis=-1)
    return _masked_mean(lse**2, token_mask, axis=(0, 1))


def cv_squared(x: jax.Array) -> jax.Array:
    """Squared coefficient of variation ``var(x) / mean(x)^2`` (population variance)."""
    mean = jnp.mean(x)
    return jnp.var(x) / (mean**2 + 1e-10)


def importance_loss(gates: jax.Array, token_mask: jax.Array) -> jax.Array:
    """Shazeer et al. 2017 importance loss ``CV(sum_tokens G)^2``; ``gates [g, t, e]`` are the
    dense combine weights (0 for unselected experts)."""
    importance = jnp.einsum("gte,gt->e", gates, token_mask.astype(gates.dtype))
    return cv_squared(importance)


def load_loss(clean_logits: jax.Array, noisy_logits: jax.Array, noise_std: jax.Array, k: int,
              token_mask: jax.Array) -> jax.Array:
    """Shazeer et al. 2017 smooth load loss ``CV(load)^2``.

    ``load_e = sum_tokens P(e stays in the top-k when its noise is resampled)
    = Phi((clean_e - threshold_e) / noise_std_e)``, the threshold being the k-th largest noisy
    logit of the other experts. Shapes ``[g, t, e]``; needs ``k < e``.
    """
    e = noisy_logits.shape[-1]
    top, _ = jax.lax.top_k(noisy_logits, min(k + 1, e))
    thr_if_in = top[..., k] if k < e else jnp.full(top.shape[:-1], -jnp.inf)
    thr_if_out = top[..., k - 1]
    is_in = noisy_logits > thr_if_out[..., None]
    is_in = is_in | (noisy_logits == thr_if_out[..., None])
    threshold = jnp.where(is_in, thr_if_in[..., None], thr_if_out[..., None])
    prob = norm.cdf((clean_logits - threshold) / jnp.maximum(noise_std, 1e-9))
    load = jnp.einsum("gte,gt->e", prob, token_mask.astype(prob.dtype))
    return cv_squared(load)
