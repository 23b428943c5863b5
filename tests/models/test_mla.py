"""Multi-head latent attention and YaRN: the YaRN frequencies against transformers' own
computation, the latent KV cache (cached greedy decoding == uncached, the cache holds r + p
numbers per token), the attention kernels equal on MLA (the value dim differs from the key dim). Forward values and
gradients against transformers: tests/convert/test_hf_deepseek.py."""

import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from moejax.models import build_model
from moejax.models.layers import Yarn
from moejax.models.registry import get_config

IDS = jnp.asarray(np.random.default_rng(0).integers(0, 256, (2, 11)), jnp.int32)


def test_yarn_frequencies_match_transformers():
    transformers = pytest.importorskip("transformers")
    from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS

    cfg = transformers.DeepseekV3Config(qk_rope_head_dim=64, rope_theta=1e4, max_position_embeddings=163840,
                                        rope_scaling={"rope_type": "yarn", "factor": 40.0, "beta_fast": 32.0,
                                                      "beta_slow": 1.0, "mscale": 0.707, "mscale_all_dim": 0.707,
                                                      "original_max_position_embeddings": 4096})
    inv, factor = ROPE_INIT_FUNCTIONS["yarn"](cfg, "cpu")
    y = Yarn(factor=40.0, original_max_position=4096, mscale=0.707, mscale_all_dim=0.707)
    np.testing.assert_allclose(y.inv_freq(64, 1e4), inv.numpy(), rtol=1e-6)
    assert y.cos_sin_factor() == pytest.approx(factor)
    assert Yarn(factor=4.0, original_max_position=16).cos_sin_factor() == pytest.approx(0.1 * np.log(4.0) + 1)


@pytest.mark.parametrize("name", ["tiny_deepseek_v2", "tiny_deepseek_v3"])
def test_latent_cache_holds_the_latent_and_decodes_like_the_full_forward(name):
    """The caches hold ``r + p`` numbers per token (the dense prefix's first); one decode step
    after a cached prefill gives the full forward's next-token logits. (Multi-step greedy decoding
    through the latent cache is checked against transformers in tests/convert/test_hf_deepseek.py.)"""
    cfg = get_config(name)
    model = build_model(cfg, nnx.Rngs(0))
    caches = model.init_cache(2, 16)
    assert len(caches) == 2                                         # the dense prefix's and the MoE stack's
    assert caches[1].k.shape == (2, 2, 16, 1, cfg.kv_lora_rank) and caches[1].v.shape[-1] == cfg.qk_rope_head_dim
    full = model(IDS[:, :6])[0][:, -1]
    _, _, caches = model.apply_with_cache(IDS[:, :5], caches)
    step, _, caches = model.apply_with_cache(IDS[:, 5:6], caches)
    np.testing.assert_allclose(np.asarray(step[:, 0]), np.asarray(full), atol=2e-5, rtol=1e-5)
    assert int(caches[0].index[0]) == 6


def test_mla_params_shard_over_fsdp_and_heads():
    """Under the default rules the MLA projections' d_model dims go to ``fsdp`` and their head dims
    to ``model`` (the same machinery as every decoder; FSDP == single device is tested on others)."""
    from moejax.models.build import abstract_model
    from moejax.sharding import DEFAULT_RULES, make_mesh, state_shardings

    params = nnx.state(abstract_model(get_config("tiny_deepseek_v3")), nnx.Param)
    sh = state_shardings(params, make_mesh({"fsdp": 2, "expert": 2, "model": 2}), DEFAULT_RULES)
    spec = lambda x: str(getattr(x, "value", x).spec)  # noqa: E731
    attn = sh["stack"]["blocks"][0]["attn"]
    assert "fsdp" in spec(attn["kv_a"]) and "fsdp" in spec(attn["q_a"]) and "model" in spec(attn["kv_b"])


def test_attention_kernels_agree_on_mla():
    cfg = get_config("tiny_deepseek_v3")
    ref = np.asarray(build_model(cfg, nnx.Rngs(0))(IDS)[0])
    for impl in ("chunked", "dot_product"):
        got = build_model(cfg.replace(attention_impl=impl, attention_chunk=4), nnx.Rngs(0))(IDS)[0]
        np.testing.assert_allclose(np.asarray(got), ref, atol=2e-5, rtol=1e-5, err_msg=impl)


def test_config_record_round_trips_yarn():
    from moejax.checkpoint import config_from_json, config_to_json

    cfg = get_config("tiny_deepseek_v3")
    assert config_from_json(config_to_json(cfg)) == cfg and isinstance(cfg.rope_scaling, Yarn)
