"""Benchmark: host memory and time of converting a Hugging Face checkpoint (issue 15).

Writes a random Mixtral-shaped checkpoint in bf16 safetensors (HF names, several shards and an
index file, ~1.6 GB at the defaults: 8 layers, d=1024, f=3584, 8 experts), then converts it in fresh
child processes (so each peak RSS is its own) and prints a table:

* ``stream``: ``moejax.convert.from_hf(dir, mesh=...)`` onto the emulated 8-device CPU mesh, every
  parameter read from the memory-mapped shards straight into its shards;
* ``cli``: the same plus ``moejax convert``'s orbax write of the sharded checkpoint;
* ``in-memory``: the pre-streaming path (every tensor read into a host dict, a concrete f32 model
  on one device, filled from the dict), for comparison;

with wall time, peak RSS, the added peak (peak minus the RSS just before the first tensor), the
converted model's own bytes (all device buffers: on CPU the devices are host memory), the largest
stacked tensor, the target ``model bytes + 1.5 x largest stacked tensor + 0.5 GiB`` on the added
peak, and whether the logits equal the in-memory converter's.

    python benchmarks/convert.py                      # defaults above, mesh data=2,expert=4
    python benchmarks/convert.py --layers 2 --d_model 256 --d_ff 512   # a quick run
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import tempfile
import time

import numpy as np

GIB = 1024 ** 3


def rss_bytes() -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) * 1024
    return 0


def write_checkpoint(path: str, args) -> dict:
    """A random Mixtral checkpoint written tensor by tensor (never whole in memory)."""
    import ml_dtypes

    from moejax.convert.safetensors_io import ShardedWriter

    d, f, e, layers, heads, kv, hd = args.d_model, args.d_ff, args.experts, args.layers, args.heads, args.kv_heads, \
        args.d_model // args.heads
    shapes = [("model.embed_tokens.weight", (args.vocab, d)), ("model.norm.weight", (d,)),
              ("lm_head.weight", (args.vocab, d))]
    for i in range(layers):
        p = f"model.layers.{i}."
        shapes += [(p + "self_attn.q_proj.weight", (heads * hd, d)), (p + "self_attn.k_proj.weight", (kv * hd, d)),
                   (p + "self_attn.v_proj.weight", (kv * hd, d)), (p + "self_attn.o_proj.weight", (d, heads * hd)),
                   (p + "input_layernorm.weight", (d,)), (p + "post_attention_layernorm.weight", (d,)),
                   (p + "block_sparse_moe.gate.weight", (e, d))]
        for j in range(e):
            q = f"{p}block_sparse_moe.experts.{j}."
            shapes += [(q + "w1.weight", (f, d)), (q + "w2.weight", (d, f)), (q + "w3.weight", (f, d))]
    bf16 = np.dtype(ml_dtypes.bfloat16)
    w = ShardedWriter(path, [(n, s, bf16) for n, s in shapes], max_shard_bytes=args.shard_mib * 1024 ** 2)
    rng = np.random.default_rng(0)
    for name, shape in shapes:
        scale = 1.0 if "norm" in name else 0.02
        w.write(name, (rng.standard_normal(shape, np.float32) * scale + (1.0 if "norm" in name else 0.0)).astype(bf16))
    w.close()
    config = {"model_type": "mixtral", "architectures": ["MixtralForCausalLM"], "vocab_size": args.vocab,
              "hidden_size": d, "intermediate_size": f, "num_hidden_layers": layers, "num_attention_heads": heads,
              "num_key_value_heads": kv, "head_dim": hd, "num_local_experts": e, "num_experts_per_tok": 2,
              "rms_norm_eps": 1e-5, "rope_theta": 1e6, "sliding_window": None, "tie_word_embeddings": False,
              "hidden_act": "silu", "max_position_embeddings": 4096, "router_jitter_noise": 0.0,
              "dtype": "bfloat16", "transformers_version": "4.57.6"}
    with open(os.path.join(path, "config.json"), "w") as fh:
        json.dump(config, fh)
    largest = max(layers * e * f * d * 2, args.vocab * d * 2)
    size = sum(os.path.getsize(os.path.join(path, n)) for n in os.listdir(path) if n.endswith(".safetensors"))
    return {"largest": largest, "size": size}


def child(mode: str, hf_dir: str, mesh_text: str, out: str) -> None:
    """One conversion in this (fresh) process; prints a JSON line of its measurements."""
    os.environ["XLA_FLAGS"] = os.environ.get("XLA_FLAGS", "") + " --xla_force_host_platform_device_count=8"
    os.environ.setdefault("JAX_PLATFORMS", "cpu")
    import jax
    import jax.numpy as jnp
    from flax import nnx

    from moejax.sharding import make_mesh

    jax.config.update("jax_default_matmul_precision", "highest")
    ids = jnp.asarray(np.random.default_rng(1).integers(0, 1000, (1, 16)))
    mesh = make_mesh({k: int(v) for k, v in (p.split("=") for p in mesh_text.split(","))})
    base = rss_bytes()
    t0 = time.perf_counter()
    if mode == "in-memory":
        from moejax.convert.hf_mixtral import config_from_hf, hf_to_state
        from moejax.convert.mapping import load_into
        from moejax.convert.safetensors_io import load_hf_dir
        from moejax.models import Decoder

        hf, weights = load_hf_dir(hf_dir)
        cfg = config_from_hf(hf)
        model = load_into(Decoder(cfg, rngs=nnx.Rngs(0)), hf_to_state(cfg, weights))
        del weights
    elif mode == "stream":
        from moejax.convert import from_hf

        model, cfg = from_hf(hf_dir, mesh=mesh)
    else:
        from moejax import checkpoint
        from moejax.main import main

        assert main(["convert", "--hf_dir", hf_dir, "--out", out, "--mesh", mesh_text]) == 0
        wall = time.perf_counter() - t0
        peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
        model = checkpoint.load(out, mesh)
    if mode != "cli":
        jax.block_until_ready(nnx.state(model, nnx.Param))
        wall = time.perf_counter() - t0
        peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    model_bytes = sum(s.data.nbytes for x in jax.tree.leaves(nnx.state(model, nnx.Param)) for s in x.addressable_shards)
    with jax.set_mesh(mesh):
        logits = np.asarray(model(ids)[0], np.float32)
    np.save(out + ".logits.npy", logits)
    print(json.dumps({"mode": mode, "wall": wall, "peak": peak, "base": base, "model_bytes": model_bytes}), flush=True)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--layers", type=int, default=8)
    ap.add_argument("--d_model", type=int, default=1024)
    ap.add_argument("--d_ff", type=int, default=3584)
    ap.add_argument("--experts", type=int, default=8)
    ap.add_argument("--heads", type=int, default=16)
    ap.add_argument("--kv_heads", type=int, default=4)
    ap.add_argument("--vocab", type=int, default=32000)
    ap.add_argument("--shard_mib", type=int, default=400)
    ap.add_argument("--mesh", default="data=2,expert=4")
    ap.add_argument("--dir", default="", help="work directory (default: a temporary one)")
    ap.add_argument("--child", nargs=3, metavar=("MODE", "HF_DIR", "OUT"), help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.child:
        child(args.child[0], args.child[1], args.mesh, args.child[2])
        return
    work = args.dir or tempfile.mkdtemp(prefix="moejax-convert-bench-")
    hf_dir = os.path.join(work, "hf")
    info = write_checkpoint(hf_dir, args)
    shards = len([n for n in os.listdir(hf_dir) if n.endswith(".safetensors")])
    print(f"# HF Mixtral-shaped checkpoint: {args.layers} layers, d={args.d_model}, f={args.d_ff}, {args.experts} "
          f"experts, bf16, {info['size'] / GIB:.2f} GiB in {shards} shards; mesh {args.mesh}; largest stacked "
          f"tensor {info['largest'] / GIB:.3f} GiB\n")
    rows = {}
    for mode in ("stream", "cli", "in-memory"):
        out = os.path.join(work, mode)
        res = subprocess.run([sys.executable, __file__, "--mesh", args.mesh, "--child", mode, hf_dir, out],
                             capture_output=True, text=True, check=False)
        lines = [ln for ln in res.stdout.splitlines() if ln.startswith("{")]
        if res.returncode or not lines:
            print(f"{mode} failed:\n{res.stderr[-3000:]}")
            continue
        rows[mode] = json.loads(lines[-1])
        rows[mode]["logits"] = np.load(out + ".logits.npy")
    ref = rows.get("in-memory", {}).get("logits")
    print("| path | wall s | peak RSS GiB | added peak GiB | model bytes GiB | target on added peak GiB | "
          "met | peak / checkpoint | logits == in-memory (max abs diff) |")
    print("|---|---|---|---|---|---|---|---|---|")
    for mode, r in rows.items():
        added = r["peak"] - r["base"]
        target = r["model_bytes"] + 1.5 * info["largest"] + 0.5 * GIB
        diff = float(np.max(np.abs(r["logits"] - ref))) if ref is not None else float("nan")
        print(f"| {mode} | {r['wall']:.1f} | {r['peak'] / GIB:.2f} | {added / GIB:.2f} | "
              f"{r['model_bytes'] / GIB:.2f} | {target / GIB:.2f} | {'yes' if added <= target else 'no'} | "
              f"{r['peak'] / info['size']:.1f}x | {diff:.1e} |")


if __name__ == "__main__":
    main()
