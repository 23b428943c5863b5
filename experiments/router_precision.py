"""Claim (ST-MoE, Zoph et al. 2022): the router z-loss keeps router logits small and training
stable; computing the router in float32 ("selective precision") matters when the rest runs in
bfloat16. Setup: tiny Switch (8 experts) with the experts in bfloat16, router z-loss factor 0 vs
1e-2, router in float32 vs bfloat16, a high learning rate (0.3) to provoke instability, 300 steps.
Output: router logit scale (sqrt of the mean squared logsumexp, from the z-loss statistic) over
training, loss spikes (steps whose loss exceeds the running minimum by > 0.5) and eval CE."""

from __future__ import annotations

import math
import sys

import jax.numpy as jnp
import matplotlib.pyplot as plt
from common import run, save_plot, save_table, tiny

from moejax.training.loss import LossConfig

STEPS = int(sys.argv[1]) if len(sys.argv) > 1 else 300


def main():
    rows = []
    fig, ax = plt.subplots(figsize=(7, 4))
    for zf in (0.0, 1e-2):
        for rdt in ("float32", "bfloat16"):
            cfg = tiny("tiny_switch", num_experts=8, dtype=jnp.bfloat16, router_dtype=jnp.dtype(rdt))
            cfg = cfg.replace(dtype=jnp.bfloat16)
            recs, ev, _ = run(cfg, STEPS, lr=0.3, log_every=5, loss=LossConfig(router_z_loss_factor=zf))
            scale = [math.sqrt(max(r["router_z_loss"], 0.0)) for r in recs]
            best, spikes = float("inf"), 0
            for r in recs:
                spikes += r["cross_entropy"] > best + 0.5
                best = min(best, r["cross_entropy"])
            name = f"z-loss {zf:g}, router {rdt}"
            ax.plot([r["step"] for r in recs], scale, label=name)
            rows.append([name, f"{scale[-1]:.2f}", f"{max(scale):.2f}", spikes, f"{ev['eval/cross_entropy']:.4f}"])
    ax.set(xlabel="step", ylabel="router logit scale (sqrt z-loss)", title="router z-loss and precision")
    ax.legend()
    save_plot(fig, "router_precision.png")
    save_table("router_precision.md", ["setting", "final logit scale", "max logit scale", "loss spikes", "eval CE"],
               rows, f"{STEPS} steps, Adafactor lr 0.3 (high on purpose), bf16 experts, one CPU device.")


if __name__ == "__main__":
    main()
