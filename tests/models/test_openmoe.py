"""OpenMoE pieces: T5X split-SwiGLU MLP, unscaled attention, residual extra MLP after each MoE FFN."""

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from moejax.models import Decoder
from moejax.models.decoder import DecoderBlock
from moejax.models.layers import Attention
from moejax.models.registry import get_config
from moejax.moe import DenseFFN


def test_split_swiglu_mlp_matches_formula():
    mlp = DenseFFN(8, 6, activation="split-swiglu", rngs=nnx.Rngs(0))
    assert mlp.wi_0[...].shape == (8, 12) and mlp.wi_1[...].shape == (8, 6)
    x = np.asarray(jax.random.normal(jax.random.key(1), (3, 8)), np.float64)
    g, up = x @ np.asarray(mlp.wi_0[...]), x @ np.asarray(mlp.wi_1[...])
    g1, g2 = g[:, :6], g[:, 6:]
    want = (g1 * g2 / (1 + np.exp(-g2)) * up) @ np.asarray(mlp.wo[...])   # ColossalAI: down(SwiGLU(gate) * up)
    np.testing.assert_allclose(np.asarray(mlp(jnp.asarray(x, jnp.float32))), want, rtol=1e-5, atol=1e-6)


def test_unscaled_attention_equals_scale_folded_into_queries():
    head_dim = 16
    a = Attention(32, 4, 2, head_dim, scale=1.0, rngs=nnx.Rngs(0))
    b = Attention(32, 4, 2, head_dim, rngs=nnx.Rngs(0))
    b.q[...] = a.q[...] * head_dim**0.5          # default scale head_dim**-0.5 cancels
    x = jax.random.normal(jax.random.key(2), (2, 5, 32))
    pos = jnp.broadcast_to(jnp.arange(5), (2, 5))
    np.testing.assert_allclose(a(x, positions=pos), b(x, positions=pos), rtol=1e-5, atol=1e-5)
    assert not np.allclose(a(x, positions=pos), Attention(32, 4, 2, head_dim, rngs=nnx.Rngs(0))(x, positions=pos))


def test_openmoe_block_order_and_layout():
    cfg = get_config("tiny_openmoe")
    assert cfg.attn_scale == 1.0 and cfg.moe.top_k == 2 and cfg.moe.weight_norm == "none"
    assert [cfg.is_sparse(i) for i in range(cfg.num_layers)] == [False, True, False, True]
    block = DecoderBlock(cfg, sparse=True, rngs=nnx.Rngs(0))
    x = jax.random.normal(jax.random.key(3), (2, 6, cfg.d_model))
    pos = jnp.broadcast_to(jnp.arange(6), (2, 6))
    y, stats, _ = block(x, positions=pos, padding_mask=None, deterministic=True)
    # ColossalAI order: x += attn(LN(x)); x += MoE(LN(x)); x += extra_mlp(LN_extra(x))
    h = x + block.attn(block.attn_norm(x), positions=pos)
    h = h + block.ffn(block.ffn_norm(h), deterministic=True)[0]
    h = h + block.extra[1](block.extra[0](h))
    np.testing.assert_allclose(y, h, rtol=1e-5, atol=1e-5)
    assert stats is not None

    model = Decoder(cfg, rngs=nnx.Rngs(0))
    ids = jax.random.randint(jax.random.key(4), (2, 8), 0, cfg.vocab_size)
    logits, aux = model(ids)
    assert logits.shape == (2, 8, cfg.vocab_size) and aux.moe.load_balancing_loss.shape == (2,)
    assert model.stack.blocks[1].ffn.experts.wi_0[...].shape == (2, 4, 64, 128)   # [l, e, d, 2f]
