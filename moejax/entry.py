"""gin-configurable entry points (the edge where gin meets the plain-Python library).

The run files in ``gin/runs`` bind :func:`run` and the configurables registered here
(``TrainConfig``, ``LossConfig``, ``optimizer``); the model files in ``gin/models`` set ``MODEL``.
Required macros (``MODEL_DIR``, ``MIXTURE_OR_TASK_NAME``, ...) are ``%gin.REQUIRED`` in the run
files; :func:`check_required_macros` names every one left unset.
"""

from __future__ import annotations

import dataclasses
import os
from pathlib import Path

import gin
from moejax.models.config import override, with_dtypes
from moejax.models.registry import get_config
from moejax.training.config import LossConfig, TrainConfig
from moejax.training.optim import make_optimizer
from moejax.training.trainer import run_eval, run_infer, train

REQUIRED_MACROS = ("MODEL_DIR", "MODEL", "MIXTURE_OR_TASK_NAME", "TASK_FEATURE_LENGTHS", "TRAIN_STEPS",
                   "INITIAL_CHECKPOINT_PATH", "TEACHER_CHECKPOINT")

gin.external_configurable(TrainConfig, module="moejax")
gin.external_configurable(LossConfig, module="moejax")
gin.external_configurable(make_optimizer, name="optimizer", module="moejax")


def shipped_gin_dir() -> str:
    """The directory holding the shipped ``models/``, ``runs/`` and ``mesh/`` gin files."""
    here = Path(__file__).resolve().parent
    for cand in (here / "gin", here.parent / "gin"):
        if (cand / "runs").is_dir():
            return str(cand)
    raise FileNotFoundError("moejax's gin files were not found next to the package")


def check_required_macros() -> None:
    """Raise a ValueError naming every required macro that is still ``%gin.REQUIRED``."""
    missing = []
    for name in REQUIRED_MACROS:
        try:
            value = gin.query_parameter(f"{name}/macro.value")
        except ValueError as e:
            if "REQUIRED" in str(e):
                missing.append(name)
            elif name in ("MODEL", "MODEL_DIR"):       # referenced by every run: must be defined
                missing.append(name + (" (load a models/*.gin file)" if name == "MODEL" else ""))
            continue
        if value is gin.REQUIRED or repr(value) == "%gin.REQUIRED":
            missing.append(name)
    if missing:
        flags = " ".join(f"--gin.{m}=..." for m in missing)
        raise ValueError(f"required gin macros not set: {', '.join(missing)} (pass e.g. {flags})")


@gin.configurable(module="moejax")
def model_config(name: str = gin.REQUIRED, overrides: dict | None = None, vocab_from_task: str | None = None):
    """The registered config ``name`` with ``overrides`` (field names or dotted paths such as
    ``{'moe.expert_dropout': 0.2}``, :func:`moejax.models.config.override`); ``vocab_from_task``
    sets ``vocab_size`` to that task's vocabulary size (rounded up to a multiple of 128) for the tiny
    configs."""
    overrides = dict(overrides or {})
    if vocab_from_task:
        from moejax.data.batches import get_provider

        size = get_provider(vocab_from_task).output_features["targets"].vocabulary.vocab_size
        overrides.setdefault("vocab_size", -(-size // 128) * 128)
    return get_config(name, **overrides)


def register_text_files_macro() -> None:
    """Register the ``TEXT_FILES`` tasks before the run's arguments are evaluated (the model's
    ``vocab_from_task`` may already name ``text_files_span_corruption``). The CLI calls it after
    parsing; :func:`run` registers them again from its ``text_files`` argument (idempotent)."""
    try:
        patterns = gin.query_parameter("TEXT_FILES/macro.value")
    except ValueError:
        return
    if patterns is not None:
        from moejax.tasks import register_text_files

        register_text_files(patterns)


@gin.configurable(module="moejax")
def checkpoint_config(path: str = gin.REQUIRED):
    """The model config stored in the moejax checkpoint at ``path`` (``MODEL = @moejax.checkpoint_config()``
    trains or evaluates the model a checkpoint holds, e.g. a ``moejax merge`` output)."""
    from moejax.checkpoint import read_config

    if not isinstance(path, str) or not path:
        raise ValueError(f"moejax.checkpoint_config.path must be a checkpoint directory, got {path!r}")
    return read_config(os.path.expanduser(path))


@gin.configurable(module="moejax")
def run(mode: str, model_dir: str = gin.REQUIRED, model=gin.REQUIRED, train_config: TrainConfig = gin.REQUIRED,
        optimizer=None, checkpoint: str | None = None, compute_dtype: str | None = None,
        expert_dropout: float | None = None, remat: str | None = None, param_dtype: str | None = None,
        text_files=None, on_start=None):
    """``mode``: ``train`` / ``eval`` / ``infer``. ``model`` is a config (``@moejax.model_config()``);
    ``compute_dtype='bfloat16'`` computes in bf16 with float32 params; ``expert_dropout`` sets the
    MoE layers' dropout on the expert hidden layer (finetuning); ``remat`` the scanned blocks'
    rematerialisation policy (:mod:`moejax.models.remat`); ``param_dtype='bfloat16'`` stores the
    params in bf16 (pair it with ``moejax.optimizer.master_weights = True`` for an f32 master copy);
    ``text_files``: a glob or list of globs of the user's text (``TEXT_FILES``), registered as the tasks
    ``text_files_span_corruption`` and ``text_files_lm`` (``moejax.tasks.register_text_files``).
    ``on_start()`` runs once the run is accepted (the CLI writes ``config.gin`` there)."""
    if not isinstance(model_dir, str) or not model_dir:
        raise ValueError(f"MODEL_DIR must be a directory path, got {model_dir!r}; pass "
                         "--gin.MODEL_DIR=\"'/path/to/run'\"")
    if not dataclasses.is_dataclass(model) or not hasattr(model, "validate"):
        raise ValueError(f"MODEL must be a model config (e.g. load a models/*.gin file), got {model!r}")
    for name, value in (("COMPUTE_DTYPE", compute_dtype), ("PARAM_DTYPE", param_dtype), ("REMAT", remat),
                        ("CHECKPOINT_PATH", checkpoint)):
        if value is not None and not isinstance(value, str):
            raise ValueError(f"{name} must be a string or None, got {value!r}")
    if text_files is not None:
        from moejax.tasks import register_text_files

        register_text_files(text_files)
    overrides = {}
    if remat is not None:
        overrides["remat"] = remat

    if expert_dropout is not None and model.moe is not None:
        overrides["moe.expert_dropout"] = float(expert_dropout)
    model = override(with_dtypes(model, dtype=compute_dtype or None, param_dtype=param_dtype or None),
                     overrides).validate()
    model_dir = os.path.abspath(os.path.expanduser(model_dir))
    if mode == "train":
        return train(model_dir, model, train_config, optimizer, on_start=on_start)
    if mode == "eval":
        return run_eval(model_dir, model, train_config, checkpoint, on_start=on_start)
    if mode == "infer":
        return run_infer(model_dir, model, train_config, checkpoint, on_start=on_start)
    raise ValueError(f"unknown mode {mode!r}; valid: train, eval, infer")
