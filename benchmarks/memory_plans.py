"""Train-step memory plans of the published MoE configs on real pod meshes (README "Memory plan").

Prints a markdown table: per-device GiB of params + optimizer state + gradients, activations,
backward workspace and the total, with and without FSDP / full remat, and whether it fits the
chips' HBM (v5p: 95 GiB, H100: 80 GB). From abstract shapes only (``moejax.training.memory.plan``):
nothing is allocated, runs on a laptop CPU in a few minutes.

    python benchmarks/memory_plans.py
"""

from __future__ import annotations

from moejax.models.registry import get_config
from moejax.training.memory import GiB, plan

V5P, H100 = 95 * GiB, 80e9
DEC = {"targets": 4096}
ENC = {"inputs": 512, "targets": 128}           # Switch / T5 span corruption: 2^20 input tokens at batch 2048
# (config, pod, HBM, batch, lengths, [(label, mesh, remat)])
RUNS = [
    ("mixtral_8x7b", "v5p-256", V5P, 256, DEC, [("data x expert", {"data": 32, "expert": 8}, "none"),
                                                ("fsdp x expert + remat", {"fsdp": 32, "expert": 8}, "full")]),
    ("mixtral_8x7b", "v5p-1024", V5P, 1024, DEC, [("data x expert", {"data": 128, "expert": 8}, "none"),
                                                  ("fsdp x expert + remat", {"fsdp": 128, "expert": 8}, "full")]),
    ("mixtral_8x7b", "2x8 H100", H100, 16, DEC, [("data x expert", {"data": 2, "expert": 8}, "none"),
                                                 ("fsdp x expert + remat", {"fsdp": 2, "expert": 8}, "full")]),
    ("switch_base_128", "v5p-256", V5P, 2048, ENC, [("data x expert", {"data": 2, "expert": 128}, "none"),
                                                    ("fsdp x expert + remat", {"fsdp": 2, "expert": 128}, "full")]),
    ("switch_base_128", "2x8 H100", H100, 256, ENC, [("expert", {"expert": 16}, "none"),
                                                     ("expert + remat", {"expert": 16}, "full")]),
    ("switch_c_2048", "v5p-256", V5P, 2048, ENC, [("expert", {"expert": 256}, "none"),
                                                  ("expert + remat", {"expert": 256}, "full")]),
    ("switch_c_2048", "v5p-1024", V5P, 2048, ENC, [("expert", {"expert": 1024}, "none"),
                                                   ("expert + remat", {"expert": 1024}, "full")]),
    ("nllb_moe_54b", "v5p-256", V5P, 2048, ENC, [("data x expert", {"data": 2, "expert": 128}, "none"),
                                                 ("fsdp x expert + remat", {"fsdp": 2, "expert": 128}, "full")]),
    ("nllb_moe_54b", "2x8 H100", H100, 128, ENC, [("expert", {"expert": 16}, "none"),
                                                  ("expert + remat", {"expert": 16}, "full")]),
]


def main() -> None:
    print("| config | pod | batch | sharding | remat | params+opt+grads GiB | activations GiB | workspace GiB "
          "| total GiB | fits |\n|---|---|---|---|---|---|---|---|---|---|")
    for name, pod, hbm, batch, lengths, variants in RUNS:
        cfg = get_config(name)
        for label, mesh, remat in variants:
            p = plan(cfg, mesh, batch, lengths, remat=remat, dtype="bfloat16", optimizer="adamw", name=name)
            r = p.rows
            state = r["params"] + r["optimizer state"] + r["gradients"]
            fits = "yes" if p.fits(hbm) else "no"
            print(f"| {name} | {pod} | {batch} | {label} | {remat} | {state / GiB:,.1f} | "
                  f"{r['activations'] / GiB:,.1f} | {r['backward workspace'] / GiB:,.1f} | {p.total / GiB:,.1f} | "
                  f"{fits} |", flush=True)


if __name__ == "__main__":
    main()
