"""Benchmark: expert merging and expert quantization of a trained tiny Switch model, one process.

Trains a tiny Switch Transformer (8 experts, top-1) on the embedded corpus, then reports for the
model and each compressed variant: validation cross-entropy and token accuracy (teacher-forced),
total and active parameters, bytes of expert weights, and forward time relative to the original
(median of jitted calls on one batch). Prints a markdown table.

    python benchmarks/compress.py            # ~3 minutes on 2 CPU cores
    python benchmarks/compress.py --steps 100
"""

from __future__ import annotations

import argparse
import statistics
import tempfile

import jax
import jax.numpy as jnp
from flax import nnx
from timing import timeit

from moejax.data import batches
from moejax.inference.merging import expert_usage, merge_experts, param_counts
from moejax.inference.quantize import expert_weight_bytes, quantize_model
from moejax.models.registry import get_config
from moejax.training.loss import LossConfig, loss_fn
from moejax.training.optim import make_optimizer
from moejax.training.state import StepFns
from moejax.training.trainer import TrainConfig, train

LENGTHS = {"inputs": 64, "targets": 32}


def evaluate(model, val):
    ce, acc = [], []
    f = nnx.jit(lambda m, b: loss_fn(m, b, LossConfig(z_loss=0.0), deterministic=True)[1])
    for b in val:
        met = f(model, b)
        ce.append(float(met["cross_entropy"]))
        acc.append(float(met["accuracy"]))
    return statistics.mean(ce), statistics.mean(acc)


def fwd_time(model, batch, reps=20):
    f = nnx.jit(lambda m, b: m(b["encoder_input_tokens"], b["decoder_input_tokens"])[0])
    return timeit(f, model, batch, reps=reps)

def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--steps", type=int, default=400)
    args = ap.parse_args()
    base = get_config("tiny_switch", vocab_size=512)
    cfg = base.replace(moe=base.moe.replace(num_experts=8))
    with tempfile.TemporaryDirectory() as d:
        tc = TrainConfig(batch_size=32, train_steps=args.steps, log_every=100, mesh_shape={"data": 1},
                         eval_batches=1, infer_examples=2, task_feature_lengths=LENGTHS)
        state = train(d, cfg, tc, make_optimizer("adafactor", 0.1, warmup_steps=100), progress=False)
    fns = StepFns(cfg, make_optimizer().tx, jax.sharding.Mesh(jax.devices()[:1], ("data",)))
    model = fns.model(jax.device_get(state.params))
    ds = batches.dataset("corpus_span_corruption", LENGTHS, 32, encoder_decoder=True, split="validation",
                         shuffle=False, repeat=False)
    val = [{k: jnp.asarray(v) for k, v in b.items()} for b in ds.take(6).as_numpy_iterator()]
    usage = expert_usage(model, val[:2])
    variants = [("original (8 experts, f32)", model)]
    for n in (4, 2, 1):
        variants.append((f"merge -> {n}, uniform", merge_experts(model, n)))
        variants.append((f"merge -> {n}, frequency", merge_experts(model, n, "frequency", usage=usage)))
    variants.append(("merge -> 4, frequency, grouped by weights",
                     merge_experts(model, 4, "frequency", group_by="weights", usage=usage)))
    variants.append(("int8 experts (per channel)", quantize_model(model, 8)))
    variants.append(("int4 experts (groups of 16)", quantize_model(model, 4, 16)))
    base_t = fwd_time(model, val[0])
    base_ce, _ = evaluate(model, val[2:])
    print(f"tiny Switch, 8 experts top-1, trained {args.steps} steps; validation on 4 x 32 examples; "
          f"jax {jax.__version__} on {jax.devices()[0].platform}\n")
    print("| variant | val CE | CE delta | token acc | total params | active params | expert bytes "
          "| fwd time / original |")
    print("|---|---|---|---|---|---|---|---|")
    for name, m in variants:
        ce, acc = evaluate(m, val[2:])
        total, active = param_counts(m)
        t = fwd_time(m, val[0])
        print(f"| {name} | {ce:.4f} | {100 * (ce - base_ce) / base_ce:+.2f}% | {acc:.4f} | {total:,} | "
              f"{int(active):,} | {expert_weight_bytes(m):,} | {t / base_t:.2f} |")


if __name__ == "__main__":
    main()
