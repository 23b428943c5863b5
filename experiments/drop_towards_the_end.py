"""Claim (OpenMoE, Xue et al. 2024): with capacity filled in sequence order, tokens late in a
sequence are dropped more ("drop towards the end"), and more so on out-of-domain data, because
routing learned in pretraining is imbalanced there. Setup: a tiny OpenMoE-style decoder (MoE every
2nd layer + residual MLP, top-2, each sequence one group) trained 300 steps on the corpus LM task;
evaluated at capacity factor 1.0 on in-domain validation text and on out-of-domain text (the
instruction tasks' prompts and targets: word lists, numbers, Lumi). Output: drop rate by position."""

from __future__ import annotations

import sys

import jax
import jax.numpy as jnp
import matplotlib.pyplot as plt
import numpy as np

from common import run, save_plot, save_table, tiny
from moejax.data import batches
from moejax.training.checkpoints import load_model

STEPS = int(sys.argv[1]) if len(sys.argv) > 1 else 300
LEN = 64


def drop_curve(model, task, n=8):
    ds = batches.dataset(task, {"inputs": LEN // 2, "targets": LEN // 2} if task != "corpus_lm" else {"targets": LEN},
                         32, encoder_decoder=False, split="validation", shuffle=False, repeat=True)
    curves = []
    for b in ds.take(n).as_numpy_iterator():
        ids = jnp.asarray(b["decoder_input_tokens"])
        _, aux = model(ids, padding_mask=jnp.asarray(b["decoder_target_tokens"]) > 0)
        curves.append(np.asarray(aux.moe.dropped_by_position).mean(0))
    return np.mean(curves, 0)


def main():
    cfg = tiny("tiny_openmoe", sequence_groups=True, capacity_factor_eval=1.0)
    _, _, d = run(cfg, STEPS, task="corpus_lm", lr=0.05)
    model = load_model(d)
    ind = drop_curve(model, "corpus_lm")
    ood = drop_curve(model, "synth_instruct")
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
    del jax


if __name__ == "__main__":
    main()
