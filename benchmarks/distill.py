"""Benchmark: distilling a tiny Switch teacher into a dense tiny T5 student (one process).

Trains (1) the MoE teacher, (2) the dense baseline = the student architecture trained on labels
only, (3) the distilled student (teacher non-expert init + soft/hard loss) and (4) the student
with distillation but a fresh init, all for the same steps, batch and seed, and reports validation
cross-entropy and the fraction of the teacher-vs-baseline gap each student keeps:
``(CE_baseline - CE_student) / (CE_baseline - CE_teacher)``. The students have exactly the
baseline's FLOPs. Prints a markdown table.

    python benchmarks/distill.py --steps 400      # ~4 minutes on 2 CPU cores
"""

from __future__ import annotations

import argparse
import os
import tempfile

from moejax.models.registry import get_config
from moejax.training.optim import make_optimizer
from moejax.training.trainer import TrainConfig, train
from moejax.training.writers import read_jsonl


def run(d, model, steps, **kw):
    tc = TrainConfig(batch_size=32, train_steps=steps, log_every=100, mesh_shape={"data": 1}, eval_batches=8,
                     infer_examples=2, **kw)
    train(d, model, tc, make_optimizer("adafactor", 0.1, warmup_steps=100), progress=False)
    return read_jsonl(os.path.join(d, "eval_metrics.jsonl"))[-1]["eval/cross_entropy"]


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--steps", type=int, default=400)
    ap.add_argument("--experts", type=int, default=8)
    args = ap.parse_args()
    t = get_config("tiny_switch", vocab_size=512)
    teacher_cfg = t.replace(moe=t.moe.replace(num_experts=args.experts))
    student_cfg = get_config("tiny_t5", vocab_size=512)
    with tempfile.TemporaryDirectory() as root:
        p = lambda n: os.path.join(root, n)
        rows = [(f"teacher: tiny Switch, {args.experts} experts", run(p("teacher"), teacher_cfg, args.steps))]
        base = run(p("baseline"), student_cfg, args.steps)
        rows.append(("dense baseline (student arch, labels only)", base))
        rows.append(("distilled student, teacher init, alpha 0.75",
                     run(p("kd"), student_cfg, args.steps, teacher_checkpoint=p("teacher"))))
        rows.append(("distilled student, fresh init, alpha 0.75",
                     run(p("kd_fresh"), student_cfg, args.steps, teacher_checkpoint=p("teacher"),
                         init_from_teacher=False)))
    teacher = rows[0][1]
    print(f"\n{args.steps} steps each, batch 32, corpus_span_corruption, validation 8 x 32 examples\n")
    print("| model | val CE | gap kept |")
    print("|---|---|---|")
    for name, ce in rows:
        kept = (base - ce) / (base - teacher) if base != teacher else float("nan")
        print(f"| {name} | {ce:.4f} | {100 * kept:.0f}% |")


if __name__ == "__main__":
    main()
