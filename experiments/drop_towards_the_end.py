"""Claim (OpenMoE, Xue et al. 2024): with capacity filled in sequence order, tokens late in a
sequence are dropped more ("drop towards the end"), and more so on out-of-domain data, because
routing learned in pretraining is imbalanced there. Setup: a tiny OpenMoE-style decoder (MoE every
2nd layer + residual MLP, top-2, each sequence one group) trained 300 steps on the corpus LM task;
evaluated at capacity factor 1.0 on packed 64-token rows (no padding) of in-domain validation
documents and of out-of-domain text (the instruction tasks' prompts and targets: word lists,
numbers, Lumi). Output: drop rate by position."""

from __future__ import annotations

import random
import sys

import jax.numpy as jnp
import matplotlib.pyplot as plt
import numpy as np
from common import run, save_plot, save_table, tiny

import moejax.tasks  # noqa: F401  (registers the shipped seqio tasks)
from moejax import load
from moejax.data import corpus
from moejax.data.vocab import get_vocabulary

STEPS = int(sys.argv[1]) if len(sys.argv) > 1 else 300
LEN = 64


def packed(texts, n_rows):
    """Token stream of ``texts`` cut into full ``[n_rows, LEN]`` rows (no padding: every position real)."""
    vocab = get_vocabulary("spm")
    stream = []
    for t in texts:
        stream += vocab.encode(t) + [1]
        if len(stream) >= n_rows * LEN:
            break
    return jnp.asarray(np.asarray(stream[:n_rows * LEN], np.int32).reshape(n_rows, LEN))


def drop_curve(model, ids):
    _, aux = model(ids)
    return np.asarray(aux.moe.dropped_by_position).mean(0)


def main():
    cfg = tiny("tiny_openmoe", sequence_groups=True, capacity_factor_eval=1.0)
    _, _, d = run(cfg, STEPS, task="corpus_lm", lr=0.05)
    model = load(d)
    docs = [d["text"] for d in corpus.documents("validation", 400)]
    tasks = [corpus.instruction(t, e["inputs"], random.Random(0), True) + " " + e["targets"]
             for t in corpus.TASKS for e in corpus.task_examples(t, "validation", 64)]
    random.Random(0).shuffle(tasks)
    ind = drop_curve(model, packed(docs, 128))
    ood = drop_curve(model, packed(tasks, 128))
    fig, ax = plt.subplots(figsize=(7, 3.5))
    ax.plot(ind, label="in-domain (corpus)")
    ax.plot(ood, label="out-of-domain (instruction tasks)")
    ax.set(xlabel="position in sequence", ylabel="fraction of assignments dropped", title="drop towards the end")
    ax.legend()
    save_plot(fig, "drop_towards_the_end.png")
    q = lambda c, a, b: f"{100 * float(np.mean(c[a:b])):.1f}%"
    rows = [[name, q(c, 0, 16), q(c, 16, 32), q(c, 32, 48), q(c, 48, 64)] for name, c in
            (("in-domain", ind), ("out-of-domain", ood))]
    save_table("drop_towards_the_end.md", ["data", "positions 0-15", "16-31", "32-47", "48-63"], rows,
               f"tiny OpenMoE-style decoder, {STEPS} steps on corpus_lm, eval capacity factor 1.0, sequence groups.")


if __name__ == "__main__":
    main()
