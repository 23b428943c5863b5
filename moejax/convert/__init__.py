"""Hugging Face <-> moejax weight conversion (safetensors in and out; never unpickles).

``from_hf(dir, mesh=..., dtype=...)`` reads ``config.json``'s ``model_type`` and picks the
family's converter (:data:`CONVERTERS`); each builds the model abstractly and streams every
parameter from the memory-mapped shards into its sharding (:mod:`moejax.convert.load`).
``to_hf(model, dir)`` goes the other way: the one family whose ``config.json`` represents the
model (:data:`EXPORTERS`, each module's ``check_export``) writes it, streaming.
"""

from __future__ import annotations

import importlib
import inspect

#: ``model_type`` -> the module converting it (``moejax.convert.<module>``).
CONVERTERS = {"mixtral": "hf_mixtral", "mistral": "hf_mixtral", "llama": "hf_mixtral",
              "switch_transformers": "hf_switch", "t5": "hf_switch", "nllb-moe": "hf_nllb",
              "qwen2_moe": "hf_qwen_moe", "qwen3_moe": "hf_qwen_moe", "olmoe": "hf_qwen_moe",
              "deepseek_v2": "hf_deepseek", "deepseek_v3": "hf_deepseek",
              "kimi_k2": "hf_deepseek", "gpt_oss": "hf_gpt_oss"}


def converter(model_type: str):
    """The converter module of a ``model_type`` (ValueError listing the supported ones)."""
    if model_type not in CONVERTERS:
        raise ValueError(f"cannot convert model_type={model_type!r}; supported: {', '.join(sorted(CONVERTERS))}")
    return importlib.import_module(f"moejax.convert.{CONVERTERS[model_type]}")


def from_hf(path: str, **kw):
    """``(model, cfg)`` from any supported HF ``save_pretrained`` directory: ``mesh``, ``rules``,
    ``dtype`` (parameters; default the checkpoint's), ``compute_dtype``, ``ignore_fields``,
    config ``overrides`` (see :func:`moejax.convert.load.build_from_hf`)."""
    from moejax.convert.safetensors_io import read_hf_config

    return converter(read_hf_config(path).get("model_type")).from_hf(path, **kw)


#: config class -> the modules that export it, tried in order; exactly one accepts each zoo model
EXPORTERS = {"DecoderConfig": ("hf_mixtral", "hf_qwen_moe", "hf_deepseek", "hf_gpt_oss"),
             "EncDecConfig": ("hf_switch", "hf_nllb")}


def exporter(cfg, **options):
    """The converter module whose HF family represents ``cfg`` (its ``check_export`` accepts it with
    ``options``); ValueError giving each family's reason when none does."""
    if getattr(cfg, "moe", None) is not None and cfg.moe.quant_bits is not None:
        raise ValueError(f"cannot export a model with {cfg.moe.quant_bits}-bit quantized experts to Hugging Face: "
                         "export the checkpoint before `moejax quantize`")
    reasons = []
    for name in EXPORTERS.get(type(cfg).__name__, ()):
        module = importlib.import_module(f"moejax.convert.{name}")
        unknown = sorted(set(options) - set(inspect.signature(module.check_export).parameters))
        if unknown:
            reasons.append(f"{name}: takes no {', '.join(unknown)}")
            continue
        try:
            module.check_export(cfg, **options)
        except ValueError as e:
            reasons.append(f"{name}: {e}")
            continue
        return module
    raise ValueError(f"no Hugging Face family represents this {type(cfg).__name__}: " + " | ".join(reasons))


def to_hf(model, path: str, *, dtype=None, max_shard_bytes: int | None = None, **options) -> str:
    """Export ``model`` to a HF ``save_pretrained`` directory with the family :func:`exporter` picks
    (``options``: that family's, e.g. Switch's ``expert_capacity``); returns the written model_type."""
    import json
    import os

    module = exporter(model.cfg, **options)
    kw = {} if max_shard_bytes is None else {"max_shard_bytes": max_shard_bytes}
    module.to_hf(model, path, dtype=dtype, **kw, **options)
    with open(os.path.join(path, "config.json")) as f:
        return json.load(f)["model_type"]
