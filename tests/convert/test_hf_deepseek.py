"""DeepSeek-V2 and V3 against transformers (PyTorch, CPU, float32): tiny random models saved by
transformers' own classes -> moejax (MLA with interleaved RoPE, YaRN, the dense first layers,
group-limited routing, V3's sigmoid scores and selection bias): logits, greedy tokens (moejax
decodes with its latent KV cache, HF without); moejax -> to_hf -> transformers reloads the same
model; refused fields."""

import numpy as np
import pytest

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")

import jax.numpy as jnp  # noqa: E402

from moejax.convert import from_hf  # noqa: E402
from moejax.convert.hf_deepseek import config_from_hf, to_hf  # noqa: E402
from moejax.inference.decode import generate  # noqa: E402
from tests.convert.test_hf_qwen_moe import hf_logits  # noqa: E402
from tests.convert.test_real_checkpoints import hf_greedy  # noqa: E402

IDS = np.random.default_rng(4).integers(0, 96, (2, 12))
STEPS = 4
COMMON = dict(vocab_size=96, hidden_size=32, intermediate_size=48, moe_intermediate_size=16, num_hidden_layers=3,
              num_attention_heads=4, num_key_value_heads=4, n_routed_experts=8, num_experts_per_tok=2,
              kv_lora_rank=16, qk_nope_head_dim=8, qk_rope_head_dim=8, v_head_dim=12, first_k_dense_replace=1,
              max_position_embeddings=64, attn_implementation="eager")
YARN = {"type": "yarn", "rope_type": "yarn", "factor": 4.0, "original_max_position_embeddings": 16,
        "beta_fast": 32.0, "beta_slow": 1.0, "mscale": 1.0, "mscale_all_dim": 1.0}


def v2(**kw):
    return transformers.DeepseekV2ForCausalLM(transformers.DeepseekV2Config(**{
        **COMMON, "n_shared_experts": 2, "q_lora_rank": None, "routed_scaling_factor": 1.0, **kw}))


def v3(**kw):
    return transformers.DeepseekV3ForCausalLM(transformers.DeepseekV3Config(**{
        **COMMON, "n_shared_experts": 1, "q_lora_rank": 24, "n_group": 4, "topk_group": 2,
        "routed_scaling_factor": 2.5, "norm_topk_prob": True, **kw}))


def perturbed(model):
    """Norms off 1, a decisive router and (V3) a small non-zero selection bias."""
    torch.manual_seed(0)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "norm" in name:
                p.add_(0.1 * torch.randn_like(p))
            if name.endswith("mlp.gate.weight"):
                p.mul_(30.0)
        for name, b in model.named_buffers():
            if name.endswith("e_score_correction_bias"):
                b.copy_(0.05 * torch.randn_like(b))
    return model.eval()


CASES = {
    "v2_lite_greedy": lambda: v2(),
    "v2_group_limited_q_lora": lambda: v2(q_lora_rank=24, n_group=4, topk_group=2, topk_method="group_limited_greedy",
                                         routed_scaling_factor=3.0),
    "v3": lambda: v3(),
    "v3_yarn_tied": lambda: v3(rope_scaling=YARN, tie_word_embeddings=True),
    "v3_not_interleaved": lambda: v3(rope_interleave=False, first_k_dense_replace=2),
}


@pytest.mark.parametrize("case", sorted(CASES))
def test_logits_greedy_and_export_match_transformers(tmp_path, case):
    torch.manual_seed(1)
    hf = perturbed(CASES[case]())
    hf.save_pretrained(tmp_path / "hf", safe_serialization=True)
    model, cfg = from_hf(str(tmp_path / "hf"))
    assert cfg.attention == "mla" and cfg.moe.dropless and cfg.first_dense_layers == hf.config.first_k_dense_replace
    logits, aux = model(jnp.asarray(IDS))
    np.testing.assert_allclose(np.asarray(logits), hf_logits(hf, IDS), atol=1e-4, rtol=1e-4)
    assert int(np.sum(aux.moe.num_dropped)) == 0
    np.testing.assert_array_equal(np.asarray(generate(model, jnp.asarray(IDS), STEPS)), hf_greedy(hf, IDS, STEPS))
    if case == "v3_not_interleaved":
        return              # to_hf writes the interleaved layout every released checkpoint uses
    to_hf(model, str(tmp_path / "out"))
    back = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "out", attn_implementation="eager").eval()
    assert type(back) is type(hf)
    np.testing.assert_allclose(hf_logits(back, IDS), hf_logits(hf, IDS), atol=1e-5)


