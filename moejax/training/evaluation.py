"""seqio-style evaluation: teacher-forced loss on the validation split, plus decoding each task's
validation examples (greedy, KV cache) and scoring them with the task's metric functions.

Results go to ``<model_dir>/eval`` (TensorBoard), ``eval_metrics.jsonl`` and are returned as
``{'<task>/<metric>': value}``.
"""

from __future__ import annotations

import os

import jax
import numpy as np
import seqio

from moejax.data import batches as data
from moejax.distributed import replicated, to_host
from moejax.inference.decode import generate, generate_encdec
from moejax.models.config import EncDecConfig, routes_by_task
from moejax.training.writers import MetricWriter, read_jsonl


def tasks_of(name: str) -> list[seqio.Task]:
    provider = data.get_provider(name)
    return list(provider.tasks) if isinstance(provider, seqio.Mixture) else [provider]


def _pad(rows, length, left=False):
    out = np.zeros((len(rows), length), np.int32)
    for i, r in enumerate(rows):
        r = np.asarray(r[:length])
        if left:
            out[i, length - len(r):] = r
        else:
            out[i, :len(r)] = r
    return out


def _cut(ids, eos: int):
    """``ids`` up to (not including) the first ``eos``."""
    ids = list(np.asarray(ids))
    return ids[:ids.index(eos)] if eos in ids else ids


def predict_task(fns, params, model_cfg, task: seqio.Task, cfg, split: str, max_examples: int,
                 task_id: int | None = None) -> list[dict]:
    """Greedy predictions for up to ``max_examples`` of ``task``'s ``split``: rows with ``inputs``,
    ``target`` and ``prediction`` strings. ``task_id``: the task's index for task-level routing.

    Encoder-decoder decoding starts from the model's ``decoder_start_id`` (T5 0, NLLB 2); targets
    and predictions end at the task vocabulary's ``eos_id``."""
    lengths = {k: int(v) for k, v in cfg.task_feature_lengths.items() if k in task.output_features}
    if "inputs" not in lengths:
        return []
    ds = task.get_dataset(lengths, split=split, shuffle=False, num_epochs=1).take(max_examples)
    exs = list(ds.as_numpy_iterator())
    if not exs:
        return []
    vocab = task.output_features["targets"].vocabulary
    model = fns.model(params)
    n_new = lengths["targets"]
    rows = []
    bs = max(cfg.batch_size, 1)
    with jax.set_mesh(fns.mesh):
        for i in range(0, len(exs), bs):
            chunk = exs[i:i + bs]
            real = len(chunk)
            chunk = chunk + [chunk[-1]] * (bs - real)          # static batch shape
            # every process decodes the same examples: inputs are replicated global arrays
            tids = None if task_id is None else replicated(np.full((bs,), task_id, np.int32), fns.mesh)
            if isinstance(model_cfg, EncDecConfig):
                enc = replicated(_pad([e["inputs"] for e in chunk], lengths["inputs"]), fns.mesh)
                out = generate_encdec(model, enc, n_new, start_id=model_cfg.decoder_start_id, encoder_mask=enc > 0,
                                      task_ids=tids)
            else:
                prompt = replicated(_pad([e["inputs"] for e in chunk], lengths["inputs"], left=True), fns.mesh)
                out = generate(model, prompt, n_new, prompt_mask=prompt > 0, task_ids=tids)[:, prompt.shape[1]:]
            out = to_host(out)
            for e, o in zip(chunk[:real], out[:real]):
                rows.append({"inputs": e["inputs_pretokenized"].decode() if "inputs_pretokenized" in e else "",
                             "target": e["targets_pretokenized"].decode() if "targets_pretokenized" in e
                             else vocab.decode(_cut(e["targets"], vocab.eos_id)),
                             "prediction": vocab.decode([int(t) for t in _cut(o, vocab.eos_id)])})
    return rows


def has_eval(model_dir: str, step: int) -> bool:
    """Whether ``model_dir``'s ``eval_metrics.jsonl`` has a record of ``step``."""
    path = os.path.join(model_dir, "eval_metrics.jsonl")
    return os.path.exists(path) and any(r["step"] == step for r in read_jsonl(path))


def evaluate(model_dir: str, fns, params, model_cfg, cfg, step: int) -> dict:
    """Eval loss over ``cfg.eval_batches`` validation batches and every task's metrics."""
    name = cfg.eval_mixture_or_task or cfg.mixture_or_task
    results = {}
    routed = routes_by_task(model_cfg)
    ds = data.dataset(name, cfg.task_feature_lengths, cfg.batch_size,
                      encoder_decoder=isinstance(model_cfg, EncDecConfig), split="validation", shuffle=False,
                      repeat=True, seed=cfg.seed,
                      with_task_ids=routed, data_shards=getattr(cfg, "data_shards", None)).take(cfg.eval_batches)
    losses = []
    with jax.set_mesh(fns.mesh):
        for batch in ds.as_numpy_iterator():
            m = fns.eval_step(params, data.to_global(batch, fns.mesh, fns.rules))
            losses.append({k: float(to_host(v)) for k, v in m.items() if np.ndim(v) == 0})
    for k in ("loss", "cross_entropy", "accuracy", "tokens_dropped_fraction"):
        if losses:
            results[f"eval/{k}"] = float(np.mean([m[k] for m in losses]))
    ids = data.task_names(name)
    for task in tasks_of(name):
        if not task.metric_fns:
            continue
        rows = predict_task(fns, params, model_cfg, task, cfg, "validation", cfg.infer_examples,
                            ids.index(task.name) if routed else None)
        if not rows:
            continue
        tgts, preds = [r["target"] for r in rows], [r["prediction"] for r in rows]
        for fn in task.metric_fns:
            for k, v in fn(tgts, preds).items():
                results[f"{task.name}/{k}"] = float(v)
    writer = MetricWriter(model_dir, "eval")
    writer.write(step, results)
    writer.close()
    print(f"eval at step {step}: " + ", ".join(f"{k}={v:.4g}" for k, v in sorted(results.items())))
    return results
