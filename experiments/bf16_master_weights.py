"""Claim (mixed-precision training practice, e.g. Micikevicius et al. 2018; T5X / MaxText): bf16
parameters train like float32 when the optimizer keeps a float32 master copy; without it, updates
smaller than bf16's spacing are rounded away. Setup: tiny Switch on the corpus span-corruption task,
AdamW, the same seed and batches, float32 params vs bf16 params with a float32 master copy vs bf16
params alone. Output: train CE curves (plot) and final train / eval CE (table)."""

from __future__ import annotations

import sys

import jax.numpy as jnp
import matplotlib.pyplot as plt
from common import LENGTHS, save_plot, save_table, tiny

from moejax.training.optim import make_optimizer
from moejax.training.trainer import TrainConfig, train
from moejax.training.writers import read_jsonl

STEPS = int(sys.argv[1]) if len(sys.argv) > 1 else 300


def main():
    import os
    import tempfile

    rows = []
    fig, ax = plt.subplots(figsize=(7, 4))
    base = tiny("tiny_switch")
    bf16 = base.replace(param_dtype=jnp.bfloat16, moe=base.moe.replace(param_dtype=jnp.bfloat16))
    for name, cfg, master in (("float32 params", base, False), ("bf16 params + f32 master", bf16, True),
                              ("bf16 params, no master", bf16, False)):
        d = tempfile.mkdtemp(prefix="moejax-exp-")
        tc = TrainConfig(mixture_or_task="corpus_span_corruption", batch_size=32, train_steps=STEPS, log_every=5,
                         mesh_shape={"data": 1}, eval_batches=8, infer_examples=0, task_feature_lengths=LENGTHS)
        train(d, cfg, tc, make_optimizer("adamw", 1e-3, schedule="constant", master_weights=master), progress=False)
        recs = read_jsonl(os.path.join(d, "train_metrics.jsonl"))
        ev = read_jsonl(os.path.join(d, "eval_metrics.jsonl"))[-1]
        ax.plot([r["step"] for r in recs], [r["cross_entropy"] for r in recs], label=name)
        rows.append([name, f"{recs[-1]['cross_entropy']:.4f}", f"{ev['eval/cross_entropy']:.4f}"])
    ax.set(xlabel="step", ylabel="train cross-entropy", title="bf16 params with and without an f32 master copy")
    ax.legend()
    save_plot(fig, "bf16_master_weights.png")
    save_table("bf16_master_weights.md", ["params", "final train CE", "eval CE"], rows)


if __name__ == "__main__":
    main()