def test_kimi_k2_hub_layout_reads_as_deepseek_v3(tmp_path):
    """Kimi-K2's Hub checkpoints are DeepSeek-V3 models under ``model_type: kimi_k2`` with remote code:
    the same weights under that config give the V3 model (to_hf writes it back as deepseek_v3)."""
    import json

    torch.manual_seed(1)
    hf = perturbed(v3(n_group=1, topk_group=1, routed_scaling_factor=2.827, rope_scaling=YARN))
    hf.save_pretrained(tmp_path, safe_serialization=True)
    want = np.asarray(from_hf(str(tmp_path))[0](jnp.asarray(IDS))[0])
    conf = json.loads((tmp_path / "config.json").read_text())
    conf.update(model_type="kimi_k2", auto_map={"AutoConfig": "configuration_deepseek.DeepseekV3Config",
                                                "AutoModelForCausalLM": "modeling_deepseek.DeepseekV3ForCausalLM"})
    (tmp_path / "config.json").write_text(json.dumps(conf))
    model, cfg = from_hf(str(tmp_path))
    assert cfg.moe.router_score == "sigmoid" and cfg.moe.selection_bias and cfg.moe.routed_scale == 2.827
    np.testing.assert_array_equal(np.asarray(model(jnp.asarray(IDS))[0]), want)
    np.testing.assert_allclose(want, hf_logits(hf, IDS), atol=1e-4, rtol=1e-4)
    with pytest.raises(ValueError, match="kimi_k2 config.json has scoring_func='softmax'"):
        config_from_hf({**conf, "scoring_func": "softmax"})


@pytest.mark.parametrize("case", ["v3_yarn_tied"])     # q_lora, sigmoid + bias, groups, YaRN, tied head
def test_gradients_match_transformers(tmp_path, case):
    """Every parameter's gradient of a log-likelihood against torch autograd on the same model,
    mapped through the converter's own weight maps (linear: transposes, reshapes, the RoPE
    permutation). The V3 selection bias is a buffer in transformers (its slot carries the load)."""
    import jax
    from flax import nnx

    from moejax.convert.hf_deepseek import _block, _names, interleaved

    torch.manual_seed(1)
    hf = perturbed(CASES[case]())
    hf.save_pretrained(tmp_path, safe_serialization=True)
    model, cfg = from_hf(str(tmp_path))
    hf.zero_grad()
    torch.log_softmax(hf(input_ids=torch.tensor(IDS)).logits, -1)[..., 3].sum().backward()
    theirs = {n: np.zeros(tuple(p.shape), np.float32) if p.grad is None else p.grad.numpy()   # unused experts
              for n, p in hf.named_parameters()}
    graphdef, params, rest = nnx.split(model, nnx.Param, ...)
    grads = jax.grad(lambda p: jnp.sum(jax.nn.log_softmax(nnx.merge(graphdef, p, rest)(jnp.asarray(IDS))[0])[..., 3]))(
        params)
    ours = {"/".join(map(str, k)): np.asarray(v[...]) for k, v in nnx.to_flat_state(grads)}
    checked = 0
    for i in range(cfg.num_layers):
        block, layer = _block(cfg, i)
        for path, name, fn, _ in _names(cfg, i, interleaved(hf.config.to_dict())):
            fn = fn or (lambda w: w)
            if isinstance(name, str) and name not in theirs:
                assert name.endswith("e_score_correction_bias")
                continue
            want = np.stack([fn(theirs[n]) for n in name]) if isinstance(name, list) else fn(theirs[name])
            got = ours[block + path][layer]
            np.testing.assert_allclose(got, want, rtol=1e-3, atol=1e-5 * float(np.abs(want).max() + 1e-30),
                                       err_msg=f"{name if isinstance(name, str) else name[0]}")
            checked += 1
    np.testing.assert_allclose(ours["embed/embedding"], theirs["model.embed_tokens.weight"], rtol=1e-3, atol=1e-6)
    assert checked >= 10 * cfg.num_layers - 8


