"""Checkpoint variants real users bring (issue 15): T5 v1.0 dense and v1.1 gated, Mistral export with
a sliding window, NLLB with an untied head or a fixed eval capacity, configs in the layout
transformers 5 writes. Each against ``transformers`` itself: logits (f32, non-padded positions) and
greedy tokens."""

import json

import numpy as np
import pytest

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")

import jax.numpy as jnp  # noqa: E402

from moejax.convert import from_hf  # noqa: E402
from moejax.inference.decode import generate, generate_encdec  # noqa: E402
from tests.convert.test_hf_nllb import tiny_nllb as nllb_fixture  # noqa: E402

RNG = np.random.default_rng(0)
ENC = RNG.integers(3, 96, (2, 11))
DEC = RNG.integers(3, 96, (2, 7))
IDS = RNG.integers(0, 96, (2, 12))
STEPS = 5


def perturbed(model, seed=0, router_scale=30.0):
    """Random-init norms are 1 and routers near-uniform: perturb so every weight's mapping matters."""
    torch.manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "norm" in name or name.endswith("bias"):
                p.add_(0.1 * torch.randn_like(p))
            if "router" in name:
                p.mul_(router_scale)
    return model.eval()


def hf_greedy_encdec(model, enc, start, n):
    dec = torch.full((enc.shape[0], 1), start)
    with torch.no_grad():
        for _ in range(n):
            nxt = model(input_ids=torch.tensor(enc), decoder_input_ids=dec).logits[:, -1].argmax(-1)
            dec = torch.cat([dec, nxt[:, None]], 1)
    return dec[:, 1:].numpy()


def hf_greedy(model, ids, n):
    x = torch.tensor(ids)
    with torch.no_grad():
        for _ in range(n):
            x = torch.cat([x, model(input_ids=x).logits[:, -1].argmax(-1)[:, None]], 1)
    return x.numpy()


def check_encdec(hf, path, start):
    model, cfg = from_hf(str(path))
    logits, _ = model(jnp.asarray(ENC), jnp.asarray(DEC), deterministic=True)
    with torch.no_grad():
        ref = hf(input_ids=torch.tensor(ENC), decoder_input_ids=torch.tensor(DEC)).logits.numpy()
    np.testing.assert_allclose(np.asarray(logits), ref, atol=1e-4, rtol=1e-4)
    toks = generate_encdec(model, jnp.asarray(ENC), STEPS, start_id=start)
    np.testing.assert_array_equal(np.asarray(toks), hf_greedy_encdec(hf, ENC, start, STEPS))
    return model, cfg


def rewrite_config(path, drop=(), **set_):
    cfg = json.loads((path / "config.json").read_text())
    for k in drop:
        cfg.pop(k, None)
    cfg.update(set_)
    (path / "config.json").write_text(json.dumps(cfg))


# ------------------------------------------------------------------------------------------- T5

def tiny_t5(**kw):
    cfg = dict(vocab_size=96, d_model=32, d_kv=8, d_ff=48, num_layers=2, num_decoder_layers=3, num_heads=4,
               relative_attention_num_buckets=8, relative_attention_max_distance=20, dropout_rate=0.0,
               decoder_start_token_id=0, pad_token_id=0, eos_token_id=1)
    cfg.update(kw)
    torch.manual_seed(0)
    return perturbed(transformers.T5ForConditionalGeneration(transformers.T5Config(**cfg)))


def test_t5_v1_0_dense_relu(tmp_path):
    """T5 v1.0: DenseReluDense.{wi,wo}, tied embeddings, decoder output scaled by d_model**-0.5."""
    hf = tiny_t5()
    hf.save_pretrained(tmp_path, safe_serialization=True)
    _, cfg = check_encdec(hf, tmp_path, 0)
    assert cfg.moe is None and cfg.activation == "relu" and cfg.tie_embeddings and cfg.scale_tied_logits


def test_t5_v1_1_gated_gelu_untied(tmp_path):
    """T5 v1.1 / switch-xxl's FFN: DenseGatedActDense wi_0 (gelu_new), wi_1, wo; untied lm_head."""
    hf = tiny_t5(feed_forward_proj="gated-gelu", tie_word_embeddings=False)
    hf.save_pretrained(tmp_path, safe_serialization=True)
    _, cfg = check_encdec(hf, tmp_path, 0)
    assert cfg.activation == "gated-gelu" and not cfg.tie_embeddings


