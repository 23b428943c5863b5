"""Tasks over the embedded synthetic corpus (pretraining, single tasks, multi-task, instructions)."""

from __future__ import annotations

import functools

import seqio
import tensorflow as tf

from moejax.data import corpus, metrics, preprocessors
from moejax.tasks.common import TEXT_METRICS, add_mixture, add_task, features

SIZES = {"train": 20000, "validation": 256, "test": 256}
TASK_SIZES = {"train": 4000, "validation": 64, "test": 64}
UL2_DENOISERS = ((3, 0.15), (8, 0.15), (3, 0.5), (8, 0.5), (64, 0.5))


def _docs_fn(split, shuffle_files=False, seed=None):
    del shuffle_files, seed
    docs = corpus.documents(split, SIZES[split])
    return tf.data.Dataset.from_tensor_slices({"text": [d["text"] for d in docs],
                                               "domain": [d["domain"] for d in docs]})


def _task_fn(split, shuffle_files=False, seed=None, task="copy", instruct=False):
    del shuffle_files, seed
    exs = corpus.task_examples(task, split, TASK_SIZES[split])
    r = corpus._rng("instruct", task, split)
    if instruct:
        inputs = [corpus.instruction(task, e["inputs"], r, held_out=split != "train") for e in exs]
    else:
        inputs = [f"{task}: {e['inputs']}" for e in exs]
    return tf.data.Dataset.from_tensor_slices({"inputs": inputs, "targets": [e["targets"] for e in exs]})


def register_synthetic_tasks() -> None:
    docs = seqio.FunctionDataSource(_docs_fn, splits=list(SIZES))
    lm_pre = [preprocessors.text_to_targets, seqio.preprocessors.tokenize]
    add_task("corpus_span_corruption", source=docs, output_features=features(),
             preprocessors=lm_pre + [preprocessors.span_corruption, seqio.preprocessors.append_eos_after_trim])
    add_task("corpus_lm", source=docs, output_features=features(inputs=False),
             preprocessors=lm_pre + [seqio.preprocessors.append_eos_after_trim])
    add_task("corpus_prefix_lm", source=docs, output_features=features(),
             preprocessors=lm_pre + [preprocessors.prefix_lm, seqio.preprocessors.append_eos_after_trim])
    ul2 = [("corpus_prefix_lm", 0.5)]
    for mu, r in UL2_DENOISERS:
        name = f"corpus_ul2_sc_{mu}_{int(r * 100)}"
        sc = functools.partial(preprocessors.span_corruption, density=r, mean_span=float(mu),
                               salt=mu * 100 + int(r * 100))
        add_task(name, source=docs, output_features=features(),
                 preprocessors=lm_pre + [sc, seqio.preprocessors.append_eos_after_trim])
        ul2.append((name, 0.1))
    add_mixture("corpus_ul2", ul2)

    singles, instructs = [], []
    for t in corpus.TASKS:
        task_metrics = TEXT_METRICS + ([metrics.bleu] if t == "translate" else [])
        pre = [seqio.preprocessors.tokenize, seqio.preprocessors.append_eos_after_trim]
        for instruct, name in ((False, f"synth_{t}"), (True, f"synth_instruct_{t}")):
            src = seqio.FunctionDataSource(functools.partial(_task_fn, task=t, instruct=instruct),
                                           splits=list(TASK_SIZES))
            add_task(name, source=src, output_features=features(), preprocessors=pre, metric_fns=task_metrics)
        singles.append(f"synth_{t}")
        instructs.append(f"synth_instruct_{t}")
    add_mixture("synth_multitask", [(n, 1.0) for n in singles])
    add_mixture("synth_instruct", [(n, 1.0) for n in instructs])
