"""Benchmark: MoE layer fwd+bwd time vs a dense FFN of equal active FLOPs, measured in one process.

Prints a markdown table. Every row carries its own baseline (the dense FFN with d_ff = k * f, so
it does the same useful FLOPs per token as the MoE's k experts), the ratio MoE / dense, the share
of (token, expert) assignments dropped, achieved useful GFLOP/s and that as a fraction of the
machine's f32 matmul peak measured in the same run. The dense baseline and every row of one
(E, k, cf) cell are timed round-robin (``timing.interleaved``), so each ratio compares times
measured in the same moments.

Two floor rows per cell bound what any capacity-bucket backend can reach on this machine:

* *experts only*: fwd+bwd of the batched expert matmuls alone on full ``[E, C, d]`` buffers (no
  routing, dispatch or combine);
* *weight traffic*: the time to stream the expert weights three times (read in the forward, read
  in the backward, write the weight gradients) at the copy bandwidth measured in this run. With
  few tokens per expert this, not the FLOPs, is what grows with E.

    python benchmarks/moe_layer.py                 # the full grid (about 15 minutes on 2 CPU cores)
    python benchmarks/moe_layer.py --quick         # E in {8, 128}, k=2, cf=1.25
    python benchmarks/moe_layer.py --scaling       # E=128 k=2 cf=1.25 at 4096..16384 tokens per group
    python benchmarks/moe_layer.py --dropless      # dropless SwiGLU: bucket vs gather C=t vs ragged vs HF

``--dropless`` times, for (E=8, k=2, f=3.5d: Mixtral-shaped), (E=64, k=8, f=d/2) and (E=128, k=8,
f=d/2), fwd+bwd and forward-only of the dropless layer with each backend against the equal-FLOP
dense FFN, the experts alone at the mean load (the useful FLOPs, a floor), the largest expert
load and the capacity the ``bucket`` backend chose; and, when torch and transformers are
installed, Hugging Face's ``MixtralSparseMoeBlock`` forward (2 torch threads) on the same tokens
with the same weights (its output is checked against moejax's: ``|y_hf - y| / |y|``); on a GPU
HF's block runs on CUDA in the layer's dtype (``--no_hf`` leaves it out).
"""

from __future__ import annotations

import argparse
import math
import resource
import sys
import time

import jax
import jax.numpy as jnp
from flax import nnx
from timing import interleaved, timeit

from moejax.moe import MoeConfig, MoeLayer
from moejax.moe.experts import DenseFFN, ffn_matrices

_T0 = time.perf_counter()


def matmul_peak(n: int = 2048, reps: int = 5, dtype="float32") -> float:
    """GFLOP/s of an ``n^3`` matmul in ``dtype``, best of 3 rounds (a peak, not a typical speed)."""
    a = jax.random.normal(jax.random.key(0), (n, n), jnp.dtype(dtype))
    f = jax.jit(lambda a: a @ a)
    return 2 * n**3 / interleaved({"mm": (f, (a,))}, rounds=3, reps=reps)["mm"] / 1e9


def copy_bandwidth(mib: int = 512) -> float:
    """Bytes/s of an out-of-cache read+write pass (``y = 2 * x`` on ``mib`` MiB of float32)."""
    a = jnp.ones((mib * 2**18,), jnp.float32)
    f = jax.jit(lambda a: a * 2.0)
    return 2 * a.nbytes / timeit(f, a, reps=5)


def fwd_bwd(module, call):
    """``(x, cot) -> (y, (dparams, dx))``: the output and its VJP with cotangent ``cot``.

    The output is returned, as a layer's output is consumed by the next layer in a real step.
    (Returning only ``grad(sum(y * cot))`` lets XLA drop the forward's last matmul — the output
    itself is never needed — which the dense FFN allows and the MoE does not: the combine
    weights' gradient reads the experts' outputs. That made the old baseline 1/6 cheaper.)
    """
    graphdef, params, rest = nnx.split(module, nnx.Param, ...)

    @jax.jit
    def step(params, rest, x, cot):
        y, vjp = jax.vjp(lambda params, x: call(nnx.merge(graphdef, params, rest), x), params, x)
        return y, vjp(cot)

    return lambda x, cot: step(params, rest, x, cot)


