"""Mixtral / Llama conversion: logits parity with transformers (PyTorch, CPU, float32)."""

import numpy as np
import pytest

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")

import jax.numpy as jnp  # noqa: E402

from moejax.convert.hf_mixtral import from_hf, to_hf  # noqa: E402


def tiny_mixtral(**kw):
    cfg = dict(vocab_size=96, hidden_size=32, intermediate_size=48, num_hidden_layers=2, num_attention_heads=4,
               num_key_value_heads=2, num_local_experts=4, num_experts_per_tok=2, max_position_embeddings=64,
               rope_theta=1e6, sliding_window=None, tie_word_embeddings=False, attn_implementation="eager")
    cfg.update(kw)
    torch.manual_seed(0)
    model = transformers.MixtralForCausalLM(transformers.MixtralConfig(**cfg)).eval()
    # random init leaves the norms at 1; perturb them so the mapping of every weight matters
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "norm" in name:
                p.add_(0.1 * torch.randn_like(p))
    return model


def tiny_llama(**kw):
    cfg = dict(vocab_size=96, hidden_size=32, intermediate_size=48, num_hidden_layers=2, num_attention_heads=4,
               num_key_value_heads=1, max_position_embeddings=64, tie_word_embeddings=False,
               attn_implementation="eager")
    cfg.update(kw)
    torch.manual_seed(1)
    return transformers.LlamaForCausalLM(transformers.LlamaConfig(**cfg)).eval()


def hf_logits(model, ids, mask=None):
    with torch.no_grad():
        out = model(input_ids=torch.tensor(ids), attention_mask=None if mask is None else torch.tensor(mask))
    return out.logits.numpy()


IDS = np.random.default_rng(0).integers(0, 96, (2, 12))


@pytest.mark.parametrize("kw", [{}, {"sliding_window": 4}, {"tie_word_embeddings": True}, {"num_experts_per_tok": 1}],
                         ids=["base", "sliding4", "tied", "top1"])
def test_mixtral_logits_match(tmp_path, kw):
    hf = tiny_mixtral(**kw)
    hf.save_pretrained(tmp_path, safe_serialization=True)
    model, cfg = from_hf(str(tmp_path))
    assert cfg.moe.top_k == hf.config.num_experts_per_tok and cfg.moe.dropless
    logits, aux = model(jnp.asarray(IDS), deterministic=True)
    np.testing.assert_allclose(np.asarray(logits), hf_logits(hf, IDS), atol=1e-4, rtol=1e-4)
    assert int(np.sum(aux.moe.num_dropped)) == 0


def test_llama_logits_match(tmp_path):
    hf = tiny_llama()
    hf.save_pretrained(tmp_path, safe_serialization=True)
    model, cfg = from_hf(str(tmp_path))
    assert cfg.moe is None
    logits, _ = model(jnp.asarray(IDS))
    np.testing.assert_allclose(np.asarray(logits), hf_logits(hf, IDS), atol=1e-4, rtol=1e-4)


def test_mixtral_export_roundtrip(tmp_path):
    hf = tiny_mixtral()
    hf.save_pretrained(tmp_path / "a", safe_serialization=True)
    model, _ = from_hf(str(tmp_path / "a"))
    to_hf(model, str(tmp_path / "b"))
    back = transformers.MixtralForCausalLM.from_pretrained(str(tmp_path / "b"), attn_implementation="eager").eval()
    np.testing.assert_allclose(hf_logits(back, IDS), hf_logits(hf, IDS), atol=1e-5)


def test_mismatched_checkpoint_errors(tmp_path):
    hf = tiny_mixtral()
    hf.save_pretrained(tmp_path, safe_serialization=True)
    with pytest.raises(ValueError, match="missing .* weights"):
        from_hf(str(tmp_path), num_layers=3)
    (tmp_path / "empty").mkdir()
    with pytest.raises(ValueError, match="no config.json"):
        from_hf(str(tmp_path / "empty"))
    bert = tmp_path / "bert"
    bert.mkdir()
    (bert / "config.json").write_text('{"model_type": "bert"}')
    with pytest.raises(ValueError, match="model_type='bert'; this converter reads mixtral, mistral, llama"):
        from_hf(str(bert))


