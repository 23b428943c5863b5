"""Benchmark: task-level routing on the synthetic multi-task mixture, and extracted sub-networks.

Trains ``tiny_switch_task`` (8 experts, top-1, routed by task id) on ``synth_multitask``, then for
each task extracts its sub-network and reports: the experts it uses, validation token accuracy of
the full model (with the task id) and of the extracted model (no task id; equal by construction),
total parameters of both, and the forward time of the extracted model relative to the full one
(median of jitted calls, one process). Prints a markdown table.

    python benchmarks/task_routing.py --steps 300      # ~2 minutes on 2 CPU cores
"""

from __future__ import annotations

import argparse
import tempfile

import jax
import jax.numpy as jnp
from flax import nnx
from timing import timeit

from moejax.data import batches
from moejax.inference.merging import param_counts
from moejax.inference.task_routing import experts_of_task, extract_task_model
from moejax.models.registry import get_config
from moejax.training.loss import LossConfig, loss_fn
from moejax.training.optim import make_optimizer
from moejax.training.state import StepFns
from moejax.training.trainer import TrainConfig, train

LENGTHS = {"inputs": 64, "targets": 32}


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--steps", type=int, default=300)
    args = ap.parse_args()
    cfg = get_config("tiny_switch_task", vocab_size=512)
    with tempfile.TemporaryDirectory() as d:
        tc = TrainConfig(mixture_or_task="synth_multitask", batch_size=32, train_steps=args.steps, log_every=100,
                         mesh_shape={"data": 1}, eval_batches=1, infer_examples=2, task_feature_lengths=LENGTHS)
        state = train(d, cfg, tc, make_optimizer("adafactor", 0.1, warmup_steps=50), progress=False)
    fns = StepFns(cfg, make_optimizer().tx, jax.sharding.Mesh(jax.devices()[:1], ("data",)))
    full = fns.model(jax.device_get(state.params))
    names = batches.task_names("synth_multitask")
    acc = nnx.jit(lambda m, b: loss_fn(m, b, LossConfig(z_loss=0.0), deterministic=True)[1]["accuracy"])
    fwd = nnx.jit(lambda m, b: m(b["encoder_input_tokens"], b["decoder_input_tokens"], task_ids=b.get("task_ids"))[0])
    total_full = param_counts(full)[0]
    print(f"tiny_switch_task trained {args.steps} steps on synth_multitask; validation batch of 32 per task; "
          f"jax {jax.__version__} on {jax.devices()[0].platform}\n")
    print("| task | experts (enc, dec) | acc full | acc extracted | params full | params extracted "
          "| fwd time extracted / full |")
    print("|---|---|---|---|---|---|---|")
    for i, name in enumerate(names):
        ds = batches.dataset(name, LENGTHS, 32, encoder_decoder=True, split="validation", shuffle=False, repeat=True)
        b = {k: jnp.asarray(v) for k, v in next(ds.as_numpy_iterator()).items()}
        bt = {**b, "task_ids": jnp.full((32,), i, jnp.int32)}
        small = extract_task_model(full, i)
        used = [int(v[0, 0]) for v in experts_of_task(full, i).values()]
        t_full, t_small = timeit(fwd, full, bt), timeit(fwd, small, b)
        print(f"| {name} | {used} | {float(acc(full, bt)):.4f} | {float(acc(small, b)):.4f} | {total_full:,} | "
              f"{param_counts(small)[0]:,} | {t_small / t_full:.2f} |")


if __name__ == "__main__":
    main()