def test_v2_yarn_applies_deepseeks_softmax_scale(tmp_path):
    """With YaRN, DeepSeek's code and transformers 5 scale the scores by mscale^2; transformers
    4.57's V2 does not. moejax follows DeepSeek: equal to 4.57 once its module scale is fixed."""
    torch.manual_seed(1)
    hf = perturbed(v2(rope_scaling=YARN))
    hf.save_pretrained(tmp_path, safe_serialization=True)
    model, cfg = from_hf(str(tmp_path))
    m = 0.1 * 1.0 * np.log(4.0) + 1.0
    assert cfg.attn_scale == pytest.approx(16 ** -0.5 * m * m)
    for layer in hf.model.layers:
        layer.self_attn.scaling = cfg.attn_scale
    np.testing.assert_allclose(np.asarray(model(jnp.asarray(IDS))[0]), hf_logits(hf, IDS), atol=1e-4, rtol=1e-4)


def test_unsupported_fields_are_refused_by_name():
    base = {k: v for k, v in v3().config.to_dict().items() if k != "attn_implementation"}
    base2 = {k: v for k, v in v2().config.to_dict().items() if k != "attn_implementation"}
    with pytest.raises(ValueError, match="attention_bias=True"):
        config_from_hf({**base, "attention_bias": True})
    with pytest.raises(ValueError, match="rope_type 'default', 'yarn'"):
        config_from_hf({**base, "rope_scaling": {"rope_type": "llama3", "factor": 8.0}})
    with pytest.raises(ValueError, match="num_key_value_heads=2"):
        config_from_hf({**base, "num_key_value_heads": 2})
    with pytest.raises(ValueError, match="topk_method='noaux_tc'"):
        config_from_hf({**base2, "topk_method": "noaux_tc"})
    with pytest.raises(ValueError, match="norm_topk_prob=true"):
        config_from_hf({**base2, "norm_topk_prob": True})
    with pytest.raises(ValueError, match="rope_interleave, which only deepseek_v3"):
        config_from_hf({**base2, "rope_interleave": True})
    with pytest.raises(ValueError, match="moe_layer_freq=2"):
        config_from_hf({**base, "moe_layer_freq": 2})
    with pytest.raises(ValueError, match="scoring_func='softmax'"):
        config_from_hf({**base, "scoring_func": "softmax"})
    with pytest.raises(ValueError, match="does not know: brand_new_field"):
        config_from_hf({**base, "brand_new_field": 1})


FP8_BLOCK = [32, 32]          # partial blocks on the 48- and 24-wide dims, as 128 on V3's 7168 x 2048 shapes


