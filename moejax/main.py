"""moejax command line.

``moejax params --model mixtral_8x7b [--mesh data=64,expert=8,model=4]``: exact parameter counts.
``moejax convert --hf_dir DIR --out CKPT``: a HF checkpoint (Mixtral / Llama / Mistral, Switch / T5,
NLLB-MoE) to a moejax orbax checkpoint (restore with ``moejax.convert.checkpoint.restore``).

The gin-configured ``train`` / ``eval`` / ``infer`` entry points arrive with the trainer.
"""

from __future__ import annotations

import argparse
import sys


def _parse_mesh(text: str) -> dict[str, int]:
    mesh = {}
    for part in text.split(","):
        if "=" not in part:
            raise ValueError(f"bad --mesh entry {part!r}; expected name=size, e.g. data=64,expert=8,model=4")
        name, size = part.split("=", 1)
        mesh[name.strip()] = int(size)
    return mesh


def cmd_params(args) -> int:
    from flax import nnx

    from moejax.models.params import abstract_model, build_model, bytes_per_device, count
    from moejax.models.registry import get_config

    cfg = get_config(args.model)
    model = abstract_model(lambda: build_model(cfg, nnx.Rngs(0)))
    rep = count(model)
    print(f"# {args.model}\n")
    print(rep.as_table())
    if args.mesh:
        mesh = _parse_mesh(args.mesh)
        b = bytes_per_device(model, mesh)
        gib = 2**30
        print(f"\nmesh {mesh} ({b['devices']} devices), default logical axis rules:")
        print(f"  params    {b['params'] / gib:.3f} GiB per device")
        print(f"  optimizer {b['optimizer'] / gib:.3f} GiB per device (AdamW, two f32 moments)")
        if b["large_replicated"]:
            print(f"  replicated (not sharded by any rule): {', '.join(b['large_replicated'])}")
    return 0


def cmd_convert(args) -> int:
    from moejax.convert import checkpoint, hf_mixtral, hf_nllb, hf_switch
    from moejax.convert.safetensors_io import read_hf_config

    model_type = read_hf_config(args.hf_dir).get("model_type")
    readers = {"mixtral": hf_mixtral, "mistral": hf_mixtral, "llama": hf_mixtral, "switch_transformers": hf_switch,
               "t5": hf_switch, "nllb-moe": hf_nllb}
    if model_type not in readers:
        raise ValueError(f"cannot convert model_type={model_type!r}; supported: {', '.join(sorted(readers))}")
    model, cfg = readers[model_type].from_hf(args.hf_dir)
    checkpoint.save(model, args.out)
    print(f"converted {model_type} from {args.hf_dir} -> {args.out}")
    return 0


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="moejax", description=__doc__)
    sub = p.add_subparsers(dest="command", required=True)
    pp = sub.add_parser("params", help="exact parameter counts (abstract: nothing is allocated)")
    pp.add_argument("--model", required=True, help="a registered config name")
    pp.add_argument("--mesh", default="", help="e.g. data=64,expert=8,model=4: bytes per device")
    pp.set_defaults(fn=cmd_params)
    pc = sub.add_parser("convert", help="Hugging Face save_pretrained dir (safetensors) -> moejax orbax checkpoint")
    pc.add_argument("--hf_dir", required=True)
    pc.add_argument("--out", required=True)
    pc.set_defaults(fn=cmd_convert)
    args = p.parse_args(argv)
    try:
        return args.fn(args)
    except ValueError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
