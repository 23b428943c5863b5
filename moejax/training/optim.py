"""Optimizers and learning-rate schedules (optax), with freezing masks.

Schedules (``step -> lr``): ``rsqrt`` (T5X: ``lr / sqrt(max(step, warmup))``, constant during
warmup), ``linear`` (linear warmup then linear decay to 0 at ``total_steps``), ``cosine`` (linear
warmup then cosine decay to 0), ``constant``.

Optimizers: ``adafactor`` (T5X default; factored second moments over each parameter's two largest
dims, so a stacked ``[layers, experts, d, f]`` expert kernel keeps per-layer, per-expert
statistics), ``adamw``. Both get global-norm gradient clipping when ``clip_norm`` is set.
"""

from __future__ import annotations

import dataclasses

import jax.numpy as jnp
import optax

SCHEDULES = ("rsqrt", "linear", "cosine", "constant")
OPTIMIZERS = ("adafactor", "adamw")


def make_schedule(name: str, learning_rate: float, warmup_steps: int = 0, total_steps: int = 0) -> optax.Schedule:
    """The named schedule as an optax schedule (see the module docstring)."""
    if name not in SCHEDULES:
        raise ValueError(f"unknown schedule {name!r}; valid: {', '.join(SCHEDULES)}")
    if name in ("linear", "cosine") and total_steps <= warmup_steps:
        raise ValueError(f"schedule {name!r} needs total_steps > warmup_steps, got {total_steps} <= {warmup_steps}")
    w = max(int(warmup_steps), 0)
    if name == "constant":
        return optax.constant_schedule(learning_rate)
    if name == "rsqrt":
        return lambda step: learning_rate / jnp.sqrt(jnp.maximum(step, max(w, 1)).astype(jnp.float32))
    if name == "linear":
        return optax.join_schedules([optax.linear_schedule(0.0, learning_rate, w) if w else
                                     optax.constant_schedule(learning_rate),
                                     optax.linear_schedule(learning_rate, 0.0, total_steps - w)], [w])
    return optax.warmup_cosine_decay_schedule(0.0, learning_rate, w, total_steps, end_value=0.0)


@dataclasses.dataclass(frozen=True)
class Optimizer:
    """An optax transformation and the learning-rate schedule it uses (for logging)."""

    tx: optax.GradientTransformation
    schedule: optax.Schedule


def make_optimizer(name: str = "adafactor", learning_rate: float = 0.01, schedule: str = "rsqrt",
                   warmup_steps: int = 0, total_steps: int = 0, weight_decay: float = 0.0,
                   clip_norm: float | None = None, b1: float = 0.9, b2: float = 0.999) -> Optimizer:
    """An optax optimizer with the named schedule (and clipping). For Adafactor, ``learning_rate``
    multiplies the schedule exactly as T5X's (no parameter scaling, no momentum)."""
    if name not in OPTIMIZERS:
        raise ValueError(f"unknown optimizer {name!r}; valid: {', '.join(OPTIMIZERS)}")
    sched = make_schedule(schedule, learning_rate, warmup_steps, total_steps)
    if name == "adafactor":
        opt = optax.adafactor(learning_rate=sched, multiply_by_parameter_scale=False, clipping_threshold=1.0,
                              weight_decay_rate=weight_decay or None, min_dim_size_to_factor=8)
    else:
        opt = optax.adamw(sched, b1=b1, b2=b2, weight_decay=weight_decay)
    if clip_norm:
        opt = optax.chain(optax.clip_by_global_norm(clip_norm), opt)
    return Optimizer(opt, sched)
