"""Training loss: token cross-entropy (+ output z-loss, label smoothing) plus the weighted MoE
router losses, each reported separately.

Batches are seqio feature-converter outputs: encoder-decoder ``encoder_input_tokens [b, t]``,
``decoder_input_tokens``, ``decoder_target_tokens``, ``decoder_loss_weights [b, s]``; decoder-only
the same without the encoder input.
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp

from moejax.models.encdec import EncoderDecoder


@dataclasses.dataclass(frozen=True)
class LossConfig:
    """``z_loss``: T5X output-logit z-loss factor (``z_loss * logsumexp(logits)^2``);
    ``label_smoothing``; ``aux_loss_factor`` x load-balancing loss; ``router_z_loss_factor`` x
    router z-loss (Switch / ST-MoE defaults 0.01 and 0.001)."""

    z_loss: float = 1e-4
    label_smoothing: float = 0.0
    aux_loss_factor: float = 0.01
    router_z_loss_factor: float = 0.001


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


def apply(model, batch, deterministic: bool):
    """Run the model on a batch of seqio features -> ``(logits [b, s, v], aux)`` (the model's own
    aux: ``EncDecAux`` or ``DecoderAux``); a ``task_ids [b]`` entry is passed on."""
    dec_mask = batch["decoder_target_tokens"] > 0
    tids = batch.get("task_ids")
    if isinstance(model, EncoderDecoder):
        enc = batch["encoder_input_tokens"]
        return model(enc, batch["decoder_input_tokens"], encoder_mask=enc > 0, decoder_mask=dec_mask,
                     deterministic=deterministic, task_ids=tids)
    return model(batch["decoder_input_tokens"], padding_mask=dec_mask, deterministic=deterministic, task_ids=tids)


def forward(model, batch, deterministic: bool):
    """:func:`apply` -> ``(logits [b, s, v], list of MoeStats)`` of the sparse stacks."""
    logits, aux = apply(model, batch, deterministic)
    if isinstance(model, EncoderDecoder):
        return logits, [s for s in (aux.encoder, aux.decoder) if s is not None]
    return logits, [] if aux.moe is None else [aux.moe]


def moe_metrics(stats) -> dict:
    """Mean over every sparse layer of the losses and routing metrics (zeros for dense models)."""
    if not stats:
        z = jnp.zeros(())
        return {"load_balancing_loss": z, "router_z_loss": z, "tokens_dropped_fraction": z, "dropped_fraction": z,
                "router_entropy": z, "router_confidence": z}
    cat = lambda name: jnp.concatenate([jnp.ravel(getattr(s, name)) for s in stats])
    out = {k: jnp.mean(cat(k)) for k in ("load_balancing_loss", "router_z_loss", "tokens_dropped_fraction",
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
