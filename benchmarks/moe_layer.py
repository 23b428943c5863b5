"""Benchmark: MoE layer fwd+bwd time vs a dense FFN of equal active FLOPs, measured in one process.

Prints a markdown table. Every row carries its own baseline (the dense FFN with d_ff = k * f, so
it does the same useful FLOPs per token as the MoE's k experts), the ratio MoE / dense, the share
of (token, expert) assignments dropped, achieved useful GFLOP/s and that as a fraction of the
machine's f32 matmul peak measured in the same run.

    python benchmarks/moe_layer.py                 # the full grid (about 10 minutes on 2 CPU cores)
    python benchmarks/moe_layer.py --quick         # E in {8, 128}, k=2, cf=1.25
"""

from __future__ import annotations

import argparse
import resource

import jax
import jax.numpy as jnp
from flax import nnx

from timing import timeit

from moejax.moe import MoeConfig, MoeLayer
from moejax.moe.experts import DenseFFN


def matmul_peak(n: int = 2048, reps: int = 5) -> float:
    a = jax.random.normal(jax.random.key(0), (n, n), jnp.float32)
    f = jax.jit(lambda a: a @ a)
    return 2 * n**3 / timeit(f, a, reps=reps) / 1e9


def fwd_bwd(module, call):
    graphdef, params, rest = nnx.split(module, nnx.Param, ...)

    @jax.jit
    def step(params, rest, x, cot):
        def loss(params, x):
            y = call(nnx.merge(graphdef, params, rest), x)
            return jnp.sum(y * cot)

        return jax.grad(loss, argnums=(0, 1))(params, x)

    return lambda x, cot: step(params, rest, x, cot)


def experts_floor(e, k, cf, tokens, d, f, args) -> float:
    """fwd+bwd of the expert matmuls alone on full ``[e, C, d]`` buffers: no routing, no dispatch.

    The capacity-padded compute every buffer backend must do; the MoE/dense ratio cannot go
    below this row's ratio on this machine.
    """
    from moejax.moe import Experts, expert_capacity

    c = expert_capacity(min(tokens, args.group), e, cf, k, 4) * max(1, tokens // args.group)
    experts = Experts(e, d, f, activation=args.activation, rngs=nnx.Rngs(0))
    buf = jax.random.normal(jax.random.key(3), (e, c, d), jnp.float32)
    cot = jax.random.normal(jax.random.key(4), buf.shape, jnp.float32)
    return timeit(fwd_bwd(experts, lambda m, x: m(x)), buf, cot, reps=args.reps)


def run(args):
    tokens, d, f = args.tokens, args.d_model, args.d_ff
    x = jax.random.normal(jax.random.key(1), (tokens // args.seq, args.seq, d), jnp.float32)
    cot = jax.random.normal(jax.random.key(2), x.shape, jnp.float32)
    peak = matmul_peak()
    print(f"# MoE layer fwd+bwd, {tokens} tokens, d_model={d}, d_ff={f}, {args.activation}, f32, "
          f"jax {jax.__version__} on {jax.devices()[0].device_kind}; matmul peak {peak:.0f} GFLOP/s\n")
    print("| E | k | cf | backend | MoE ms | dense ms | MoE/dense | dropped | useful GFLOP/s | of peak |")
    print("|---|---|---|---|---|---|---|---|---|---|")
    on_cpu = jax.devices()[0].platform == "cpu"
    skipped = []
    dense_cache = {}
    for k in args.top_k:
        if k not in dense_cache:
            dense = DenseFFN(d, k * f, activation=args.activation, rngs=nnx.Rngs(0))
            dense_cache[k] = timeit(fwd_bwd(dense, lambda m, x: m(x)), x, cot, reps=args.reps)
        t_dense = dense_cache[k]
        for e in args.experts:
            for cf in args.cf:
                floor = experts_floor(e, k, cf, tokens, d, f, args)
                print(f"| {e} | {k} | {cf} | *experts only (floor)* | {floor * 1e3:.1f} | {t_dense * 1e3:.1f} | "
                      f"{floor / t_dense:.2f} | - | - | - |", flush=True)
                for backend in args.backends:
                    if backend == "ragged" and on_cpu and e > args.ragged_max_experts_cpu:
                        skipped.append(f"ragged E={e} k={k} cf={cf}")
                        continue
                    cfg = MoeConfig(num_experts=e, d_model=d, d_ff=f, top_k=k, activation=args.activation,
                                    capacity_factor_train=cf, capacity_factor_eval=cf, min_capacity=4,
                                    max_group_size=args.group, backend=backend)
                    layer = MoeLayer(cfg, rngs=nnx.Rngs(0))
                    # a router with some skew, like a trained one: drops are realistic, not zero
                    _, stats = layer(x, deterministic=True)
                    t = timeit(fwd_bwd(layer, lambda m, x: m(x, deterministic=True)[0]), x, cot, reps=args.reps)
                    useful = 3 * 2 * 2 * tokens * d * f * k / t / 1e9  # fwd (2 matmuls) + bwd (2x)
                    print(f"| {e} | {k} | {cf} | {backend} | {t * 1e3:.1f} | {t_dense * 1e3:.1f} | "
                          f"{t / t_dense:.2f} | {float(stats.dropped_fraction):.1%} | {useful:.0f} | "
                          f"{useful / peak:.0%} |", flush=True)
    if skipped:
        print(f"\nskipped on CPU (jax.lax.ragged_dot has no grouped kernel here; its cost grows with E): "
              f"{', '.join(skipped)}")
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    print(f"\npeak RSS {rss:.0f} MiB")


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--tokens", type=int, default=4096)
    p.add_argument("--seq", type=int, default=512)
    p.add_argument("--group", type=int, default=4096, help="max_group_size")
    p.add_argument("--d_model", type=int, default=512)
    p.add_argument("--d_ff", type=int, default=1024)
    p.add_argument("--activation", default="relu")
    p.add_argument("--experts", type=int, nargs="+", default=[8, 32, 128])
    p.add_argument("--top_k", type=int, nargs="+", default=[1, 2])
    p.add_argument("--cf", type=float, nargs="+", default=[1.0, 1.25])
    p.add_argument("--backends", nargs="+", default=["gather", "einsum", "ragged"])
    p.add_argument("--reps", type=int, default=5)
    p.add_argument("--ragged_max_experts_cpu", type=int, default=8,
                   help="on CPU, run the ragged backend only up to this many experts")
    p.add_argument("--quick", action="store_true")
    args = p.parse_args()
    if args.quick:
        args.experts, args.top_k, args.cf = [8, 128], [2], [1.25]
    run(args)


if __name__ == "__main__":
    main()
