"""Hugging Face <-> moejax weight conversion (safetensors in and out; never unpickles).

``from_hf(dir, mesh=..., dtype=...)`` reads ``config.json``'s ``model_type`` and picks the
family's converter (:data:`CONVERTERS`); each builds the model abstractly and streams every
parameter from the memory-mapped shards into its sharding (:mod:`moejax.convert.load`).
"""

from __future__ import annotations

import importlib

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