def experts_floor(e, k, cf, tokens, d, f, args):
    """(fn, args) of fwd+bwd of the expert matmuls alone on full ``[e, C, d]`` buffers: no
    routing, no dispatch. The capacity-padded compute every buffer backend must do."""
    from moejax.moe import Experts, expert_capacity

    c = expert_capacity(min(tokens, args.group), e, cf, k, 4) * max(1, tokens // args.group)
    dt = jnp.dtype(args.dtype)
    experts = Experts(e, d, f, activation=args.activation, dtype=dt, param_dtype=dt, rngs=nnx.Rngs(0))
    buf = jax.random.normal(jax.random.key(3), (e, c, d), dt)
    cot = jax.random.normal(jax.random.key(4), buf.shape, dt)
    return fwd_bwd(experts, lambda m, x: m(x)), (buf, cot)


def log(msg):
    """A progress line with the elapsed seconds on stderr (the table stays on stdout)."""
    print(f"[{time.perf_counter() - _T0:6.1f} s] {msg}", file=sys.stderr, flush=True)


def hf_block(layer, e, k, d, f, device="cpu"):
    """HF's ``MixtralSparseMoeBlock`` holding ``layer``'s weights (in the layer's dtype, on torch
    ``device``), or None without torch/transformers. Both expert layouts: transformers 4's
    per-expert ``w1/w3/w2`` and transformers 5's fused ``gate_up_proj [E, 2f, d]`` / ``down_proj [E, d, f]``."""
    try:
        import numpy as np
        import torch
        from transformers import MixtralConfig
        from transformers.models.mixtral.modeling_mixtral import MixtralSparseMoeBlock
    except ImportError:
        return None
    torch.set_num_threads(2)
    cfg = MixtralConfig(hidden_size=d, intermediate_size=f, num_local_experts=e, num_experts_per_tok=k,
                        router_jitter_noise=0.0)
    block = MixtralSparseMoeBlock(cfg).eval()
    t = lambda a: torch.from_numpy(np.array(a, np.float32))
    wi0, wi1, wo = (t(getattr(layer.experts, n)[...]) for n in ("wi_0", "wi_1", "wo"))   # [E, d, f], [E, f, d]
    with torch.no_grad():
        block.gate.weight.copy_(t(layer.router.kernel[...]).T)
        if hasattr(block.experts, "gate_up_proj"):
            block.experts.gate_up_proj.copy_(torch.cat([wi0.transpose(1, 2), wi1.transpose(1, 2)], 1))
            block.experts.down_proj.copy_(wo.transpose(1, 2))
        else:
            for i, ex in enumerate(block.experts):
                ex.w1.weight.copy_(wi0[i].T)
                ex.w3.weight.copy_(wi1[i].T)
                ex.w2.weight.copy_(wo[i].T)
    block.gate.float()                               # the router stays f32, as moejax's
    return block.to(device=device, dtype=getattr(torch, str(layer.experts.wo[...].dtype)))


def torch_forward(block):
    """``x -> torch tensor`` forward of a torch block under ``no_grad``, synchronised (CUDA too);
    ``x`` is moved to the block's device and dtype once (the copy is not timed)."""
    import numpy as np
    import torch

    p = next(block.experts.parameters())
    cache = {}

    def fn(x):
        if id(x) not in cache:
            cache.clear()
            cache[id(x)] = torch.from_numpy(np.array(x, np.float32)).to(device=p.device, dtype=p.dtype)
        with torch.no_grad():
            y = block(cache[id(x)])
        y = y[0] if isinstance(y, tuple) else y
        if p.device.type == "cuda":
            torch.cuda.synchronize()
        return y

    return fn


def run_dropless(args):
    """The ``--dropless`` table (see the module docstring)."""
    tokens, d = args.tokens, args.d_model
    dt = jnp.dtype(args.dtype)
    x = jax.random.normal(jax.random.key(1), (tokens // args.seq, args.seq, d), dt)
    cot = jax.random.normal(jax.random.key(2), x.shape, dt)
    cells = [(8, 2, 7 * d // 2), (64, 8, d // 2), (128, 8, d // 2)]
    if args.quick:
        cells = cells[:2]
    cells = cells[:args.cells]
    print(f"# dropless MoE layer, {tokens} tokens in one group, d_model={d}, swiglu, {args.dtype}, jax "
          f"{jax.__version__} on {jax.devices()[0].device_kind}\n")
    print("| E | k | f | backend | max load / mean | capacity used | fwd+bwd ms | /dense | forward ms | /dense fwd |")
    print("|---|---|---|---|---|---|---|---|---|---|")
    on_cpu = jax.devices()[0].platform == "cpu"
    hf_rows = []
    for e, k, f in cells:
        dense = DenseFFN(d, k * f, activation="swiglu", dtype=dt, param_dtype=dt, rngs=nnx.Rngs(0))
        grads = {"dense": (fwd_bwd(dense, lambda m, x: m(x)), (x, cot))}
        fwds = {"dense": (jax.jit(lambda x, m=dense: m(x)), (x,))}
        mean = tokens * k / e
        from moejax.moe import Experts
        floor = Experts(e, d, f, activation="swiglu", dtype=dt, param_dtype=dt, rngs=nnx.Rngs(0))
        fbuf = jax.random.normal(jax.random.key(3), (e, int(math.ceil(mean)), d), dt)
        fcot = jax.random.normal(jax.random.key(4), fbuf.shape, dt)
        grads["floor"] = (fwd_bwd(floor, lambda m, x: m(x)), (fbuf, fcot))
        fwds["floor"] = (jax.jit(lambda b, m=floor: m(b)), (fbuf,))
        stats, layers = {}, {}
        for backend in args.backends:
            if backend == "ragged" and on_cpu and e > args.ragged_max_experts_cpu:
                continue
            cfg = MoeConfig(num_experts=e, d_model=d, d_ff=f, top_k=k, activation="swiglu", weight_norm="topk",
                            dropless=True, dtype=dt, param_dtype=dt, max_group_size=tokens, backend=backend)
            layer = layers[backend] = MoeLayer(cfg, rngs=nnx.Rngs(0))
            _, stats[backend] = nnx.jit(lambda m, x: m(x, deterministic=True))(layer, x)
            log(f"E={e}: {backend} built")
            grads[backend] = (fwd_bwd(layer, lambda m, x: m(x, deterministic=True)[0]), (x, cot))
            fwds[backend] = (jax.jit(lambda x, m=layer: m(x, deterministic=True)[0]), (x,))
        layer = layers.get("bucket") or next(iter(layers.values()))
        block = hf_block(layer, e, k, d, f, device="cpu" if on_cpu else "cuda") if args.hf else None
        if block is not None:                     # timed in the same rounds as moejax's forwards
            fwds["hf"] = (torch_forward(block), (x,))
        log(f"E={e}: {len(grads)} fwd+bwd and {len(fwds)} forward programs to compile and time")
        tg = interleaved(grads, rounds=args.rounds, reps=args.reps)
        log(f"E={e}: fwd+bwd timed")
        tf = interleaved(fwds, rounds=args.rounds, reps=args.reps)
        log(f"E={e}: forward timed")
        def row(key, name, load, cap, e=e, k=k, f=f, tg=tg, tf=tf):
            print(f"| {e} | {k} | {f} | {name} | {load} | {cap} | {tg[key] * 1e3:.0f} | {tg[key] / tg['dense']:.2f} | "
                  f"{tf[key] * 1e3:.0f} | {tf[key] / tf['dense']:.2f} |", flush=True)

        row("dense", f"*dense FFN, d_ff={k * f}*", "-", "-")
        row("floor", "*experts only at the mean load (floor)*", "1.00", f"{int(math.ceil(mean))}")
        for key, st in stats.items():
            name = {"gather": "gather (C = t)"}.get(key, key)
            row(key, name, f"{int(st.max_expert_load) / mean:.2f}", f"{int(st.capacity_used)}")
        if block is not None:
            y_hf = jnp.asarray(fwds["hf"][0](x).float().cpu().numpy())
            y = fwds["bucket" if "bucket" in fwds else next(iter(layers))][0](x)
            y = y.astype(jnp.float32)
            err = float(jnp.linalg.norm((y_hf - y).ravel()) / jnp.linalg.norm(y.ravel()))
            hf_rows.append((e, k, f, tf["hf"], tf.get("bucket", float("nan")), tf["dense"], err))
    if hf_rows:
        where = "2 torch threads" if on_cpu else "torch CUDA"
        # the dense FFN of equal FLOPs (no routing, no padding) bounds any exact MoE from below: when it
        # is slower than HF's block, the matmul library, not the MoE, decides the comparison
        print(f"\n| E | k | f | HF MixtralSparseMoeBlock forward ms ({where}) | moejax bucket forward ms | "
              "moejax / HF | dense FFN forward ms | dense FFN / HF | rel. diff |")
        print("|---|---|---|---|---|---|---|---|---|")
        for e, k, f, t_hf, t_mx, t_dense, err in hf_rows:
            print(f"| {e} | {k} | {f} | {t_hf * 1e3:.0f} | {t_mx * 1e3:.0f} | {t_mx / t_hf:.2f} | "
                  f"{t_dense * 1e3:.0f} | {t_dense / t_hf:.2f} | {err:.1e} |")
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    print(f"\npeak RSS {rss:.0f} MiB")


def run(args):
    tokens, d, f = args.tokens, args.d_model, args.d_ff
    dt = jnp.dtype(args.dtype)
    x = jax.random.normal(jax.random.key(1), (tokens // args.seq, args.seq, d), dt)
    cot = jax.random.normal(jax.random.key(2), x.shape, dt)
    on_cpu = jax.devices()[0].platform == "cpu"
    peak = matmul_peak(2048 if on_cpu else 8192, dtype=args.dtype)
    bw = copy_bandwidth()
    print(f"# MoE layer fwd+bwd, {tokens} tokens, groups of {min(tokens, args.group)}, d_model={d}, d_ff={f}, "
          f"{args.activation}, {args.dtype} params and compute (router f32), jax {jax.__version__} on "
          f"{jax.devices()[0].device_kind}; {args.dtype} matmul peak {peak:.0f} GFLOP/s, "
          f"copy bandwidth {bw / 1e9:.1f} GB/s\n")
    print("| E | k | cf | backend | MoE ms | dense ms | MoE/dense | dropped | useful GFLOP/s | of peak |")
    print("|---|---|---|---|---|---|---|---|---|---|")
    skipped = []
    n_mat = ffn_matrices(args.activation)          # d x f matrices per expert (2 plain, 3 gated)
    for k in args.top_k:
        dense = DenseFFN(d, k * f, activation=args.activation, dtype=dt, param_dtype=dt, rngs=nnx.Rngs(0))
        dense_call = (fwd_bwd(dense, lambda m, x: m(x)), (x, cot))
        for e in args.experts:
            for cf in args.cf:
                calls = {"dense": dense_call, "floor": experts_floor(e, k, cf, tokens, d, f, args)}
                stats = {}
                for backend in args.backends:
                    if backend == "ragged" and on_cpu and e > args.ragged_max_experts_cpu:
                        skipped.append(f"ragged E={e} k={k} cf={cf}")
                        continue
                    cfg = MoeConfig(num_experts=e, d_model=d, d_ff=f, top_k=k, activation=args.activation,
                                    dtype=dt, param_dtype=dt,
                                    capacity_factor_train=cf, capacity_factor_eval=cf, min_capacity=4,
                                    max_group_size=args.group, backend=backend)
                    layer = MoeLayer(cfg, rngs=nnx.Rngs(0))
                    # a router with some skew, like a trained one: drops are realistic, not zero
                    _, stats[backend] = layer(x, deterministic=True)
                    calls[backend] = (fwd_bwd(layer, lambda m, x: m(x, deterministic=True)[0]), (x, cot))
                t = interleaved(calls, rounds=args.rounds, reps=args.reps)
                td = t["dense"]
                traffic = 3 * e * n_mat * d * f * dt.itemsize / bw
                print(f"| {e} | {k} | {cf} | *weight traffic (floor)* | {traffic * 1e3:.1f} | {td * 1e3:.1f} | "
                      f"{traffic / td:.2f} | - | - | - |")
                print(f"| {e} | {k} | {cf} | *experts only (floor)* | {t['floor'] * 1e3:.1f} | {td * 1e3:.1f} | "
                      f"{t['floor'] / td:.2f} | - | - | - |")
                for backend in stats:
                    useful = 3 * 2 * n_mat * tokens * d * f * k / t[backend] / 1e9  # fwd + bwd (2x)
                    print(f"| {e} | {k} | {cf} | {backend} | {t[backend] * 1e3:.1f} | {td * 1e3:.1f} | "
                          f"{t[backend] / td:.2f} | {float(stats[backend].dropped_fraction):.1%} | {useful:.0f} | "
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
    p.add_argument("--dtype", default="float32", help="params and compute of experts and dense FFN (router: f32)")
    p.add_argument("--experts", type=int, nargs="+", default=[8, 32, 128])
    p.add_argument("--top_k", type=int, nargs="+", default=[1, 2])
    p.add_argument("--cf", type=float, nargs="+", default=[1.0, 1.25])
    p.add_argument("--backends", nargs="+", default=["gather", "einsum", "ragged"])
    p.add_argument("--reps", type=int, default=3, help="calls per round (median)")
    p.add_argument("--rounds", type=int, default=3, help="round-robin rounds per cell (best kept)")
    p.add_argument("--ragged_max_experts_cpu", type=int, default=8,
                   help="on CPU, run the ragged backend only up to this many experts")
    p.add_argument("--quick", action="store_true")
    p.add_argument("--cells", type=int, default=3, help="--dropless: time only the first N of the 3 cells")
    p.add_argument("--no_hf", dest="hf", action="store_false",
                   help="--dropless: leave out HF's MixtralSparseMoeBlock (2 torch threads on CPU, CUDA on a GPU)")
    p.add_argument("--dropless", action="store_true", help="the dropless table (backends bucket, gather, ragged)")
    p.add_argument("--scaling", action="store_true",
                   help="E=128, k=2, cf=1.25, gather, one group of 4096, 8192 and 16384 tokens")
    args = p.parse_args()
    if args.dropless:
        if args.backends == p.get_default("backends"):
            args.backends = ["bucket", "gather", "ragged"]
        run_dropless(args)
        return
    if args.quick:
        args.experts, args.top_k, args.cf = [8, 128], [2], [1.25]
    if args.scaling:
        args.experts, args.top_k, args.cf, args.backends = [128], [2], [1.25], ["gather"]
        for n in (4096, 8192, 16384):
            args.tokens = args.group = n
            run(args)
            print()
        return
    run(args)


if __name__ == "__main__":
    main()
