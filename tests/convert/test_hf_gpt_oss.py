"""gpt-oss against transformers (PyTorch, CPU, float32): tiny random models saved by transformers'
own class -> moejax (attention sinks, alternating sliding / full layers, YaRN, biased router,
clamped SwiGLU on the interleaved gate_up layout): logits, greedy tokens (moejax decodes with its
per-layer caches: a ring of the window for the sliding layers); an MXFP4 checkpoint written by the
test in the released format; moejax -> to_hf -> transformers reloads the same model; refusals."""

import json

import numpy as np
import pytest

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")

import jax.numpy as jnp  # noqa: E402

from moejax.convert import from_hf  # noqa: E402
from moejax.convert.hf_gpt_oss import config_from_hf, dequantize_mxfp4, to_hf  # noqa: E402
from moejax.inference.decode import generate  # noqa: E402
from tests.convert.test_hf_qwen_moe import hf_logits  # noqa: E402
from tests.convert.test_real_checkpoints import hf_greedy  # noqa: E402

IDS = np.random.default_rng(5).integers(0, 96, (2, 12))
STEPS = 5
YARN = {"rope_type": "yarn", "factor": 4.0, "beta_fast": 32.0, "beta_slow": 1.0, "truncate": False,
        "original_max_position_embeddings": 16}


def gpt_oss(**kw):
    return transformers.GptOssForCausalLM(transformers.GptOssConfig(**{
        "vocab_size": 96, "hidden_size": 32, "intermediate_size": 32, "num_hidden_layers": 4, "head_dim": 8,
        "num_attention_heads": 4, "num_key_value_heads": 2, "num_local_experts": 8, "num_experts_per_tok": 2,
        "sliding_window": 4, "max_position_embeddings": 64, "rope_scaling": YARN, "attn_implementation": "eager",
        **kw}))


def perturbed(model):
    """Random norms, biases and sinks, and expert weights large enough that the SwiGLU clamps bite."""
    torch.manual_seed(0)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "norm" in name:
                p.add_(0.1 * torch.randn_like(p))
            if name.endswith("bias") or name.endswith("sinks"):
                p.copy_(torch.randn_like(p))
            if name.endswith("router.weight"):
                p.mul_(30.0)
            if name.endswith("gate_up_proj"):
                p.copy_(2.0 * torch.randn_like(p))
    return model.eval()


CASES = {
    "alternating": lambda: gpt_oss(),
    "tied-all_full": lambda: gpt_oss(tie_word_embeddings=True, layer_types=["full_attention"] * 4),
}


@pytest.mark.parametrize("case", sorted(CASES))
def test_logits_greedy_and_export_match_transformers(tmp_path, case):
    torch.manual_seed(1)
    hf = perturbed(CASES[case]())
    hf.save_pretrained(tmp_path / "hf", safe_serialization=True)
    model, cfg = from_hf(str(tmp_path / "hf"))
    assert cfg.attention_sinks and cfg.moe.activation == "clamped-swiglu"
    assert cfg.window_pattern == ((4, None) if case == "alternating" else None)
    logits, aux = model(jnp.asarray(IDS))
    np.testing.assert_allclose(np.asarray(logits), hf_logits(hf, IDS), atol=1e-4, rtol=1e-4)
    assert int(np.sum(aux.moe.num_dropped)) == 0
    np.testing.assert_array_equal(np.asarray(generate(model, jnp.asarray(IDS), STEPS)), hf_greedy(hf, IDS, STEPS))
    to_hf(model, str(tmp_path / "out"))
    back = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "out", attn_implementation="eager").eval()
    assert type(back) is type(hf)
    np.testing.assert_allclose(hf_logits(back, IDS), hf_logits(hf, IDS), atol=1e-5)


def _fp4_value(code):
    """E2M1 by its definition: sign bit 3, exponent bits 1-2 (bias 1), mantissa bit 0."""
    sign = -1.0 if code & 8 else 1.0
    exp, man = (code >> 1) & 3, code & 1
    return sign * (man * 0.5 if exp == 0 else (1 + man * 0.5) * 2.0 ** (exp - 1))


