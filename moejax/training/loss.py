"""Training loss: token cross-entropy (+ output z-loss, label smoothing) plus the weighted MoE
router losses, each reported separately.

Batches are seqio feature-converter outputs: encoder-decoder ``encoder_input_tokens [b, t]``,
``decoder_input_tokens``, ``decoder_target_tokens``, ``decoder_loss_weights [b, s]``; decoder-only
the same without the encoder input.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from moejax.models.forward import apply, forward
from moejax.models.stack import mean_over_layers
from moejax.training.config import LossConfig

__all__ = ["LossConfig", "apply", "cross_entropy", "distill_kl", "forward", "loss_fn", "moe_metrics"]


def cross_entropy(logits, targets, weights, z_loss: float = 0.0, label_smoothing: float = 0.0):
    """``logits [b, s, v]``, ``targets [b, s]``, ``weights [b, s]`` ->
    ``(ce_sum, z_sum, correct_sum, weight_sum)`` (sums over weighted tokens). With smoothing ``a``
    the target distribution is ``1-a`` on the label and ``a/(v-1)`` on every other id, and the loss
    is offset by that distribution's entropy (T5X convention: 0 at a perfect prediction)."""
    v = logits.shape[-1]
    logits = logits.astype(jnp.float32)
    lse = jax.nn.logsumexp(logits, axis=-1)
    logp = logits - lse[..., None]
    conf = 1.0 - label_smoothing
    low = label_smoothing / (v - 1)
    onehot = jax.nn.one_hot(targets, v, dtype=jnp.float32)
    soft = onehot * (conf - low) + low
    normalizing = -(conf * jnp.log(conf) + (v - 1) * low * jnp.log(low + 1e-20)) if label_smoothing else 0.0
    ce = -jnp.sum(soft * logp, axis=-1) - normalizing
    z = z_loss * jnp.square(lse)
    w = weights.astype(jnp.float32)
    correct = (jnp.argmax(logits, axis=-1) == targets).astype(jnp.float32)
    return jnp.sum(ce * w), jnp.sum(z * w), jnp.sum(correct * w), jnp.sum(w)


def moe_metrics(stats) -> dict:
    """Mean over every sparse layer of the losses and routing metrics (zeros for dense models)."""
    if not stats:
        z = jnp.zeros(())
        return {"load_balancing_loss": z, "router_z_loss": z, "tokens_dropped_fraction": z, "dropped_fraction": z,
                "router_entropy": z, "router_confidence": z}
    out = {k: mean_over_layers(stats, k) for k in ("load_balancing_loss", "router_z_loss", "tokens_dropped_fraction",
                                                    "dropped_fraction", "router_entropy", "router_confidence")}
    out["expert_load"] = jnp.concatenate([s.expert_load.reshape(-1, s.expert_load.shape[-1]) for s in stats])
    return out


def distill_kl(student_logits, teacher_logits, weights, temperature: float = 1.0):
    """Soft-target loss summed over weighted tokens: ``T^2 * KL(softmax(t/T) || softmax(s/T))``
    (Hinton et al.; the ``T^2`` keeps gradient scales comparable across temperatures)."""
    t = jax.nn.log_softmax(teacher_logits.astype(jnp.float32) / temperature, axis=-1)
    s = jax.nn.log_softmax(student_logits.astype(jnp.float32) / temperature, axis=-1)
    kl = jnp.sum(jnp.exp(t) * (t - s), axis=-1)
    return temperature**2 * jnp.sum(kl * weights.astype(jnp.float32))


def loss_fn(model, batch, cfg: LossConfig, deterministic: bool = False, teacher_logits=None,
            distill_alpha: float = 0.0, distill_temperature: float = 1.0):
    """``(total / weight_sum, metrics)``; metrics hold the separate sums and MoE statistics.

    With ``teacher_logits`` (distillation): ``alpha * soft + (1 - alpha) * (hard CE + z-loss)``
    plus the router losses, the soft part from :func:`distill_kl`."""
    logits, stats = forward(model, batch, deterministic)
    weights = batch["decoder_loss_weights"]
    ce, z, correct, n = cross_entropy(logits, batch["decoder_target_tokens"], weights, cfg.z_loss,
                                      cfg.label_smoothing)
    moe = moe_metrics(stats)
    n_safe = jnp.maximum(n, 1.0)
    task = (ce + z) / n_safe
    extra = {}
    if teacher_logits is not None:
        soft = distill_kl(logits, teacher_logits, weights, distill_temperature) / n_safe
        task = distill_alpha * soft + (1.0 - distill_alpha) * task
        extra["distill_kl"] = soft
    total = task + cfg.aux_loss_factor * moe["load_balancing_loss"] + cfg.router_z_loss_factor * moe["router_z_loss"]
    metrics = {"loss": total, "cross_entropy": ce / n_safe, "z_loss": z / n_safe, "accuracy": correct / n_safe,
               "weight_sum": n, **moe, **extra}
    return total, metrics
