"""Optimizers and learning-rate schedules (optax), with freezing masks.

Schedules (``step -> lr``): ``rsqrt`` (T5X: ``lr / sqrt(max(step, warmup))``, constant during
warmup), ``linear`` (linear warmup then linear decay to 0 at ``total_steps``), ``cosine`` (linear
warmup then cosine decay to 0), ``constant``.

Optimizers: ``adafactor`` (T5X default; factored second moments over each parameter's two largest
dims, so a stacked ``[layers, experts, d, f]`` expert kernel keeps per-layer, per-expert
statistics), ``adamw``. Both get global-norm gradient clipping when ``clip_norm`` is set, and
``master_weights=True`` keeps a float32 master copy of low-precision (bf16) params in the optimizer
state (:func:`with_master_weights`).
"""

from __future__ import annotations

import dataclasses
from typing import NamedTuple

import jax
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


class MasterState(NamedTuple):
    """Optimizer state of :func:`with_master_weights`: float32 ``master`` params, ``inner`` state."""

    master: optax.Params
    inner: optax.OptState


def with_master_weights(tx: optax.GradientTransformation) -> optax.GradientTransformation:
    """``tx`` run on a float32 master copy of the params (mixed-precision training with bf16 params).

    The optimizer state holds ``master`` (f32) and ``tx``'s state over it; each update casts the
    gradients to f32, steps the master, and returns the update that takes the (bf16) params to
    the new master rounded to their dtype, so small updates accumulate in f32 instead of being
    rounded away in bf16. Sharded like the params (same paths)."""
    def f32(tree):
        return jax.tree.map(lambda p: jnp.asarray(p, jnp.float32), tree)

    def init(params):
        master = f32(params)
        return MasterState(master=master, inner=tx.init(master))

    def update(grads, state, params=None):
        updates, inner = tx.update(f32(grads), state.inner, state.master)
        master = optax.apply_updates(state.master, updates)
        to_params = master if params is None else jax.tree.map(lambda m, p: m - jnp.asarray(p, jnp.float32),
                                                               master, params)
        return to_params, MasterState(master=master, inner=inner)

    return optax.GradientTransformation(init, update)


@dataclasses.dataclass(frozen=True)
class Optimizer:
    """An optax transformation and the learning-rate schedule it uses (for logging)."""

    tx: optax.GradientTransformation
    schedule: optax.Schedule


def make_optimizer(name: str = "adafactor", learning_rate: float = 0.01, schedule: str = "rsqrt",
                   warmup_steps: int = 0, total_steps: int = 0, weight_decay: float = 0.0,
                   clip_norm: float | None = None, b1: float = 0.9, b2: float = 0.999,
                   master_weights: bool = False) -> Optimizer:
    """An optax optimizer with the named schedule (and clipping). For Adafactor, ``learning_rate``
    multiplies the schedule exactly as T5X's (no parameter scaling, no momentum).
    ``master_weights``: keep a float32 master copy of the params (:func:`with_master_weights`)."""
    if name not in OPTIMIZERS:
        raise ValueError(f"unknown optimizer {name!r}; valid: {', '.join(OPTIMIZERS)}")
    for arg, value, low in (("learning_rate", learning_rate, 0.0), ("weight_decay", weight_decay, 0.0),
                            ("b1", b1, 0.0), ("b2", b2, 0.0), ("warmup_steps", warmup_steps, 0),
                            ("total_steps", total_steps, 0), ("clip_norm", clip_norm, 0.0)):
        if value is None and arg == "clip_norm":
            continue
        if isinstance(value, bool) or not isinstance(value, (int, float)) or not value >= low or (
                arg in ("warmup_steps", "total_steps") and not isinstance(value, int)):
            kind = "an integer" if arg in ("warmup_steps", "total_steps") else "a number"
            raise ValueError(f"optimizer {arg} must be {kind} >= {low}, got {value!r}")
    if not isinstance(master_weights, bool):
        raise ValueError(f"optimizer master_weights must be True or False, got {master_weights!r}")
    sched = make_schedule(schedule, learning_rate, warmup_steps, total_steps)
    if name == "adafactor":
        opt = optax.adafactor(learning_rate=sched, multiply_by_parameter_scale=False, clipping_threshold=1.0,
                              weight_decay_rate=weight_decay or None, min_dim_size_to_factor=8)
    else:
        opt = optax.adamw(sched, b1=b1, b2=b2, weight_decay=weight_decay)
    if clip_norm:
        opt = optax.chain(optax.clip_by_global_norm(clip_norm), opt)
    if master_weights:
        opt = with_master_weights(opt)
    return Optimizer(opt, sched)
