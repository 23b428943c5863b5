"""Shared helpers for the toy-scale reproductions: train a config with the moejax trainer on one
device, read back its per-step metrics, evaluate, and save plots / markdown tables in results/."""

from __future__ import annotations

import os
import tempfile

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

from moejax.models.registry import get_config  # noqa: E402
from moejax.training.optim import make_optimizer  # noqa: E402
from moejax.training.trainer import TrainConfig, train  # noqa: E402
from moejax.training.writers import read_jsonl  # noqa: E402

HERE = os.path.dirname(os.path.abspath(__file__))
RESULTS = os.path.join(HERE, "results")
LENGTHS = {"inputs": 64, "targets": 32}


def tiny(name: str, **moe):
    """A tiny registered config with the corpus vocabulary and MoE overrides."""
    return get_config(name, vocab_size=512, **{f"moe.{k}": v for k, v in moe.items()})


def run(cfg, steps: int, task: str = "corpus_span_corruption", model_dir: str | None = None, lr: float = 0.1,
        log_every: int = 10, **kw):
    """Train; returns ``(train records, last eval record, model_dir)``."""
    d = model_dir or tempfile.mkdtemp(prefix="moejax-exp-")
    tc = TrainConfig(mixture_or_task=task, batch_size=32, train_steps=steps, log_every=log_every,
                     mesh_shape={"data": 1}, eval_batches=8, infer_examples=32, task_feature_lengths=LENGTHS, **kw)
    opt = make_optimizer("adafactor", lr, warmup_steps=min(100, steps // 4)) if lr else make_optimizer()
    train(d, cfg, tc, opt, progress=False)
    return read_jsonl(os.path.join(d, "train_metrics.jsonl")), read_jsonl(os.path.join(d, "eval_metrics.jsonl"))[-1], d


def save_plot(fig, name: str) -> str:
    os.makedirs(RESULTS, exist_ok=True)
    path = os.path.join(RESULTS, name)
    fig.savefig(path, dpi=110, bbox_inches="tight")
    plt.close(fig)
    return path


def save_table(name: str, header: list[str], rows: list[list], note: str = "") -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(str(c) for c in r) + " |" for r in rows]
    text = "\n".join(lines) + ("\n\n" + note if note else "") + "\n"
    os.makedirs(RESULTS, exist_ok=True)
    with open(os.path.join(RESULTS, name), "w") as f:
        f.write(text)
    print(text)
    return text
