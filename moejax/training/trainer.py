"""The train / eval / infer loops (plain Python; the gin entry points in ``moejax.main`` call them).

``train(...)`` builds the sharded train state (or resumes from ``MODEL_DIR``'s latest checkpoint, or
starts from ``initial_checkpoint`` params), streams seqio batches onto the mesh, runs the jitted
step, logs metrics every ``log_every`` steps (tqdm + TensorBoard + JSON lines), evaluates every
``eval_every`` steps and at the end, and saves every ``save_every`` steps and at the end.
"""

from __future__ import annotations

import json
import os
import time

import jax
import numpy as np
from flax import nnx
from tqdm import tqdm

import moejax.tasks  # noqa: F401  (registers the shipped seqio tasks and mixtures)
from moejax.checkpoint import Checkpointer, load, load_params
from moejax.data import batches as data
from moejax.distributed import is_primary, to_host
from moejax.mesh import create_mesh, global_shape
from moejax.models.config import EncDecConfig, routes_by_task
from moejax.sharding import DEFAULT_RULES
from moejax.training import evaluation
from moejax.training.checkpoints import check_model_dir
from moejax.training.config import LossConfig, TrainConfig
from moejax.training.distill import init_student_from_teacher
from moejax.training.flops import device_peak_flops, mfu, train_step_flops
from moejax.training.optim import make_optimizer
from moejax.training.state import StepFns
from moejax.training.upcycle import upcycle_params
from moejax.training.writers import MetricWriter

__all__ = ["LossConfig", "TrainConfig", "load_for_eval", "make_run_mesh", "run_eval", "run_infer", "train"]


def make_run_mesh(shape, dcn_shape=None):
    """The run's mesh (``moejax.mesh.create_mesh``): over all devices, or in a single process over
    the first N when the shape's N divides the device count."""
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


def train(model_dir: str, model_cfg, cfg: TrainConfig, optimizer=None, rules=DEFAULT_RULES, progress: bool = True):
    """Train ``model_cfg`` on ``cfg.mixture_or_task`` into ``model_dir``; returns the final train
    state. Re-running the same command resumes from the latest checkpoint."""
    if not model_dir:
        raise ValueError("MODEL_DIR is required (e.g. --gin.MODEL_DIR=\"'/tmp/run'\")")
    optimizer = optimizer or make_optimizer()
    if cfg.train_steps < 1:
        raise ValueError(f"train_steps must be >= 1, got {cfg.train_steps}")
    mesh = make_run_mesh(cfg.mesh_shape, cfg.dcn_mesh_shape)
    enc_dec = isinstance(model_cfg, EncDecConfig)
    data.get_provider(cfg.mixture_or_task)          # fail fast on a name typo
    data.check_truncation(cfg.mixture_or_task, cfg.task_feature_lengths)
    check_model_dir(model_dir, model_cfg)
    teacher = _load_teacher(cfg.teacher_checkpoint, mesh, rules) if cfg.teacher_checkpoint else None
    fns = StepFns(model_cfg, optimizer.tx, mesh, loss=cfg.loss, microbatches=cfg.microbatches, seed=cfg.seed,
                  freeze=tuple(cfg.freeze), rules=rules, teacher=teacher, distill_alpha=cfg.distill_alpha,
                  distill_temperature=cfg.distill_temperature, bias_update_rate=cfg.bias_update_rate)
    ckpt = Checkpointer(model_dir, keep=cfg.keep)
    latest = ckpt.latest_step()
    if latest is not None:
        state = ckpt.restore(fns.abstract_state())
        print(f"resumed from {ckpt.directory} at step {latest}")
    elif cfg.initial_checkpoint and cfg.upcycle:
        dense = load(cfg.initial_checkpoint)
        if dense.cfg.moe is not None:
            raise ValueError(f"{cfg.initial_checkpoint!r} holds an MoE model; sparse upcycling starts from a dense one")
        state = fns.init()
        state = fns.from_params(upcycle_params(nnx.state(dense, nnx.Param), state.params, model_cfg))
        print(f"upcycled the dense {type(dense.cfg).__name__} at {cfg.initial_checkpoint} into an MoE model")
    elif cfg.initial_checkpoint:
        state = fns.from_params(_initial_params(cfg.initial_checkpoint, fns, model_cfg))
        print(f"initialised params from {cfg.initial_checkpoint} (optimizer reset)")
    elif teacher is not None and cfg.init_from_teacher:
        params, copied, total = init_student_from_teacher(fns.init().params, nnx.state(teacher, nnx.Param))
        state = fns.from_params(params)
        print(f"student initialised from the teacher's non-expert weights ({copied:.0f} of {total} tensors)")
    else:
        state = fns.init()
    start = int(state.step)
    writer = MetricWriter(model_dir, "train")
    ds = data.dataset(cfg.mixture_or_task, cfg.task_feature_lengths, cfg.batch_size, encoder_decoder=enc_dec,
                      seed=cfg.seed, start_step=start, with_task_ids=routes_by_task(model_cfg),
                      data_shards=cfg.data_shards)
    it = ds.as_numpy_iterator()
    bar = tqdm(total=cfg.train_steps, initial=start, disable=not (progress and is_primary()), desc="train",
               dynamic_ncols=True)
    step_flops = train_step_flops(model_cfg, cfg.batch_size, cfg.task_feature_lengths)
    peak, _ = device_peak_flops()
    window, t0, tokens = [], time.time(), 0
    try:
        for step in range(start, cfg.train_steps):
            batch = next(it)
            tokens += int(np.sum(batch["decoder_target_tokens"] > 0)) + int(
                np.sum(batch.get("encoder_input_tokens", np.zeros(1)) > 0))
            with jax.set_mesh(mesh):
                state, metrics = fns.train_step(state, data.to_global(batch, mesh, rules))
            window.append(metrics)
            done = step + 1
            if done % cfg.log_every == 0 or done == cfg.train_steps:
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
                window, t0, tokens = [], time.time(), 0
            bar.update(1)
            if done % cfg.save_every == 0 and done != cfg.train_steps:
                ckpt.save(state)
            if cfg.eval_every and done % cfg.eval_every == 0 and done != cfg.train_steps:
                evaluation.evaluate(model_dir, fns, state.params, model_cfg, cfg, int(done))
        ckpt.save(state)
        ckpt.wait()
        if start < cfg.train_steps:
            evaluation.evaluate(model_dir, fns, state.params, model_cfg, cfg, cfg.train_steps)
    finally:
        bar.close()
        writer.close()
        ckpt.close()
    return state


