"""The train / eval / infer loops (plain Python; the gin entry points in ``moejax.main`` call them).

``train(...)`` builds the sharded train state (or resumes from ``MODEL_DIR``'s latest checkpoint, or
starts from ``initial_checkpoint`` params), streams seqio batches onto the mesh, runs the jitted
step, logs metrics every ``log_every`` steps (tqdm + TensorBoard + JSON lines), evaluates every
``eval_every`` steps and at the end, and saves every ``save_every`` steps and at the end.
"""

from __future__ import annotations

import contextlib
import gc
import json
import os
import time
from collections.abc import Callable

import jax
import numpy as np
from flax import nnx
from tqdm import tqdm

import moejax.tasks  # noqa: F401  (registers the shipped seqio tasks and mixtures)
from moejax.checkpoint import Checkpointer, CheckpointMismatch, load, load_params
from moejax.data import batches as data
from moejax.distributed import is_primary, to_host
from moejax.mesh import create_mesh, global_shape
from moejax.models.config import EncDecConfig, routes_by_task
from moejax.sharding import DEFAULT_RULES, check_mesh_axes
from moejax.training import evaluation
from moejax.training.checkpoints import check_model_dir
from moejax.training.config import LossConfig, TrainConfig
from moejax.training.distill import init_student_from_teacher
from moejax.training.faults import NonFiniteError, NonFiniteGuard, Preempted, Preemption, nonfinite_leaves
from moejax.training.flops import device_peak_flops, mfu, train_step_flops
from moejax.training.lock import RunLock
from moejax.training.optim import make_optimizer
from moejax.training.state import StepFns
from moejax.training.upcycle import upcycle_params
from moejax.training.writers import MetricWriter

__all__ = ["LossConfig", "TrainConfig", "load_for_eval", "make_run_mesh", "run_eval", "run_infer", "train"]


