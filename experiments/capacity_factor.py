"""Claim (Switch Transformer sec. 2.2; GShard): a lower capacity factor drops more tokens and hurts
quality; top-2 needs more capacity than top-1 for the same drop rate; cf ~1.0-1.25 is a good trade.
Setup: tiny Switch, 8 experts, top-1 and top-2, training capacity factor in {0.5, 1.0, 1.25, 2.0}
(eval capacity 2.0), 300 steps each. Output: fraction of assignments / tokens dropped in training
and the eval cross-entropy."""

from __future__ import annotations

import sys

import matplotlib.pyplot as plt
from common import run, save_plot, save_table, tiny

STEPS = int(sys.argv[1]) if len(sys.argv) > 1 else 300
CFS = (0.5, 1.0, 1.25, 2.0)


def main():
    rows, res = [], {}
    for k in (1, 2):
        for cf in CFS:
            recs, ev, _ = run(tiny("tiny_switch", num_experts=8, top_k=k, capacity_factor_train=cf, min_capacity=0),
                              STEPS)
            drop = sum(r["dropped_fraction"] for r in recs) / len(recs)
            tok = sum(r["tokens_dropped_fraction"] for r in recs) / len(recs)
            res[(k, cf)] = (drop, ev["eval/cross_entropy"])
            rows.append([f"top-{k}", cf, f"{100 * drop:.1f}%", f"{100 * tok:.1f}%", f"{ev['eval/cross_entropy']:.4f}"])
    fig, ax = plt.subplots(1, 2, figsize=(10, 3.5))
    for k in (1, 2):
        ax[0].plot(CFS, [100 * res[(k, c)][0] for c in CFS], marker="o", label=f"top-{k}")
        ax[1].plot(CFS, [res[(k, c)][1] for c in CFS], marker="o", label=f"top-{k}")
    ax[0].set(xlabel="train capacity factor", ylabel="% assignments dropped (train)")
    ax[1].set(xlabel="train capacity factor", ylabel="eval cross-entropy")
    ax[0].legend()
    save_plot(fig, "capacity_factor.png")
    save_table("capacity_factor.md", ["router", "capacity factor", "assignments dropped", "tokens dropped", "eval CE"],
               rows, f"{STEPS} steps per run, tiny Switch with 8 experts, min_capacity 0, one CPU device.")


if __name__ == "__main__":
    main()
