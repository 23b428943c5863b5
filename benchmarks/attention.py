"""Benchmark: the attention kernels (``attention_impl``), fwd+bwd and forward, in one process.

Causal self-attention with grouped queries at a few sequence lengths. Rows: each moejax kernel
(``xla``, ``chunked``, ``dot_product``, as :func:`moejax.models.attend.attend` runs them with the
dense boolean mask the model builds) and ``jax.nn.dot_product_attention`` asked for cuDNN
explicitly (``implementation='cudnn'``: GPU only) once with that dense mask and once with
``is_causal=True`` (no mask array). Columns: fwd+bwd (output + VJP) and forward ms, each over the
``xla`` row timed in the same rounds, the compiled temporary memory of the fwd+bwd program
(``compiled.memory_analysis().temp_size_in_bytes``) and the largest difference of the output from
``xla``'s. A row that cannot run on this platform says why.

    python benchmarks/attention.py                                   # CPU: short sequences, f32
    python benchmarks/attention.py --seqs 2048 8192 --dtype bfloat16 --batch 4   # a GPU
"""

from __future__ import annotations

import argparse

import jax
import jax.numpy as jnp
from timing import interleaved

from moejax.models.attend import attend


def _vjp(fn):
    @jax.jit
    def step(q, k, v, cot):
        y, back = jax.vjp(fn, q, k, v)
        return y, back(cot)
    return step


def _kernels(mask, scale, dt, chunk, on_gpu):
    out = {name: (lambda q, k, v, name=name: attend(q, k, v, mask=mask, scale=scale, dtype=dt, impl=name,
                                                     chunk=chunk))
           for name in ("xla", "chunked", "dot_product")}
    if on_gpu:
        out["cudnn, dense mask"] = lambda q, k, v: jax.nn.dot_product_attention(
            q, k, v, mask=mask, scale=scale, implementation="cudnn")
        out["cudnn, is_causal"] = lambda q, k, v: jax.nn.dot_product_attention(
            q, k, v, is_causal=True, scale=scale, implementation="cudnn")
    return out


def run(args):
    dt = jnp.dtype(args.dtype)
    on_gpu = jax.devices()[0].platform == "gpu"
    b, h, j, x = args.batch, args.heads, args.kv_heads, args.head_dim
    print(f"# causal attention, batch {b}, {h} query / {j} kv heads of {x}, {args.dtype}, jax {jax.__version__} "
          f"on {jax.devices()[0].device_kind}\n")
    print("| s | kernel | fwd+bwd ms | /xla | forward ms | /xla fwd | fwd+bwd temp MiB | max abs diff vs xla |")
    print("|---|---|---|---|---|---|---|---|")
    for s in args.seqs:
        keys = jax.random.split(jax.random.key(s), 4)
        q = jax.random.normal(keys[0], (b, s, h, x), dt)
        k = jax.random.normal(keys[1], (b, s, j, x), dt)
        v = jax.random.normal(keys[2], (b, s, j, x), dt)
        cot = jax.random.normal(keys[3], q.shape, dt)
        mask = jnp.tril(jnp.ones((s, s), bool))[None, None]
        grads, fwds, temp, skipped = {}, {}, {}, {}
        for name, fn in _kernels(mask, x**-0.5, dt, args.chunk, on_gpu).items():
            try:
                step = _vjp(fn)
                compiled = step.lower(q, k, v, cot).compile()
                mem = compiled.memory_analysis()
                temp[name] = None if mem is None else mem.temp_size_in_bytes / 2**20
                jax.block_until_ready(step(q, k, v, cot))
                grads[name] = (step, (q, k, v, cot))
                fwds[name] = (jax.jit(fn), (q, k, v))
            except Exception as err:             # noqa: BLE001 - a row that cannot run says why
                skipped[name] = f"{type(err).__name__}: {str(err).splitlines()[0][:120]}"
        tg = interleaved(grads, rounds=args.rounds, reps=args.reps)
        tf = interleaved(fwds, rounds=args.rounds, reps=args.reps)
        y0 = fwds["xla"][0](q, k, v).astype(jnp.float32)
        for name in grads:
            err = float(jnp.max(jnp.abs(fwds[name][0](q, k, v).astype(jnp.float32) - y0)))
            mib = "-" if temp[name] is None else f"{temp[name]:.0f}"
            print(f"| {s} | {name} | {tg[name] * 1e3:.2f} | {tg[name] / tg['xla']:.2f} | {tf[name] * 1e3:.2f} | "
                  f"{tf[name] / tf['xla']:.2f} | {mib} | {err:.1e} |", flush=True)
        for name, why in skipped.items():
            print(f"| {s} | {name} | n/a: {why} | | | | | |", flush=True)


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--seqs", type=int, nargs="+", default=[512, 2048])
    p.add_argument("--batch", type=int, default=1)
    p.add_argument("--heads", type=int, default=8)
    p.add_argument("--kv_heads", type=int, default=2)
    p.add_argument("--head_dim", type=int, default=64)
    p.add_argument("--chunk", type=int, default=512, help="attention_chunk of the chunked kernel")
    p.add_argument("--dtype", default="float32")
    p.add_argument("--reps", type=int, default=3)
    p.add_argument("--rounds", type=int, default=3)
    run(p.parse_args())


if __name__ == "__main__":
    main()