def make_run_mesh(shape, dcn_shape=None, rules=DEFAULT_RULES):
    """The run's mesh (``moejax.mesh.create_mesh``): over all devices, or in a single process over
    the first N when the shape's N divides the device count. Every axis name must be one the logical
    axis ``rules`` use (a misspelt axis would otherwise replicate everything over it)."""
    check_mesh_axes({**dict(shape or {}), **dict(dcn_shape or {})}, rules)
    slices = int(np.prod([int(v) for v in (dcn_shape or {}).values()]))
    shape = dict(shape or {"data": jax.device_count() // slices})
    n, have = int(np.prod(list(global_shape(shape, dcn_shape).values()))), jax.device_count()
    if n < 1 or have % n or (n != have and jax.process_count() > 1):
        what = f"{shape} x dcn {dcn_shape}" if dcn_shape else f"{shape}"
        raise ValueError(f"mesh {what} needs {n} devices, which does not divide the {have} devices available"
                         + (f" (a {jax.process_count()}-process run must use all of them)"
                            if jax.process_count() > 1 else ""))
    return create_mesh(shape, dcn_shape, jax.devices()[:n])


def _host(metrics: dict) -> dict:
    return {k: to_host(v) for k, v in metrics.items()}


def train(model_dir: str, model_cfg, cfg: TrainConfig, optimizer=None, rules=DEFAULT_RULES, progress: bool = True,
          on_start: Callable[[], None] | None = None):
    """Train ``model_cfg`` on ``cfg.mixture_or_task`` into ``model_dir``; returns the final train
    state. Re-running the same command resumes from the newest intact checkpoint (and runs the final
    evaluation if a previous run was stopped during it). ``on_start`` is called once the run is
    accepted (lock taken, model and checkpoints checked), before the first step: the gin entry
    point writes ``config.gin`` there.

    Faults (:mod:`moejax.training.faults`): a non-finite step is not applied and the run stops with
    :class:`NonFiniteError` after ``cfg.max_nonfinite_steps`` in a row; SIGTERM saves the current
    step and raises :class:`Preempted`; a second trainer on ``model_dir`` is refused
    (:mod:`moejax.training.lock`)."""
    if not model_dir:
        raise ValueError("MODEL_DIR is required (e.g. --gin.MODEL_DIR=\"'/tmp/run'\")")
    optimizer = optimizer or make_optimizer()
    if cfg.train_steps < 1:
        raise ValueError(f"train_steps (TRAIN_STEPS) must be >= 1 to train, got {cfg.train_steps}")
    if model_cfg.moe is not None and model_cfg.moe.quant_bits is not None:
        raise ValueError(f"the model's experts are quantized (int{model_cfg.moe.quant_bits}, moejax quantize): "
                         "quantized models are for eval / infer, not training; train the unquantized model")
    mesh = make_run_mesh(cfg.mesh_shape, cfg.dcn_mesh_shape, rules)
    data.get_provider(cfg.mixture_or_task)          # fail fast on a name typo
    data.check_truncation(cfg.mixture_or_task, cfg.task_feature_lengths)
    data.check_batch_size(cfg.batch_size, mesh, rules, cfg.microbatches)
    with RunLock(model_dir) if is_primary() else contextlib.nullcontext():
        return _train(model_dir, model_cfg, cfg, optimizer, rules, progress, on_start, mesh)


def _train(model_dir, model_cfg, cfg: TrainConfig, optimizer, rules, progress, on_start, mesh):
    enc_dec = isinstance(model_cfg, EncDecConfig)
    check_model_dir(model_dir, model_cfg)
    teacher = _load_teacher(cfg.teacher_checkpoint, mesh, rules) if cfg.teacher_checkpoint else None
    fns = StepFns(model_cfg, optimizer.tx, mesh, loss=cfg.loss, microbatches=cfg.microbatches, seed=cfg.seed,
                  freeze=tuple(cfg.freeze), rules=rules, teacher=teacher, distill_alpha=cfg.distill_alpha,
                  distill_temperature=cfg.distill_temperature, bias_update_rate=cfg.bias_update_rate)
    ckpt = Checkpointer(model_dir, keep=cfg.keep)
    try:
        state = _start_state(ckpt, fns, cfg, model_cfg, teacher)
        start = int(state.step)
        if start > cfg.train_steps:
            raise ValueError(f"MODEL_DIR {model_dir!r} is already at step {start}, past TRAIN_STEPS="
                             f"{cfg.train_steps}; raise TRAIN_STEPS to train further (eval / infer read it as is)")
        if on_start is not None:
            on_start()
        if start == cfg.train_steps:
            print(f"{model_dir} is already trained to step {start} (TRAIN_STEPS)")
            if not evaluation.has_eval(model_dir, start):   # a previous run was stopped in its final eval
                evaluation.evaluate(model_dir, fns, state.params, model_cfg, cfg, start)
            return state
        ds = data.dataset(cfg.mixture_or_task, cfg.task_feature_lengths, cfg.batch_size, encoder_decoder=enc_dec,
                          seed=cfg.seed, start_step=start, with_task_ids=routes_by_task(model_cfg),
                          data_shards=cfg.data_shards)
        it = ds.as_numpy_iterator()
        try:
            state = _loop(state, it, fns, ckpt, mesh, rules, model_dir, model_cfg, cfg, optimizer, progress)
        finally:
            # drop the tf.data iterator here, not in the interpreter's final GC (where its destructor
            # can block forever after an error)
            del it, ds
            gc.collect()
        ckpt.wait()
        evaluation.evaluate(model_dir, fns, state.params, model_cfg, cfg, cfg.train_steps)
        return state
    finally:
        ckpt.close()


def _start_state(ckpt: Checkpointer, fns: StepFns, cfg: TrainConfig, model_cfg, teacher):
    """Resume (newest intact checkpoint), or the run's initial state."""
    if ckpt.latest_step() is not None:
        state = ckpt.restore_intact(fns.abstract_state(),
                                    check=lambda st: _check_finite(st.params, f"step {int(st.step)}"))
        print(f"resumed from {ckpt.directory} at step {int(state.step)}")
        return state
    if cfg.initial_checkpoint and cfg.upcycle:
        dense = load(cfg.initial_checkpoint)
        if dense.cfg.moe is not None:
            raise ValueError(f"{cfg.initial_checkpoint!r} holds an MoE model; sparse upcycling starts from a dense one")
        state = fns.init()
        state = fns.from_params(upcycle_params(nnx.state(dense, nnx.Param), state.params, model_cfg))
        print(f"upcycled the dense {type(dense.cfg).__name__} at {cfg.initial_checkpoint} into an MoE model")
        return state
    if cfg.initial_checkpoint:
        state = fns.from_params(_initial_params(cfg.initial_checkpoint, fns, model_cfg))
        print(f"initialised params from {cfg.initial_checkpoint} (optimizer reset)")
        return state
    if teacher is not None and cfg.init_from_teacher:
        params, copied, total = init_student_from_teacher(fns.init().params, nnx.state(teacher, nnx.Param))
        print(f"student initialised from the teacher's non-expert weights ({copied:.0f} of {total} tensors)")
        return fns.from_params(params)
    return fns.init()


def _preempt_agreed(preemption: Preemption, done: int, cfg: TrainConfig) -> bool:
    """Whether to stop for SIGTERM after step ``done``: this process's flag, or in a multi-process
    run any process's flag, agreed at the ``log_every`` boundaries (every process stops at the same
    step)."""
    if jax.process_count() == 1:
        return preemption.requested
    if done % cfg.log_every:
        return False
    from jax.experimental import multihost_utils
    return bool(np.any(multihost_utils.process_allgather(np.int32(preemption.requested))))


def _loop(state, it, fns: StepFns, ckpt: Checkpointer, mesh, rules, model_dir, model_cfg, cfg: TrainConfig,
          optimizer, progress):
    start = int(state.step)
    writer = MetricWriter(model_dir, "train")
    bar = tqdm(total=cfg.train_steps, initial=start, disable=not (progress and is_primary()), desc="train",
               dynamic_ncols=True)
    step_flops = train_step_flops(model_cfg, cfg.batch_size, cfg.task_feature_lengths)
    peak, _ = device_peak_flops()
    guard = NonFiniteGuard(cfg.max_nonfinite_steps)

    def save_if_clean(done):
        guard.flush()
        if guard.clean:
            ckpt.save(state)
        else:
            print(f"warning: not saving step {done}: the newest step was non-finite (checkpoint "
                  f"{ckpt.latest_step()} stays the newest)", flush=True)
        return guard.clean

    window, t0, tokens = [], time.time(), 0
    try:
        with Preemption() as preemption:
            for step in range(start, cfg.train_steps):
                batch = next(it)
                tokens += int(np.sum(batch["decoder_target_tokens"] > 0)) + int(
                    np.sum(batch.get("encoder_input_tokens", np.zeros(1)) > 0))
                with jax.set_mesh(mesh):
                    state, metrics = fns.train_step(state, data.to_global(batch, mesh, rules))
                done = step + 1
                guard.push(done, metrics["nonfinite"])
                window.append(metrics)
                if done % cfg.log_every == 0 or done == cfg.train_steps:
                    _log(writer, bar, window, done, t0, tokens, step_flops, peak, mesh, optimizer)
                    window, t0, tokens = [], time.time(), 0
                bar.update(1)
                if _preempt_agreed(preemption, done, cfg):
                    saved = save_if_clean(done)
                    ckpt.wait()
                    raise Preempted(done, ckpt.directory, saved, ckpt.latest_step())
                if done % cfg.save_every == 0 and done != cfg.train_steps:
                    save_if_clean(done)
                if cfg.eval_every and done % cfg.eval_every == 0 and done != cfg.train_steps:
                    evaluation.evaluate(model_dir, fns, state.params, model_cfg, cfg, int(done))
        guard.flush()
        if not guard.clean:
            raise NonFiniteError(f"the last {guard.run} steps (from {guard.first_bad}) had a non-finite loss or "
                                 f"gradient; the final checkpoint was not saved (newest: {ckpt.latest_step()})")
        ckpt.save(state)
    finally:
        bar.close()
        writer.close()
    return state


def _log(writer, bar, window, done, t0, tokens, step_flops, peak, mesh, optimizer) -> None:
    """Write the metrics of the steps in ``window`` (device arrays, read here) as one record."""
    host = [_host(m) for m in window]
    dt = time.time() - t0
    if jax.process_count() > 1:       # every process's real tokens (host values, at log time only)
        from jax.experimental import multihost_utils
        tokens = int(np.sum(multihost_utils.process_allgather(np.int64(tokens))))
    scalars = {k: float(np.mean([h[k] for h in host])) for k in host[-1] if np.ndim(host[-1][k]) == 0}
    scalars.update(steps_per_sec=len(host) / dt, tokens_per_sec=tokens / dt, step_time=dt / len(host))
    scalars.update(mfu=mfu(step_flops, len(host) / dt, mesh.size, peak),
                   model_tflops_per_sec_per_device=step_flops * len(host) / dt / mesh.size / 1e12)
    scalars["learning_rate"] = float(optimizer.schedule(done))
    hist = {"expert_load": np.mean([h["expert_load"] for h in host], axis=0).reshape(-1)} \
        if "expert_load" in host[-1] else {}
    writer.write(done, scalars, hist)
    bar.set_postfix(loss=f"{scalars['loss']:.3f}", acc=f"{scalars['accuracy']:.3f}",
                    drop=f"{scalars['tokens_dropped_fraction']:.3f}")


def _initial_params(path: str, fns: StepFns, model_cfg):
    """Params (only) to start a run from: any moejax checkpoint of the same architecture, finite."""
    try:
        params = load_params(path, fns.abstract_state().params, expect=model_cfg)
    except CheckpointMismatch as e:
        raise ValueError(f"INITIAL_CHECKPOINT_PATH: {e}. To train the model the checkpoint holds (e.g. a "
                         "`moejax merge` output), take MODEL from it: --gin.MODEL=@moejax.checkpoint_config() "
                         "--gin.moejax.checkpoint_config.path=%INITIAL_CHECKPOINT_PATH") from None
    except ValueError as e:
        raise ValueError(f"INITIAL_CHECKPOINT_PATH: {e}") from None
    _check_finite(params, path)
    return params


def _check_finite(params, what: str) -> None:
    bad = nonfinite_leaves(params)
    if bad:
        raise ValueError(f"{what!r} holds non-finite values (NaN / inf) in {len(bad)} parameters, e.g. {bad[0]!r}: "
                         "the checkpoint is damaged")


def _load_teacher(path: str, mesh, rules):
    """The trained teacher model from ``path``, its params read straight into their shardings."""
    return load(path, mesh, rules=rules)


def load_for_eval(model_dir: str, model_cfg, cfg: TrainConfig, checkpoint: str | None = None):
    """``(StepFns, params, step)`` from ``model_dir``'s latest checkpoint or from ``checkpoint``."""
    import optax

    mesh = make_run_mesh(cfg.mesh_shape, cfg.dcn_mesh_shape)
    fns = StepFns(model_cfg, optax.identity(), mesh, loss=cfg.loss, seed=cfg.seed)
    if checkpoint:
        params = load_params(checkpoint, fns.abstract_state().params, expect=model_cfg)
        _check_finite(params, checkpoint)
        return fns, params, 0
    ckpt = Checkpointer(model_dir)
    step = ckpt.latest_step()
    ckpt.close()
    if step is None:
        raise ValueError(f"MODEL_DIR {model_dir!r} has no checkpoint to evaluate; train first or pass a checkpoint")
    params = load_params(model_dir, fns.abstract_state().params, expect=model_cfg)
    _check_finite(params, os.path.join(model_dir, "checkpoints", str(step)))
    return fns, params, step


def run_eval(model_dir: str, model_cfg, cfg: TrainConfig, checkpoint: str | None = None,
             on_start: Callable[[], None] | None = None) -> dict:
    """Evaluate ``model_dir``'s latest checkpoint (or ``checkpoint``); ``on_start`` as in :func:`train`."""
    fns, params, step = load_for_eval(model_dir, model_cfg, cfg, checkpoint)
    if on_start is not None:
        on_start()
    return evaluation.evaluate(model_dir, fns, params, model_cfg, cfg, step)


def run_infer(model_dir: str, model_cfg, cfg: TrainConfig, checkpoint: str | None = None,
              split: str = "validation", output: str | None = None, on_start: Callable[[], None] | None = None) -> str:
    """Write greedy predictions of ``model_dir``'s latest checkpoint (or ``checkpoint``) to
    ``MODEL_DIR/infer/<task>-<step>.jsonl`` (or ``output``)."""
    fns, params, step = load_for_eval(model_dir, model_cfg, cfg, checkpoint)
    if on_start is not None:
        on_start()
    name = cfg.eval_mixture_or_task or cfg.mixture_or_task
    out = output or os.path.join(model_dir, "infer", f"{name}-{step}.jsonl")
    os.makedirs(os.path.dirname(out), exist_ok=True)
    rows = []
    for task in evaluation.tasks_of(name):
        for r in evaluation.predict_task(fns, params, model_cfg, task, cfg, split, cfg.infer_examples):
            rows.append({"task": task.name, **r})
    if is_primary():
        with open(out, "w") as f:
            for r in rows:
                f.write(json.dumps(r) + "\n")
        print(f"wrote {len(rows)} predictions to {out}")
    return out