def test_t5_v1_1_in_the_transformers_5_layout(tmp_path):
    """transformers 5 writes tie_word_embeddings=true for every T5 and the v1.1 no-scaling as
    scale_decoder_outputs=false; the stored lm_head differs from shared, so it is used."""
    hf = tiny_t5(feed_forward_proj="gated-gelu", tie_word_embeddings=False)
    hf.save_pretrained(tmp_path, safe_serialization=True)
    rewrite_config(tmp_path, drop=("torch_dtype",), tie_word_embeddings=True, scale_decoder_outputs=False,
                   dtype="float32", is_decoder=False, transformers_version="5.23.0")
    _, cfg = check_encdec(hf, tmp_path, 0)
    assert not cfg.tie_embeddings


def test_t5_refusals(tmp_path):
    from moejax.convert.hf_switch import config_from_hf

    base = dict(model_type="t5", vocab_size=8, d_model=8, d_kv=4, d_ff=16, num_layers=1, num_heads=2)
    with pytest.raises(ValueError, match="gated 'relu'"):
        config_from_hf({**base, "feed_forward_proj": "gated-relu"})
    with pytest.raises(ValueError, match="does not implement"):
        config_from_hf({**base, "model_type": "switch_transformers", "is_gated_act": True})
    with pytest.raises(ValueError, match="feed_forward_proj='relu' but is_gated_act=True"):
        config_from_hf({**base, "feed_forward_proj": "relu", "is_gated_act": True})


# -------------------------------------------------------------------------------------- Mistral

def tiny_mistral(window=4):
    cfg = transformers.MistralConfig(vocab_size=96, hidden_size=32, intermediate_size=48, num_hidden_layers=2,
                                     num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64,
                                     sliding_window=window, attn_implementation="eager")
    torch.manual_seed(2)
    return perturbed(transformers.MistralForCausalLM(cfg))


def test_mistral_export_keeps_the_sliding_window(tmp_path):
    """HF Mistral (window 4 < 12 tokens) -> moejax -> to_hf: the export is a Mistral again, and its
    logits equal the original's (a Llama export would ignore the window)."""
    from moejax.convert.hf_mixtral import to_hf

    hf = tiny_mistral()
    hf.save_pretrained(tmp_path / "hf", safe_serialization=True)
    model, cfg = from_hf(str(tmp_path / "hf"))
    assert cfg.sliding_window == 4
    np.testing.assert_array_equal(np.asarray(generate(model, jnp.asarray(IDS), STEPS)), hf_greedy(hf, IDS, STEPS))
    to_hf(model, str(tmp_path / "out"))
    back = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "out", attn_implementation="eager").eval()
    assert type(back).__name__ == "MistralForCausalLM" and back.config.sliding_window == 4
    with torch.no_grad():
        a = hf(input_ids=torch.tensor(IDS)).logits.numpy()
        b = back(input_ids=torch.tensor(IDS)).logits.numpy()
    np.testing.assert_allclose(b, a, atol=1e-5, rtol=1e-5)
    np.testing.assert_allclose(np.asarray(model(jnp.asarray(IDS))[0]), a, atol=1e-4, rtol=1e-4)


def test_mistral_config_defaults_follow_transformers():
    """A field the file leaves out takes the transformers class default (Mistral: window 4096,
    eps 1e-6; Mixtral: RoPE base 1e6)."""
    from moejax.convert.hf_mixtral import config_from_hf

    base = dict(hidden_size=32, num_attention_heads=8, num_hidden_layers=1, vocab_size=8, intermediate_size=16)
    cfg = config_from_hf({**base, "model_type": "mistral"})
    assert (cfg.sliding_window, cfg.norm_eps, cfg.rope_theta) == (4096, 1e-6, 1e4)
    cfg = config_from_hf({**base, "model_type": "mixtral"})
    assert (cfg.sliding_window, cfg.norm_eps, cfg.rope_theta, cfg.moe.num_experts) == (None, 1e-5, 1e6, 8)


# ------------------------------------------------------------------------------------------ NLLB

