"""Claims. (a) ST-MoE (Zoph et al. 2022, sec. 4.3): finetuning only the non-expert parameters is
about as good as finetuning everything, finetuning only the experts is worse. (b) Flan-MoE (Shen et
al. 2023) / the seed: instruction tuning helps MoE models more than dense ones.
Setup: tiny Switch (8 experts) and tiny T5 (dense, same FLOPs) pretrained 300 steps on span
corruption. (a) finetune the Switch on synth_sort for 150 steps updating all / non-expert / expert
params. (b) for both models: pretrain -> translate (single task) vs pretrain -> instruction mixture
-> translate, and pretrain -> instruction mixture evaluated on held-out phrasings; 150 steps each.
Output: eval token accuracy (teacher forced) and the tasks' decoded metrics."""

from __future__ import annotations

import os
import sys

import matplotlib.pyplot as plt
from common import RESULTS, run, save_plot, save_table, tiny

ARGS = [a for a in sys.argv[1:] if not a.startswith("--")]
PRE = int(ARGS[0]) if ARGS else 300
FT = int(ARGS[1]) if len(ARGS) > 1 else 150


def ft(cfg, init, task, steps=FT, **kw):
    _, ev, d = run(cfg, steps, task=task, lr=0.01, initial_checkpoint=init, **kw)
    return ev, d


def main():
    moe, dense = tiny("tiny_switch", num_experts=8), tiny("tiny_t5")
    _, _, moe_pre = run(moe, PRE)
    _, _, dense_pre = run(dense, PRE)
    rows = []
    for name, freeze in (("all parameters", ()), ("non-expert only (experts frozen)", ("experts",)),
                         ("experts only (non-expert frozen)", ("non_expert",))):
        ev, _ = ft(moe, moe_pre, "synth_sort", freeze=freeze)
        rows.append([name, f"{ev['eval/accuracy']:.4f}", f"{ev['synth_sort/exact_match']:.3f}"])
    save_table("finetuning_freeze.md", ["Switch finetuning on synth_sort: updated", "eval token acc", "exact match"],
               rows, f"pretrain {PRE} steps, finetune {FT} steps (Adafactor, constant lr 0.01), one CPU device.")
    rows = []
    for name, cfg, pre in (("Switch (8 experts)", moe, moe_pre), ("dense T5", dense, dense_pre)):
        direct, _ = ft(cfg, pre, "synth_translate")
        inst, inst_dir = ft(cfg, pre, "synth_instruct")
        via, _ = ft(cfg, inst_dir, "synth_translate")
        held = sum(v for k, v in inst.items() if k.endswith("/accuracy") and k.startswith("synth_instruct")) / 6
        rows.append([name, f"{direct['synth_translate/bleu']:.1f}", f"{via['synth_translate/bleu']:.1f}",
                     f"{direct['eval/accuracy']:.4f}", f"{via['eval/accuracy']:.4f}", f"{held:.1f}"])
    save_table("finetuning_instruct.md", ["model", "translate BLEU: pretrain -> FT", "BLEU: pretrain -> instruct -> FT",
                                          "token acc: pretrain -> FT", "token acc: via instruct",
                                          "instruct mix, held-out phrasings: mean task accuracy %"], rows,
               f"pretrain {PRE} steps, each finetuning stage {FT} steps, one CPU device.")


def read_table(name):
    with open(os.path.join(RESULTS, name)) as f:
        lines = [ln for ln in f.read().splitlines() if ln.startswith("| ") and not ln.startswith("|---")]
    return [[c.strip() for c in ln.strip("|").split("|")] for ln in lines[1:]]


def plot():
    """Bar charts of the two result tables (``--plot-only`` redraws them without retraining)."""
    freeze, inst = read_table("finetuning_freeze.md"), read_table("finetuning_instruct.md")
    fig, ax = plt.subplots(1, 2, figsize=(11, 3.5))
    ax[0].barh([r[0] for r in freeze], [float(r[1]) for r in freeze])
    ax[0].set(xlabel="eval token accuracy", title="Switch on synth_sort: what is updated")
    names = [r[0] for r in inst]
    x = range(len(names))
    ax[1].bar([i - 0.2 for i in x], [float(r[3]) for r in inst], width=0.4, label="pretrain -> translate")
    ax[1].bar([i + 0.2 for i in x], [float(r[4]) for r in inst], width=0.4, label="pretrain -> instruct -> translate")
    ax[1].set(xticks=list(x), xticklabels=names, ylabel="eval token accuracy", title="instruction tuning, MoE vs dense")
    ax[1].legend(fontsize=8)
    save_plot(fig, "finetuning.png")


if __name__ == "__main__":
    if "--plot-only" not in sys.argv:
        main()
    plot()
