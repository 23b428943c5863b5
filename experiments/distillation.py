"""Claim (Switch Transformer, Table 6): distilling a sparse teacher into a dense student of equal
FLOPs keeps ~28-37% of the teacher's quality gain over the dense baseline (teacher non-expert init,
0.25 hard / 0.75 soft loss). Setup: tiny Switch teacher (8 experts), dense baseline and students of
the tiny T5 architecture, each trained the same number of steps (400), batch 32, same seed.
Output: eval cross-entropy and the share of the gap kept, as a bar chart and a table."""

from __future__ import annotations

import sys

import matplotlib.pyplot as plt
from common import run, save_plot, save_table, tiny

STEPS = int(sys.argv[1]) if len(sys.argv) > 1 else 400


def main():
    _, ev_t, teacher = run(tiny("tiny_switch", num_experts=8), STEPS)
    _, ev_d, _ = run(tiny("tiny_t5"), STEPS)
    _, ev_s, _ = run(tiny("tiny_t5"), STEPS, teacher_checkpoint=teacher)
    _, ev_f, _ = run(tiny("tiny_t5"), STEPS, teacher_checkpoint=teacher, init_from_teacher=False)
    t, d = ev_t["eval/cross_entropy"], ev_d["eval/cross_entropy"]
    rows, names, ces = [], [], []
    for name, ev in (("teacher (Switch, 8 experts)", ev_t), ("dense baseline", ev_d),
                     ("student: teacher init + KD", ev_s), ("student: fresh init + KD", ev_f)):
        ce = ev["eval/cross_entropy"]
        rows.append([name, f"{ce:.4f}", f"{100 * (d - ce) / (d - t):.0f}%"])
        names.append(name)
        ces.append(ce)
    fig, ax = plt.subplots(figsize=(7, 3.5))
    ax.barh(names, ces)
    ax.set(xlabel="eval cross-entropy", xlim=(min(ces) - 0.1, max(ces) + 0.05))
    save_plot(fig, "distillation.png")
    save_table("distillation.md", ["model", "eval CE", "gap kept"], rows,
               f"{STEPS} steps each, batch 32, alpha 0.75, T 1, one CPU device.")


if __name__ == "__main__":
    main()
