"""Benchmark: the matmul library under the MoE, XLA against torch, on the same expert FFN work.

Why moejax's dropless forward is not faster than Hugging Face's ``MixtralSparseMoeBlock`` on a CPU:
both compute the same SwiGLU expert FFNs; HF's block is a Python loop of torch GEMMs (MKL on x86),
moejax's is XLA's batched ``dot_general``. This times, round-robin in one process (2 torch threads,
XLA's default 2-core pool), the E experts' SwiGLU FFN over ``C`` rows each:

* ``torch loop``: E times ``linear(silu(linear(x, w1)) * linear(x, w3), w2)`` (HF's per-expert math);
* ``xla batched``: the same as three batched einsums over ``[E, C, d]`` (moejax's ``Experts``);
* ``xla unrolled``: E separate XLA matmul chains in one program;
* ``xla dense``: one dense SwiGLU FFN with ``d_ff = k * f`` on ``E * C / k`` tokens (equal FLOPs).

Ratios are against ``torch loop``; the last column is achieved GFLOP/s.

    python benchmarks/matmul_library.py                       # Mixtral-shaped: E=8, C=1024, d=512, f=1792
    python benchmarks/matmul_library.py --experts 64 --rows 512 --d_ff 256
"""

from __future__ import annotations

import argparse

import jax
import jax.numpy as jnp
import numpy as np
from timing import interleaved


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--experts", type=int, default=8)
    p.add_argument("--rows", type=int, default=1024, help="rows per expert (C)")
    p.add_argument("--d_model", type=int, default=512)
    p.add_argument("--d_ff", type=int, default=1792)
    p.add_argument("--top_k", type=int, default=2, help="for the equal-FLOP dense FFN")
    p.add_argument("--rounds", type=int, default=5)
    p.add_argument("--reps", type=int, default=3)
    args = p.parse_args()
    try:
        import torch
    except ImportError:
        raise SystemExit("needs torch (pip install torch==2.13.0)") from None
    torch.set_num_threads(2)
    e, c, d, f, k = args.experts, args.rows, args.d_model, args.d_ff, args.top_k
    rng = np.random.default_rng(0)
    x = rng.standard_normal((e, c, d), np.float32)
    w1, w3 = ((rng.standard_normal((e, d, f)) / np.sqrt(d)).astype(np.float32) for _ in range(2))
    w2 = (rng.standard_normal((e, f, d)) / np.sqrt(f)).astype(np.float32)
    xj, w1j, w3j, w2j = map(jnp.asarray, (x, w1, w3, w2))

    def swiglu(x, a, b, o):
        h = jax.nn.silu(jnp.einsum("ecd,edf->ecf", x, a)) * jnp.einsum("ecd,edf->ecf", x, b)
        return jnp.einsum("ecf,efd->ecd", h, o)

    def unrolled(x, a, b, o):
        return jnp.stack([(jax.nn.silu(x[i] @ a[i]) * (x[i] @ b[i])) @ o[i] for i in range(e)])

    tokens = e * c // k
    xd = jnp.asarray(x.reshape(e * c, d)[:tokens])
    wd1, wd3 = (jnp.asarray(rng.standard_normal((d, k * f)) / np.sqrt(d), jnp.float32) for _ in range(2))
    wd2 = jnp.asarray(rng.standard_normal((k * f, d)) / np.sqrt(k * f), jnp.float32)
    dense = jax.jit(lambda x, a, b, o: (jax.nn.silu(x @ a) * (x @ b)) @ o)

    F = torch.nn.functional
    xt = torch.from_numpy(x)
    t1, t3, t2 = ([torch.from_numpy(np.ascontiguousarray(w[i].T)) for i in range(e)] for w in (w1, w3, w2))

    def torch_loop():
        with torch.no_grad():
            return [F.linear(F.silu(F.linear(xt[i], t1[i])) * F.linear(xt[i], t3[i]), t2[i]) for i in range(e)]

    calls = {"torch loop": (torch_loop, ()), "xla batched": (jax.jit(swiglu), (xj, w1j, w3j, w2j)),
             "xla unrolled": (jax.jit(unrolled), (xj, w1j, w3j, w2j)), "xla dense": (dense, (xd, wd1, wd3, wd2))}
    ref = np.stack([t.numpy() for t in torch_loop()])
    err = float(np.abs(np.asarray(jax.jit(swiglu)(xj, w1j, w3j, w2j)) - ref).max() / np.abs(ref).max())
    t = interleaved(calls, rounds=args.rounds, reps=args.reps)
    flops = 3 * 2 * e * c * d * f
    print(f"# SwiGLU experts E={e}, C={c} rows each, d={d}, f={f}, f32; jax {jax.__version__} "
          f"({jax.devices()[0].device_kind}), torch {torch.__version__} (2 threads); "
          f"xla vs torch rel. diff {err:.1e}\n")
    print("| implementation | ms | / torch loop | GFLOP/s |")
    print("|---|---|---|---|")
    for name, s in t.items():
        print(f"| {name} | {s * 1e3:.1f} | {s / t['torch loop']:.2f} | {flops / s / 1e9:.0f} |")


if __name__ == "__main__":
    main()
