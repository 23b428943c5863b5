"""The ``config.json`` files of published checkpoints (copied from their Hub repositories, fields
and values as released) convert to exactly the zoo's named config of that model: every field a
converter reads lands where the registry puts it, and fields only the original authors' code knows
(gpt-oss's ``experts_per_token`` / ``initial_context_length``, DeepSeek's ``auto_map`` / ``ep_size``,
FP8 ``quantization_config``, Kimi-K2's YaRN with equal betas) are understood, not refused.
``gpt-oss-20b.json`` is the 120b file at the 20b's depth and expert count (24 layers, 32 experts):
the two released files differ only there."""

import dataclasses
import json
import pathlib

import pytest

from moejax.convert import converter
from moejax.models.registry import get_config

HERE = pathlib.Path(__file__).parent.parent / "fixtures" / "published_configs"
ZOO = {"Mixtral-8x7B-v0.1": "mixtral_8x7b", "Mixtral-8x22B-v0.1": "mixtral_8x22b",
       "DeepSeek-V2-Lite": "deepseek_v2_lite", "Kimi-K2-Instruct": "kimi_k2",
       "Qwen1.5-MoE-A2.7B": "qwen1_5_moe_a2_7b", "Qwen2-57B-A14B": "qwen2_57b_a14b",
       "Llama-2-7b-hf": "llama2_7b", "Qwen3-30B-A3B": "qwen3_30b_a3b",
       "OLMoE-1B-7B-0924": "olmoe_1b_7b", "DeepSeek-V3": "deepseek_v3", "gpt-oss-20b": "gpt_oss_20b",
       "gpt-oss-120b": "gpt_oss_120b"}


def published(name: str) -> dict:
    return json.loads((HERE / f"{name}.json").read_text())


@pytest.mark.parametrize("name", sorted(ZOO))
def test_published_config_converts_to_the_zoo_config(name):
    hf = published(name)
    got = converter(hf["model_type"]).config_from_hf(hf)
    assert dataclasses.asdict(got) == dataclasses.asdict(get_config(ZOO[name]))


def test_gpt_oss_experts_per_token_must_agree():
    from moejax.convert.hf_gpt_oss import config_from_hf

    hf = published("gpt-oss-20b")
    with pytest.raises(ValueError, match="experts_per_token=2 but num_experts_per_tok=4"):
        config_from_hf({**hf, "experts_per_token": 2})
    assert config_from_hf({k: v for k, v in hf.items() if k != "experts_per_token"}).moe.top_k == 4


def test_llama_3_1_config_reads_its_rope_scaling():
    """Llama-3.1-8B (a dense base for sparse upcycling): llama3 RoPE scaling, 8.030B parameters."""
    from moejax.models.layers import Llama3Rope
    from moejax.models.params import report

    cfg = converter("llama").config_from_hf(published("Llama-3.1-8B"))
    assert cfg.rope_scaling == Llama3Rope(factor=8.0, low_freq_factor=1.0, high_freq_factor=4.0,
                                          original_max_position=8192)
    assert (cfg.rope_theta, cfg.num_kv_heads, cfg.moe) == (5e5, 8, None)
    assert report(cfg).total == 8_030_261_248
