"""Claim (Switch Transformer, Fedus et al. 2021, Fig. 1 / 4): at equal active FLOPs per token, more
experts converge faster. Setup: tiny T5 (dense) vs tiny Switch with 2, 4, 8, 16 experts (top-1,
every other layer sparse, same d_ff, so the same FLOPs per token), span corruption on the embedded
corpus, 400 steps, batch 32, same seed. Output: loss curves and final eval cross-entropy."""

from __future__ import annotations

import sys

import matplotlib.pyplot as plt
from common import run, save_plot, save_table, tiny

STEPS = int(sys.argv[1]) if len(sys.argv) > 1 else 400


def smooth(v, k=5):
    return [sum(v[max(0, i - k + 1):i + 1]) / len(v[max(0, i - k + 1):i + 1]) for i in range(len(v))]


def main():
    runs = {"dense (tiny_t5)": run(tiny("tiny_t5"), STEPS)}
    for e in (2, 4, 8, 16):
        runs[f"Switch, {e} experts"] = run(tiny("tiny_switch", num_experts=e), STEPS)
    fig, ax = plt.subplots(figsize=(7, 4))
    rows = []
    for name, (recs, ev, _) in runs.items():
        ax.plot([r["step"] for r in recs], smooth([r["cross_entropy"] for r in recs]), label=name)
        rows.append([name, f"{recs[-1]['cross_entropy']:.4f}", f"{ev['eval/cross_entropy']:.4f}",
                     f"{ev['eval/accuracy']:.4f}"])
    ax.set(xlabel="step", ylabel="train cross-entropy (smoothed)", title="Switch vs dense at equal active FLOPs")
    ax.legend()
    save_plot(fig, "switch_vs_dense.png")
    save_table("switch_vs_dense.md", ["model", "final train CE", "eval CE", "eval token acc"], rows,
               f"{STEPS} steps, batch 32, span corruption on the embedded corpus, one CPU device.")


if __name__ == "__main__":
    main()
