"""NLLB-MoE conversion: logits parity with transformers (eval: EOM scaling, top-2 'kept' weights)."""

import numpy as np
import pytest

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")

import jax.numpy as jnp  # noqa: E402

from moejax.convert.hf_nllb import from_hf  # noqa: E402


def tiny_nllb(**kw):
    cfg = dict(vocab_size=96, d_model=32, encoder_layers=4, decoder_layers=4, encoder_ffn_dim=48,
               decoder_ffn_dim=48, encoder_attention_heads=4, decoder_attention_heads=4, num_experts=4,
               encoder_sparse_step=2, decoder_sparse_step=2, expert_capacity=64, max_position_embeddings=64,
               dropout=0.0, attention_dropout=0.0, activation_dropout=0.0, moe_token_dropout=0.2,
               pad_token_id=1, bos_token_id=0, eos_token_id=2, decoder_start_token_id=2)
    cfg.update(kw)
    torch.manual_seed(0)
    model = transformers.NllbMoeForConditionalGeneration(transformers.NllbMoeConfig(**cfg)).eval()
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "layer_norm" in name or name.endswith("bias"):
                p.add_(0.1 * torch.randn_like(p))
            if "router" in name:
                p.mul_(30.0)
    return model


RNG = np.random.default_rng(0)
ENC = RNG.integers(3, 96, (2, 9))
DEC = RNG.integers(3, 96, (2, 6))


@pytest.mark.parametrize("kw", [{}, {"moe_token_dropout": 0.0}, {"encoder_sparse_step": 4, "decoder_sparse_step": 4}],
                         ids=["eom0.2", "no_eom", "every4"])
def test_nllb_logits_match(tmp_path, kw):
    hf = tiny_nllb(**kw)
    hf.save_pretrained(tmp_path, safe_serialization=True)
    model, cfg = from_hf(str(tmp_path))
    assert cfg.moe.top_k == 2 and cfg.moe.weight_norm == "kept"
    assert (cfg.pad_id, cfg.decoder_start_id) == (1, 2)        # from pad_token_id / decoder_start_token_id
    logits, aux = model(jnp.asarray(ENC), jnp.asarray(DEC), deterministic=True)
    with torch.no_grad():
        ref = hf(input_ids=torch.tensor(ENC), decoder_input_ids=torch.tensor(DEC)).logits.numpy()
    np.testing.assert_allclose(np.asarray(logits), ref, atol=1e-4, rtol=1e-4)
    assert int(np.sum(aux.encoder.num_dropped)) == 0  # eval capacity = all tokens


def test_nllb_wrong_model_type(tmp_path):
    (tmp_path / "config.json").write_text('{"model_type": "m2m_100"}')
    with pytest.raises(ValueError, match="model_type='m2m_100'; this converter reads nllb-moe"):
        from_hf(str(tmp_path))