def tiny_nllb(**kw):
    return nllb_fixture(**{"encoder_layers": 2, "decoder_layers": 2, **kw})


def test_nllb_untied_lm_head(tmp_path):
    hf = tiny_nllb(tie_word_embeddings=False)
    with torch.no_grad():                          # an untied head that really differs
        hf.lm_head.weight.copy_(torch.randn_like(hf.lm_head.weight))
    hf.save_pretrained(tmp_path, safe_serialization=True)
    _, cfg = check_encdec(hf, tmp_path, 2)
    assert not cfg.tie_embeddings


@pytest.mark.parametrize("frac", [0.0, -1.0])
def test_nllb_eval_with_the_fixed_expert_capacity(tmp_path, frac):
    """moe_eval_capacity_token_fraction <= 0: transformers uses expert_capacity in eval (drops here)."""
    hf = tiny_nllb(moe_eval_capacity_token_fraction=frac, expert_capacity=3)
    hf.save_pretrained(tmp_path, safe_serialization=True)
    model, cfg = from_hf(str(tmp_path))
    assert cfg.moe.expert_capacity == 3
    logits, aux = model(jnp.asarray(ENC), jnp.asarray(DEC), deterministic=True)
    assert int(np.sum(aux.encoder.num_dropped)) > 0          # the capacity binds
    with torch.no_grad():
        ref = hf(input_ids=torch.tensor(ENC), decoder_input_ids=torch.tensor(DEC)).logits.numpy()
    np.testing.assert_allclose(np.asarray(logits), ref, atol=1e-4, rtol=1e-4)


def test_nllb_eval_fraction_without_capacity_is_refused():
    from moejax.convert.hf_nllb import config_from_hf

    hf = transformers.NllbMoeConfig(vocab_size=8, d_model=8, encoder_layers=1, decoder_layers=1, encoder_ffn_dim=8,
                                    decoder_ffn_dim=8, encoder_attention_heads=2, decoder_attention_heads=2,
                                    encoder_sparse_step=1, decoder_sparse_step=1).to_dict()
    with pytest.raises(ValueError, match="expert_capacity=null"):
        config_from_hf({**hf, "moe_eval_capacity_token_fraction": 0.0, "expert_capacity": None})


# ----------------------------------------------------------------------- transformers 5 configs

def tiny_mixtral(**kw):
    cfg = dict(vocab_size=96, hidden_size=32, intermediate_size=48, num_hidden_layers=2, num_attention_heads=4,
               num_key_value_heads=2, num_local_experts=4, num_experts_per_tok=2, max_position_embeddings=64,
               rope_theta=5e5, tie_word_embeddings=False, attn_implementation="eager")
    cfg.update(kw)
    torch.manual_seed(0)
    return perturbed(transformers.MixtralForCausalLM(transformers.MixtralConfig(**cfg)))


def test_mixtral_in_the_transformers_5_layout(tmp_path):
    """5.x: rope_theta moves into rope_parameters (no top-level key); reading it is what keeps the
    RoPE base (5e5 here; a reader falling back to a default gets other logits)."""
    hf = tiny_mixtral()
    hf.save_pretrained(tmp_path, safe_serialization=True)
    rewrite_config(tmp_path, drop=("rope_theta", "torch_dtype"), dtype="float32", transformers_version="5.23.0",
                   rope_parameters={"rope_theta": 5e5, "rope_type": "default"})
    model, cfg = from_hf(str(tmp_path))
    assert cfg.rope_theta == 5e5
    with torch.no_grad():
        ref = hf(input_ids=torch.tensor(IDS)).logits.numpy()
    np.testing.assert_allclose(np.asarray(model(jnp.asarray(IDS))[0]), ref, atol=1e-4, rtol=1e-4)
    np.testing.assert_array_equal(np.asarray(generate(model, jnp.asarray(IDS), STEPS)), hf_greedy(hf, IDS, STEPS))


