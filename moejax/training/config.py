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

    def __post_init__(self):
        for name in ("z_loss", "label_smoothing", "aux_loss_factor", "router_z_loss_factor"):
            _number(self, name, low=0.0)
        if not self.label_smoothing < 1:
            raise ValueError(f"LossConfig.label_smoothing must be in [0, 1), got {self.label_smoothing}")


@dataclasses.dataclass(frozen=True)
class TrainConfig:
    """Everything about a run except the model and the optimizer. Every field is checked on
    construction (type and range), so a bad gin value is a ValueError naming the field.

    ``keep``: newest checkpoints kept (>= 1; None keeps all); ``max_nonfinite_steps``: consecutive
    steps with a non-finite loss or gradient (each skipped, not applied) after which the run stops."""

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
    max_nonfinite_steps: int = 5

    def __post_init__(self):
        for name, low in (("batch_size", 1), ("train_steps", 0), ("microbatches", 1), ("log_every", 1),
                          ("save_every", 1), ("eval_every", 0), ("eval_batches", 1), ("infer_examples", 0),
                          ("seed", 0), ("max_nonfinite_steps", 1)):
            _integer(self, name, low)
        _integer(self, "keep", 1, optional=True, why="None keeps every checkpoint; 0 would delete them all")
        _integer(self, "data_shards", 1, optional=True)
        for name in ("mixture_or_task", "eval_mixture_or_task", "initial_checkpoint", "teacher_checkpoint"):
            v = getattr(self, name)
            if v is not None and not isinstance(v, str):
                raise ValueError(f"TrainConfig.{name} must be a string, got {v!r}")
        if not self.mixture_or_task:
            raise ValueError("TrainConfig.mixture_or_task (MIXTURE_OR_TASK_NAME) is empty")
        lengths = self.task_feature_lengths
        if not isinstance(lengths, dict) or not lengths or any(
                not isinstance(k, str) or isinstance(v, bool) or not isinstance(v, int) or v < 1
                for k, v in lengths.items()):
            raise ValueError(f"TrainConfig.task_feature_lengths (TASK_FEATURE_LENGTHS) must map feature names to "
                             f"lengths >= 1, e.g. {{'inputs': 64, 'targets': 32}}; got {lengths!r}")
        for name in ("mesh_shape", "dcn_mesh_shape"):
            v = getattr(self, name)
            if v is not None and (not isinstance(v, dict) or any(
                    not isinstance(k, str) or isinstance(n, bool) or not isinstance(n, int) or n < 1
                    for k, n in v.items())):
                raise ValueError(f"TrainConfig.{name} must map mesh axis names to sizes >= 1, e.g. "
                                 f"{{'data': 2, 'expert': 4}}; got {v!r}")
        _number(self, "distill_alpha", low=0.0, high=1.0)
        _number(self, "distill_temperature", low=0.0, strict=True)
        _number(self, "bias_update_rate", low=0.0)
        for name in ("upcycle", "init_from_teacher"):
            if not isinstance(getattr(self, name), bool):
                raise ValueError(f"TrainConfig.{name} must be True or False, got {getattr(self, name)!r}")
        if not isinstance(self.freeze, (tuple, list)) or not all(isinstance(f, str) for f in self.freeze):
            raise ValueError(f"TrainConfig.freeze must be a tuple of role names, e.g. ('router',); got {self.freeze!r}")
        if not isinstance(self.loss, LossConfig):
            raise ValueError(f"TrainConfig.loss must be a LossConfig, got {self.loss!r}")


def _integer(cfg, name: str, low: int, optional: bool = False, why: str = "") -> None:
    v = getattr(cfg, name)
    if optional and v is None:
        return
    if isinstance(v, bool) or not isinstance(v, int) or v < low:
        raise ValueError(f"{type(cfg).__name__}.{name} must be an integer >= {low}"
                         f"{' or None' if optional else ''}, got {v!r}" + (f" ({why})" if why else ""))


def _number(cfg, name: str, low: float | None = None, high: float | None = None, strict: bool = False) -> None:
    v = getattr(cfg, name)
    ok = not isinstance(v, bool) and isinstance(v, (int, float)) and v == v
    if ok and low is not None:
        ok = v > low if strict else v >= low
    if ok and high is not None:
        ok = v <= high
    if not ok:
        rng = (f" {'>' if strict else '>='} {low}" if low is not None else "") + (
            f" and <= {high}" if high is not None else "")
        raise ValueError(f"{type(cfg).__name__}.{name} must be a number{rng}, got {v!r}")
