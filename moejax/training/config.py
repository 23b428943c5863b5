"""The run configs of the trainer: :class:`LossConfig` and :class:`TrainConfig` (plain frozen
dataclasses, gin-configurable at the edge in :mod:`moejax.entry`). A leaf module: it imports nothing
from moejax, so every part of the trainer may use it."""

from __future__ import annotations

import dataclasses


@dataclasses.dataclass(frozen=True)
class LossConfig:
    """``z_loss``: T5X output-logit z-loss factor (``z_loss * logsumexp(logits)^2``);
    ``label_smoothing``; ``aux_loss_factor`` x load-balancing loss; ``router_z_loss_factor`` x
    router z-loss (Switch / ST-MoE defaults 0.01 and 0.001)."""

    z_loss: float = 1e-4
    label_smoothing: float = 0.0
    aux_loss_factor: float = 0.01
    router_z_loss_factor: float = 0.001


@dataclasses.dataclass(frozen=True)
class TrainConfig:
    """Everything about a run except the model and the optimizer."""

    mixture_or_task: str = "corpus_span_corruption"
    task_feature_lengths: dict = dataclasses.field(default_factory=lambda: {"inputs": 64, "targets": 32})
    batch_size: int = 32
    train_steps: int = 100
    microbatches: int = 1
    log_every: int = 10
    save_every: int = 100
    keep: int = 3
    eval_every: int = 0
    eval_mixture_or_task: str | None = None
    eval_batches: int = 4
    infer_examples: int = 32
    seed: int = 0
    freeze: tuple = ()
    loss: LossConfig = dataclasses.field(default_factory=LossConfig)
    initial_checkpoint: str | None = None
    upcycle: bool = False
    teacher_checkpoint: str | None = None
    distill_alpha: float = 0.75
    distill_temperature: float = 1.0
    bias_update_rate: float = 0.001
    init_from_teacher: bool = True
    mesh_shape: dict | None = None
    dcn_mesh_shape: dict | None = None
    data_shards: int | None = None
