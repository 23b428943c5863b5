"""Qwen2-MoE, Qwen3-MoE and OLMoE against transformers (PyTorch, CPU, float32): tiny random models
saved by transformers' own classes -> moejax: logits, greedy tokens (moejax decodes with its KV
cache, HF without), HF's load-balancing loss; moejax -> to_hf -> transformers reloads the same
model; configs as transformers 5 writes them; refused fields."""

import json

import numpy as np
import pytest

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")

import jax.numpy as jnp  # noqa: E402

from moejax.convert import from_hf  # noqa: E402
from moejax.convert.hf_losses import mixtral_aux_loss  # noqa: E402
from moejax.convert.hf_qwen_moe import config_from_hf, to_hf  # noqa: E402
from moejax.inference.decode import generate  # noqa: E402
from tests.convert.test_real_checkpoints import hf_greedy  # noqa: E402

IDS = np.random.default_rng(3).integers(0, 96, (2, 12))
STEPS = 5
COMMON = dict(vocab_size=96, hidden_size=32, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
              max_position_embeddings=64, num_experts=8, num_experts_per_tok=2, attn_implementation="eager")


def qwen2_moe(**kw):
    return transformers.Qwen2MoeForCausalLM(transformers.Qwen2MoeConfig(**{
        **COMMON, "intermediate_size": 48, "moe_intermediate_size": 16, "shared_expert_intermediate_size": 24,
        "rope_theta": 1e6, **kw}))


def qwen3_moe(**kw):
    return transformers.Qwen3MoeForCausalLM(transformers.Qwen3MoeConfig(**{
        **COMMON, "intermediate_size": 48, "moe_intermediate_size": 16, "head_dim": 16, "norm_topk_prob": True,
        "rope_theta": 1e6, **kw}))


def olmoe(**kw):
    return transformers.OlmoeForCausalLM(transformers.OlmoeConfig(**{**COMMON, "intermediate_size": 16, **kw}))


def perturbed(model):
    """Random init leaves norms at 1, biases at 0 and the router near-uniform (top-k decided by
    rounding): perturb so that every weight's mapping matters and routing is decisive."""
    torch.manual_seed(0)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "norm" in name or name.endswith("bias"):
                p.add_(0.1 * torch.randn_like(p))
            if name.endswith("mlp.gate.weight"):
                p.mul_(30.0)
    return model.eval()


def hf_logits(model, ids):
    with torch.no_grad():
        return model(input_ids=torch.tensor(ids)).logits.numpy()


CASES = {
    "qwen2_moe": lambda: qwen2_moe(),
    "qwen2_moe-step2-norm_topk": lambda: qwen2_moe(num_hidden_layers=4, decoder_sparse_step=2, norm_topk_prob=True),
    "qwen2_moe-no_qkv_bias": lambda: qwen2_moe(qkv_bias=False),
    "qwen3_moe": lambda: qwen3_moe(),
    "qwen3_moe-bias-tied": lambda: qwen3_moe(attention_bias=True, tie_word_embeddings=True, norm_topk_prob=False),
    "olmoe": lambda: olmoe(),
    "olmoe-clip-bias": lambda: olmoe(clip_qkv=0.3, attention_bias=True, norm_topk_prob=True),
}


@pytest.mark.parametrize("case", sorted(CASES))
def test_logits_greedy_and_export_match_transformers(tmp_path, case):
    torch.manual_seed(1)
    hf = perturbed(CASES[case]())
    hf.save_pretrained(tmp_path / "hf", safe_serialization=True)
    model, cfg = from_hf(str(tmp_path / "hf"))
    assert cfg.moe.dropless and cfg.moe.num_experts == 8
    logits, aux = model(jnp.asarray(IDS))
    np.testing.assert_allclose(np.asarray(logits), hf_logits(hf, IDS), atol=1e-4, rtol=1e-4)
    assert int(np.sum(aux.moe.num_dropped)) == 0
    # HF's load-balancing loss (all MoE layers' router logits pooled)
    with torch.no_grad():
        out = hf(input_ids=torch.tensor(IDS), output_router_logits=True)
    np.testing.assert_allclose(float(mixtral_aux_loss(aux.moe)), float(out.aux_loss), rtol=1e-5)
    np.testing.assert_array_equal(np.asarray(generate(model, jnp.asarray(IDS), STEPS)), hf_greedy(hf, IDS, STEPS))
    to_hf(model, str(tmp_path / "out"))
    back = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "out", attn_implementation="eager").eval()
    assert type(back) is type(hf)
    np.testing.assert_allclose(hf_logits(back, IDS), hf_logits(hf, IDS), atol=1e-5)


def test_configs_as_transformers_5_writes_them(tmp_path):
    """transformers 5: rope in ``rope_parameters`` (no top-level rope_theta), Qwen3-MoE's expert
    count as ``num_local_experts``, Qwen2-MoE's ``sliding_window: 0`` with sliding off, and
    ``layer_types``; built from a 4.57 save by rewriting its config.json as 5.x does."""
    hf = perturbed(qwen3_moe())
    hf.save_pretrained(tmp_path, safe_serialization=True)
    path = tmp_path / "config.json"
    c = json.loads(path.read_text())
    c["rope_parameters"] = {"rope_type": "default", "rope_theta": c.pop("rope_theta")}
    c.pop("rope_scaling", None)
    c["num_local_experts"] = c.pop("num_experts")
    c["layer_types"] = ["full_attention"] * c["num_hidden_layers"]
    path.write_text(json.dumps(c))
    model, cfg = from_hf(str(tmp_path))
    assert cfg.rope_theta == 1e6 and cfg.moe.num_experts == 8
    np.testing.assert_allclose(np.asarray(model(jnp.asarray(IDS))[0]), hf_logits(hf, IDS), atol=1e-4, rtol=1e-4)
    q2 = {**qwen2_moe().config.to_dict(), "sliding_window": 0, "use_sliding_window": False}
    q2["rope_parameters"] = {"rope_type": "default", "rope_theta": q2.pop("rope_theta")}
    q2.pop("rope_scaling", None)
    assert config_from_hf(q2).rope_theta == 1e6


def test_unsupported_fields_are_refused_by_name():
    base = {k: v for k, v in qwen2_moe().config.to_dict().items() if k != "attn_implementation"}
    with pytest.raises(ValueError, match="use_sliding_window=True"):
        config_from_hf({**base, "use_sliding_window": True})
    with pytest.raises(ValueError, match=r"mlp_only_layers=\[1\]"):
        config_from_hf({**base, "mlp_only_layers": [1]})
    with pytest.raises(ValueError, match="rope_scaling"):
        config_from_hf({**base, "rope_scaling": {"rope_type": "yarn", "factor": 4.0}})
    with pytest.raises(ValueError, match="shared_expert_intermediate_size=0"):
        config_from_hf({**base, "shared_expert_intermediate_size": 0})
    with pytest.raises(ValueError, match="not a multiple of decoder_sparse_step=2"):
        config_from_hf({**base, "num_hidden_layers": 3, "decoder_sparse_step": 2})
    with pytest.raises(ValueError, match=r"olmoe config.json has fields \['qkv_bias'\]"):
        config_from_hf({**olmoe().config.to_dict(), "qkv_bias": True})
    with pytest.raises(ValueError, match="head_dim=16, but OLMoE"):
        config_from_hf({**olmoe().config.to_dict(), "head_dim": 16})
    with pytest.raises(ValueError, match="does not know: brand_new_field"):
        config_from_hf({**base, "brand_new_field": 1})