@pytest.mark.parametrize("layout", ["rope_parameters", "rope_scaling"])
def test_rope_scaling_in_both_layouts(tmp_path, layout):
    """llama3 scaling is read from either layout; a scaling moejax does not implement is refused."""
    from moejax.convert.hf_mixtral import config_from_hf

    hf = transformers.MixtralConfig(hidden_size=32, num_attention_heads=8, num_hidden_layers=1, vocab_size=8,
                                    intermediate_size=16).to_dict()
    llama3 = {"rope_type": "llama3", "rope_theta": 5e5, "factor": 8.0, "low_freq_factor": 1.0,
              "high_freq_factor": 4.0, "original_max_position_embeddings": 8192}
    cfg = config_from_hf({**hf, "rope_theta": 5e5, layout: llama3})
    assert (cfg.rope_scaling.original_max_position, cfg.rope_theta) == (8192, 5e5)
    dynamic = {"rope_type": "dynamic", "rope_theta": 5e5, "factor": 2.0}
    with pytest.raises(ValueError, match=f"{layout}=.*dynamic.*rope_type 'default', 'llama3'"):
        config_from_hf({**hf, layout: dynamic})


# ------------------------------------------------------------------------ every field decided

CLASSES = {"hf_mixtral": ("MixtralConfig", "MistralConfig", "LlamaConfig"),
           "hf_switch": ("T5Config", "SwitchTransformersConfig"), "hf_nllb": ("NllbMoeConfig",),
           "hf_qwen_moe": ("Qwen2MoeConfig", "Qwen3MoeConfig", "OlmoeConfig"),
           "hf_deepseek": ("DeepseekV2Config", "DeepseekV3Config"), "hf_gpt_oss": ("GptOssConfig",)}
# what transformers 5.23 writes beyond 4.57's fields (the keys of each class's to_dict() in 5.23 that
# 4.57's lacks, plus the saved ``dtype``)
TRANSFORMERS_5_FIELDS = {"hf_mixtral": ("rope_parameters", "dtype"), "hf_switch": ("scale_decoder_outputs", "dtype"),
                         "hf_nllb": ("dtype",),
                         "hf_qwen_moe": ("layer_types", "rope_parameters", "num_local_experts", "dtype"),
                         "hf_deepseek": ("output_router_logits", "pretraining_tp", "qk_head_dim", "rope_parameters",
                                         "num_nextn_predict_layers", "dtype"),
                         "hf_gpt_oss": ("rope_parameters", "swiglu_alpha", "swiglu_limit", "dtype")}


@pytest.mark.parametrize("module", sorted(CLASSES))
def test_every_config_field_is_honoured_inert_or_refused(module):
    """A field transformers adds shows up here as a failure, not as silent drift."""
    import importlib

    fields = importlib.import_module(f"moejax.convert.{module}").FIELDS
    for cls in CLASSES[module]:
        keys = set(getattr(transformers, cls)().to_dict()) | set(TRANSFORMERS_5_FIELDS[module])
        assert not keys - fields.known(), (cls, sorted(keys - fields.known()))


def test_unknown_and_unsupported_fields_are_refused_by_name(tmp_path):
    from moejax.convert.hf_mixtral import config_from_hf

    hf = transformers.MixtralConfig(hidden_size=32, num_attention_heads=8, num_hidden_layers=1, vocab_size=8,
                                    intermediate_size=16).to_dict()
    with pytest.raises(ValueError, match=r"not know: quantization_config; .*ignore_fields=\('quantization_config',\)"):
        config_from_hf({**hf, "quantization_config": {"quant_method": "gptq"}})
    assert config_from_hf({**hf, "my_note": "x"}, ignore_fields=("my_note",)).moe.num_experts == 8
    with pytest.raises(ValueError, match="hidden_act='gelu'.*supported: hidden_act='silu'"):
        config_from_hf({**hf, "hidden_act": "gelu"})
    with pytest.raises(ValueError, match="pruned_heads"):
        config_from_hf({**hf, "pruned_heads": {"0": [1]}})


def test_one_entry_point_for_every_family(tmp_path):
    (tmp_path / "config.json").write_text('{"model_type": "bert"}')
    with pytest.raises(ValueError, match="model_type='bert'.*supported: deepseek_v2, deepseek_v3, gpt_oss, kimi_k2, "
                                         "llama, mistral, mixtral, nllb-moe, olmoe, qwen2_moe, qwen3_moe, "
                                         "switch_transformers, t5"):
        from_hf(str(tmp_path))