def _fp8_copy(src, dst, block):
    """``src``'s checkpoint with every 2-D weight but the embedding, head and routers in block-scaled
    FP8 (per-block amax / 448, as DeepSeek's), ``quantization_config`` set; returns the dequantised
    weights (float32 of their bf16 rounding), computed here with np.kron, not the library's code."""
    import json

    import ml_dtypes
    from safetensors.numpy import load_file
    from safetensors.torch import save_file

    tensors = load_file(str(src / "model.safetensors"))
    out, ref = {}, {}
    for name, w in tensors.items():
        if w.ndim != 2 or "embed_tokens" in name or "lm_head" in name or name.endswith("mlp.gate.weight"):
            out[name] = torch.from_numpy(w.copy())
            ref[name] = w
            continue
        r, c = w.shape
        nr, nc = -(-r // block[0]), -(-c // block[1])
        padded = np.zeros((nr * block[0], nc * block[1]), np.float32)
        padded[:r, :c] = w
        amax = np.abs(padded.reshape(nr, block[0], nc, block[1])).max(axis=(1, 3))
        scale = np.maximum(amax, 1e-12) / 448.0
        expand = np.kron(scale, np.ones(block, np.float32))[:r, :c]
        q = (w / expand).astype(ml_dtypes.float8_e4m3fn)
        out[name] = torch.from_numpy(q.view(np.uint8).copy()).view(torch.float8_e4m3fn)
        out[name + "_scale_inv"] = torch.from_numpy(scale.astype(np.float32))
        ref[name] = (q.astype(np.float32) * expand).astype(ml_dtypes.bfloat16).astype(np.float32)
    dst.mkdir()
    save_file(out, str(dst / "model.safetensors"), metadata={"format": "pt"})
    cfg = json.loads((src / "config.json").read_text())
    cfg["quantization_config"] = {"quant_method": "fp8", "fmt": "e4m3", "activation_scheme": "dynamic",
                                  "weight_block_size": list(block)}
    (dst / "config.json").write_text(json.dumps(cfg))
    return ref


def test_fp8_block_scaled_checkpoint_dequantises_on_import(tmp_path):
    """DeepSeek-V3's Hub format: e4m3 weights with a float32 scale_inv per block; the import equals
    transformers running the dequantised weights, and the bf16 default keeps its memory."""
    import json

    from safetensors.torch import save_file

    torch.manual_seed(1)
    hf = perturbed(v3())
    hf.save_pretrained(tmp_path / "hf", safe_serialization=True)
    ref = _fp8_copy(tmp_path / "hf", tmp_path / "fp8", FP8_BLOCK)
    # transformers on the dequantised weights (the reference), saved as a plain float32 checkpoint
    (tmp_path / "deq").mkdir()
    save_file({k: torch.from_numpy(np.ascontiguousarray(v)) for k, v in ref.items()},
              str(tmp_path / "deq" / "model.safetensors"), metadata={"format": "pt"})
    (tmp_path / "deq" / "config.json").write_text((tmp_path / "hf" / "config.json").read_text())
    deq = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "deq", attn_implementation="eager").eval()
    model, cfg = from_hf(str(tmp_path / "fp8"), dtype=jnp.float32)
    logits, _ = model(jnp.asarray(IDS))
    np.testing.assert_allclose(np.asarray(logits), hf_logits(deq, IDS), atol=1e-4, rtol=1e-4)
    assert not np.allclose(hf_logits(deq, IDS), hf_logits(hf, IDS), atol=1e-3)     # the FP8 rounding is real
    _, cfg16 = from_hf(str(tmp_path / "fp8"))
    assert jnp.dtype(cfg16.param_dtype) == jnp.bfloat16
    good = json.loads((tmp_path / "fp8" / "config.json").read_text())
    for bad, match in (({"fmt": "e5m2"}, "fmt='e5m2'"), ({"weight_block_size": [128]}, "weight_block_size=\\[128\\]"),
                       ({"activation_scheme": "static"}, "activation_scheme='static'"),
                       ({"quant_method": "gptq"}, "quant_method='gptq'"), ({"bits": 4}, "does not know: bits")):
        (tmp_path / "fp8" / "config.json").write_text(json.dumps(
            {**good, "quantization_config": {**good["quantization_config"], **bad}}))
        with pytest.raises(ValueError, match=match):
            from_hf(str(tmp_path / "fp8"))
    (tmp_path / "fp8" / "config.json").write_text(json.dumps(
        {**good, "quantization_config": {**good["quantization_config"], "weight_block_size": [16, 16]}}))
    with pytest.raises(ValueError, match=r"FP8 tensor '.*': scale_inv of shape .* does not cover"):
        from_hf(str(tmp_path / "fp8"))


def test_yarn_with_equal_betas_matches_transformers(tmp_path):
    """Kimi-K2's released YaRN has beta_fast = beta_slow = 1 (the ramp spans one dim)."""
    hf = perturbed(v3(rope_scaling={**YARN, "beta_fast": 1.0, "beta_slow": 1.0}))
    hf.save_pretrained(tmp_path, safe_serialization=True)
    model, cfg = from_hf(str(tmp_path))
    assert (cfg.rope_scaling.beta_fast, cfg.rope_scaling.beta_slow) == (1.0, 1.0)
    np.testing.assert_allclose(np.asarray(model(jnp.asarray(IDS))[0]), hf_logits(hf, IDS), atol=1e-4, rtol=1e-4)