def test_convert_cli_writes_orbax_checkpoint(tmp_path):
    from moejax import checkpoint
    from moejax.main import main

    hf = tiny_mixtral()
    hf.save_pretrained(tmp_path / "hf", safe_serialization=True)
    assert main(["convert", "--hf_dir", str(tmp_path / "hf"), "--out", str(tmp_path / "ck")]) == 0
    model = checkpoint.load(str(tmp_path / "ck"))
    logits, _ = model(jnp.asarray(IDS))
    np.testing.assert_allclose(np.asarray(logits), hf_logits(hf, IDS), atol=1e-4, rtol=1e-4)


def test_mixtral_aux_loss_matches_hf(tmp_path):
    from moejax.convert.hf_losses import mixtral_aux_loss

    hf = tiny_mixtral()
    hf.save_pretrained(tmp_path, safe_serialization=True)
    model, _ = from_hf(str(tmp_path))
    _, aux = model(jnp.asarray(IDS))
    with torch.no_grad():
        out = hf(input_ids=torch.tensor(IDS), output_router_logits=True)
    np.testing.assert_allclose(float(mixtral_aux_loss(aux.moe)), float(out.aux_loss), rtol=1e-5)
    # router logits: the per-layer z-loss equals logsumexp^2 of HF's router logits
    for layer, logits in enumerate(out.router_logits):
        z = torch.logsumexp(logits.float(), -1).pow(2).mean().item()
        np.testing.assert_allclose(float(aux.moe.router_z_loss[layer]), z, rtol=1e-5)


def test_unsupported_config_features_are_refused():
    from moejax.convert.hf_mixtral import config_from_hf

    base = dict(model_type="llama", hidden_size=32, num_attention_heads=4, num_hidden_layers=1, vocab_size=8,
                intermediate_size=16)
    with pytest.raises(ValueError, match=r"llama3 rope scaling with missing fields: \['high_freq_factor'"):
        config_from_hf({**base, "rope_scaling": {"rope_type": "llama3", "factor": 8.0}})
    with pytest.raises(ValueError, match="rope_type 'default', 'llama3'"):
        config_from_hf({**base, "rope_scaling": {"rope_type": "linear", "factor": 2.0}})
    with pytest.raises(ValueError, match="attention_bias"):
        config_from_hf({**base, "attention_bias": True})
    assert config_from_hf({**base, "rope_scaling": None}).num_kv_heads == 4


def test_llama3_rope_scaling_matches_transformers(tmp_path):
    """Llama 3.1's ``rope_type: llama3`` (40 tokens past an original length of 64 / 4: every band of
    the blend is used): logits equal transformers' (and differ from plain RoPE's), the moejax
    checkpoint keeps the scaling, and the export is read back by transformers as the same model."""
    from moejax.checkpoint import load, save
    from moejax.convert import to_hf as export

    rope = {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
            "original_max_position_embeddings": 64}
    hf = tiny_llama(hidden_size=64, num_attention_heads=2, rope_theta=5e5, max_position_embeddings=256,
                    rope_scaling=rope)
    ids = np.random.default_rng(2).integers(0, 96, (2, 40))
    plain = tiny_llama(hidden_size=64, num_attention_heads=2, rope_theta=5e5, max_position_embeddings=256)
    plain.load_state_dict(hf.state_dict())
    assert np.abs(hf_logits(plain, ids) - hf_logits(hf, ids)).max() > 1e-3       # the scaling matters here
    hf.save_pretrained(tmp_path / "hf", safe_serialization=True)
    model, cfg = from_hf(str(tmp_path / "hf"))
    assert cfg.rope_scaling.factor == 8.0 and cfg.rope_theta == 5e5
    np.testing.assert_allclose(np.asarray(model(jnp.asarray(ids))[0]), hf_logits(hf, ids), atol=1e-4, rtol=1e-4)
    save(model, str(tmp_path / "ckpt"))
    assert load(str(tmp_path / "ckpt")).cfg.rope_scaling == cfg.rope_scaling
    assert export(model, str(tmp_path / "out")) == "llama"
    back = transformers.AutoModelForCausalLM.from_pretrained(str(tmp_path / "out"), attn_implementation="eager")
    np.testing.assert_allclose(hf_logits(back.eval(), ids), hf_logits(hf, ids), atol=1e-5, rtol=1e-5)