def test_mxfp4_dequantization_by_definition():
    rng = np.random.default_rng(0)
    blocks = rng.integers(0, 256, (3, 5, 2, 16), dtype=np.uint8)
    scales = rng.integers(120, 134, (3, 5, 2), dtype=np.uint8)
    got = dequantize_mxfp4(blocks, scales)
    want = np.empty((3, 5, 64), np.float32)
    for idx in np.ndindex(3, 5, 2, 16):
        b, s = int(blocks[idx]), int(scales[idx[:3]])
        j = idx[2] * 32 + 2 * idx[3]
        want[idx[0], idx[1], j] = _fp4_value(b & 15) * 2.0 ** (s - 127)
        want[idx[0], idx[1], j + 1] = _fp4_value(b >> 4) * 2.0 ** (s - 127)
    np.testing.assert_array_equal(got, want)


def test_mxfp4_checkpoint_in_the_released_format(tmp_path):
    """Expert weights stored as ``*_blocks`` / ``*_scales`` (as the released gpt-oss checkpoints):
    moejax dequantises on import and matches transformers holding the same (dequantised) weights."""
    from safetensors.numpy import load_file, save_file

    torch.manual_seed(1)
    hf = perturbed(gpt_oss())
    rng = np.random.default_rng(1)
    stored = {}
    with torch.no_grad():
        for name, p in hf.named_parameters():
            if name.endswith("experts.gate_up_proj") or name.endswith("experts.down_proj"):
                e, i, o = p.shape                                 # HF layout [E, in, out]
                blocks = rng.integers(0, 256, (e, o, i // 32, 16), dtype=np.uint8)
                scales = rng.integers(124, 129, (e, o, i // 32), dtype=np.uint8)
                stored[name] = (blocks, scales)
                dense = np.stack([[[_fp4_value((int(blocks[a, r, c // 32, (c % 32) // 2]) >> (4 * (c % 2))) & 15)
                                    * 2.0 ** (int(scales[a, r, c // 32]) - 127) for c in range(i)]
                                   for r in range(o)] for a in range(e)]).astype(np.float32)
                p.copy_(torch.from_numpy(dense.transpose(0, 2, 1)))
    hf.save_pretrained(tmp_path, safe_serialization=True)
    f = tmp_path / "model.safetensors"
    tensors = load_file(f)
    for name, (blocks, scales) in stored.items():
        del tensors[name]
        tensors[name + "_blocks"], tensors[name + "_scales"] = blocks, scales
    save_file(tensors, f, metadata={"format": "pt"})
    c = json.loads((tmp_path / "config.json").read_text())
    c["quantization_config"] = {"quant_method": "mxfp4", "modules_to_not_convert": ["model.layers.*.self_attn"]}
    (tmp_path / "config.json").write_text(json.dumps(c))
    model, _ = from_hf(str(tmp_path))
    np.testing.assert_allclose(np.asarray(model(jnp.asarray(IDS))[0]), hf_logits(hf, IDS), atol=1e-4, rtol=1e-4)


def test_unsupported_fields_are_refused_by_name():
    base = {k: v for k, v in gpt_oss().config.to_dict().items() if k != "attn_implementation"}
    with pytest.raises(ValueError, match="attention_bias=False"):
        config_from_hf({**base, "attention_bias": False})
    with pytest.raises(ValueError, match="swiglu_limit=5.0"):
        config_from_hf({**base, "swiglu_limit": 5.0})
    with pytest.raises(ValueError, match="quant_method='fp8'"):
        config_from_hf({**base, "quantization_config": {"quant_method": "fp8"}})
    with pytest.raises(ValueError, match="layer_types"):
        config_from_hf({**base, "layer_types": ["sliding_attention", "chunked_attention"] * 2})
    with pytest.raises(ValueError, match="rope_type 'default', 'yarn'"):
        config_from_hf({**base, "rope_scaling": {"rope_type": "llama3", "factor": 8.0}})
    with pytest.raises(ValueError, match="does not know: brand_new_field"):
        config_from_hf({**base, "brand_new_field": 1})
