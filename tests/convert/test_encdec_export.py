"""Encoder-decoder export (moejax -> Hugging Face): T5 v1.0 / v1.1, Switch Transformers (with and
without capacity drops, router bias) and NLLB-MoE. A model transformers saved is imported, exported
by ``to_hf`` (in float32 and bfloat16) and reloaded by ``transformers`` itself: its logits equal the
original's. A zoo model that routes the T5X way is exported with a fixed ``expert_capacity``; what
HF cannot represent is refused by name."""

import json

import numpy as np
import pytest

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")

import jax.numpy as jnp  # noqa: E402
from flax import nnx  # noqa: E402

from moejax.convert import from_hf, hf_nllb, hf_switch  # noqa: E402
from moejax.models.build import build_model  # noqa: E402
from moejax.models.registry import get_config  # noqa: E402
from tests.convert.test_hf_nllb import tiny_nllb  # noqa: E402
from tests.convert.test_hf_switch import tiny_switch  # noqa: E402
from tests.convert.test_real_checkpoints import tiny_t5  # noqa: E402

RNG = np.random.default_rng(3)
ENC = RNG.integers(3, 96, (2, 11))
DEC = RNG.integers(3, 96, (2, 7))


def logits_of(hf):
    with torch.no_grad():
        return hf(input_ids=torch.tensor(ENC), decoder_input_ids=torch.tensor(DEC)).logits.float().numpy()


def reloaded(path):
    return transformers.AutoModelForSeq2SeqLM.from_pretrained(str(path), torch_dtype=torch.float32).eval()


CASES = {
    "t5_v1_0": (lambda: tiny_t5(), hf_switch),
    "t5_v1_1": (lambda: tiny_t5(feed_forward_proj="gated-gelu", tie_word_embeddings=False), hf_switch),
    "switch_every1_bias": (lambda: tiny_switch(num_sparse_encoder_layers=4, num_sparse_decoder_layers=4,
                                               router_bias=True), hf_switch),
    "switch_drops": (lambda: tiny_switch(expert_capacity=2), hf_switch),
    "nllb_every4_untied": (lambda: tiny_nllb(encoder_sparse_step=4, decoder_sparse_step=4,
                                             tie_word_embeddings=False), hf_nllb),
}


@pytest.mark.parametrize("case", sorted(CASES))
def test_export_reloads_in_transformers_with_the_same_logits(tmp_path, case):
    make, module = CASES[case]
    hf = make()
    if case == "switch_every1_bias":
        with torch.no_grad():
            for name, p in hf.named_parameters():
                if name.endswith("classifier.bias"):
                    p.copy_(torch.randn_like(p))
    hf.save_pretrained(tmp_path / "hf", safe_serialization=True)
    want = logits_of(hf)
    model, cfg = from_hf(str(tmp_path / "hf"))
    module.to_hf(model, str(tmp_path / "out"), max_shard_bytes=64 * 1024)     # several shards and an index
    assert (tmp_path / "out" / "model.safetensors.index.json").exists()
    np.testing.assert_allclose(logits_of(reloaded(tmp_path / "out")), want, atol=1e-4, rtol=1e-4)
    back, back_cfg = from_hf(str(tmp_path / "out"))                          # and moejax reads it back
    assert back_cfg.moe == cfg.moe and back_cfg.activation == cfg.activation
    np.testing.assert_allclose(np.asarray(back(jnp.asarray(ENC), jnp.asarray(DEC), deterministic=True)[0]), want,
                               atol=1e-4, rtol=1e-4)


def test_bfloat16_export(tmp_path):
    hf = tiny_switch()
    hf.save_pretrained(tmp_path / "hf", safe_serialization=True)
    model, _ = from_hf(str(tmp_path / "hf"))
    hf_switch.to_hf(model, str(tmp_path / "out"), dtype="bfloat16")
    assert json.loads((tmp_path / "out" / "config.json").read_text())["dtype"] == "bfloat16"
    back = transformers.AutoModelForSeq2SeqLM.from_pretrained(str(tmp_path / "out"), torch_dtype="auto").eval()
    assert next(back.parameters()).dtype == torch.bfloat16
    with torch.no_grad():
        for (name, p), q in zip(hf.named_parameters(), back.parameters(), strict=True):
            torch.testing.assert_close(q.float(), p.to(torch.bfloat16).float(), msg=name)


def test_zoo_switch_exports_with_a_fixed_capacity(tmp_path):
    """tiny_switch routes T5X's way (capacity factor over token groups): export asks for
    ``expert_capacity``; with one that drops nothing the HF model's logits equal moejax's."""
    cfg = get_config("tiny_switch")
    cfg = cfg.replace(moe=cfg.moe.replace(capacity_factor_eval=8.0))          # no drops in moejax either
    model = build_model(cfg, nnx.Rngs(0))
    with pytest.raises(ValueError, match="pass expert_capacity=N"):
        hf_switch.to_hf(model, str(tmp_path / "refused"))
    assert not (tmp_path / "refused").exists()
    hf_switch.to_hf(model, str(tmp_path / "out"), expert_capacity=64)
    logits, aux = model(jnp.asarray(ENC), jnp.asarray(DEC), deterministic=True)
    assert int(np.sum(aux.encoder.num_dropped)) == 0
    np.testing.assert_allclose(logits_of(reloaded(tmp_path / "out")), np.asarray(logits), atol=1e-4, rtol=1e-4)


def test_what_hf_cannot_represent_is_refused_by_name(tmp_path):
    cfg = get_config("tiny_switch")
    top2 = build_model(cfg.replace(moe=cfg.moe.replace(top_k=2, expert_capacity=8, sequence_groups=True)),
                       nnx.Rngs(0))
    with pytest.raises(ValueError, match=r"moe.top_k=2 \(HF would give 1\)"):
        hf_switch.to_hf(top2, str(tmp_path / "a"))
    nllb = get_config("tiny_nllb_moe")
    swiglu = build_model(nllb.replace(activation="swiglu", moe=nllb.moe.replace(activation="swiglu")), nnx.Rngs(0))
    with pytest.raises(ValueError, match="activation='swiglu'"):
        hf_nllb.to_hf(swiglu, str(tmp_path / "b"))
    with pytest.raises(ValueError, match="activation='gated-gelu_exact' has no feed_forward_proj"):
        hf_switch.to_hf(build_model(get_config("tiny_t5", activation="gated-gelu_exact"), nnx.Rngs(0)),
                        str(tmp_path / "c"))