def _initial_params(path: str, fns: StepFns, model_cfg):
    """Params (only) to start a run from: any moejax checkpoint of the same architecture."""
    try:
        return load_params(path, fns.abstract_state().params, expect=model_cfg)
    except ValueError as e:
        raise ValueError(f"INITIAL_CHECKPOINT_PATH: {e}") from None


def _load_teacher(path: str, mesh, rules):
    """The trained teacher model from ``path``, its params read straight into their shardings."""
    return load(path, mesh, rules=rules)


def load_for_eval(model_dir: str, model_cfg, cfg: TrainConfig, checkpoint: str | None = None):
    """``(StepFns, params, step)`` from ``model_dir``'s latest checkpoint or from ``checkpoint``."""
    import optax

    mesh = make_run_mesh(cfg.mesh_shape, cfg.dcn_mesh_shape)
    fns = StepFns(model_cfg, optax.identity(), mesh, loss=cfg.loss, seed=cfg.seed)
    if checkpoint:
        return fns, load_params(checkpoint, fns.abstract_state().params, expect=model_cfg), 0
    ckpt = Checkpointer(model_dir)
    step = ckpt.latest_step()
    ckpt.close()
    if step is None:
        raise ValueError(f"MODEL_DIR {model_dir!r} has no checkpoint to evaluate; train first or pass a checkpoint")
    return fns, load_params(model_dir, fns.abstract_state().params, expect=model_cfg), step


def run_eval(model_dir: str, model_cfg, cfg: TrainConfig, checkpoint: str | None = None) -> dict:
    fns, params, step = load_for_eval(model_dir, model_cfg, cfg, checkpoint)
    return evaluation.evaluate(model_dir, fns, params, model_cfg, cfg, step)


def run_infer(model_dir: str, model_cfg, cfg: TrainConfig, checkpoint: str | None = None,
              split: str = "validation", output: str | None = None) -> str:
    fns, params, step = load_for_eval(model_dir, model_cfg, cfg, checkpoint)
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

