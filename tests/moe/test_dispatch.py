"""Dispatch helpers and per-expert statistics against plain numpy.

The helpers exist because XLA:CPU runs some reductions an order of magnitude slower than
equivalent adds or dots; these tests pin that the faster forms compute the same numbers.
"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from moejax.moe import MoeConfig, MoeLayer
from moejax.moe.losses import token_mean
from moejax.moe.rows import sum_choices, take_rows


@pytest.mark.parametrize("k", [1, 2, 3, 4])
def test_sum_choices_is_the_sum_over_choices(k):
    g, t, d = 2, 5, 3
    rows = np.random.default_rng(k).normal(size=(g, k * t, d)).astype(np.float32)
    expected = rows.reshape(g, k, t, d).sum(1)
    np.testing.assert_allclose(sum_choices(jnp.asarray(rows), k), expected, rtol=1e-6, atol=1e-6)


def test_take_rows_gathers_rows_per_group():
    rng = np.random.default_rng(0)
    x = rng.normal(size=(3, 7, 4)).astype(np.float32)
    idx = rng.integers(0, 7, size=(3, 9))
    expected = np.stack([x[i][idx[i]] for i in range(3)])
    np.testing.assert_array_equal(take_rows(jnp.asarray(x), jnp.asarray(idx)), expected)


def test_token_mean_ignores_padding():
    rng = np.random.default_rng(1)
    x = rng.normal(size=(2, 6, 4)).astype(np.float32)
    mask = np.ones((2, 6), bool)
    mask[0, 4:] = False
    mask[1, :] = False                      # an all-padding group gives 0, not NaN
    got = np.asarray(token_mean(jnp.asarray(x), jnp.asarray(mask)))
    np.testing.assert_allclose(got[0], x[0, :4].mean(0), rtol=1e-6)
    np.testing.assert_array_equal(got[1], np.zeros(4))


def test_stats_per_expert_fractions_match_numpy():
    e, k = 4, 2
    cfg = MoeConfig(num_experts=e, d_model=8, d_ff=16, top_k=k, capacity_factor_eval=0.5, min_capacity=1,
                    max_group_size=12)
    layer = MoeLayer(cfg, rngs=nnx.Rngs(0))
    x = jax.random.normal(jax.random.key(0), (2, 12, 8))
    mask = np.ones((2, 12), bool)
    mask[1, 9:] = False
    _, stats = layer(x, padding_mask=jnp.asarray(mask), deterministic=True)
    logits = np.asarray(jnp.einsum("bsd,de->bse", x, layer.router.kernel[...]))
    probs = np.exp(logits - logits.max(-1, keepdims=True))
    probs /= probs.sum(-1, keepdims=True)
    top = np.argsort(-probs, axis=-1)[..., :k]
    real = mask.reshape(-1)
    sel = np.zeros(e)
    for choices in top.reshape(-1, k)[real]:
        sel[choices] += 1
    np.testing.assert_allclose(stats.selection_fraction, sel / real.sum(), rtol=1e-6)
    np.testing.assert_allclose(stats.router_prob_mean, probs.reshape(-1, e)[real].mean(0), rtol=1e-5)
    np.testing.assert_allclose(np.sum(stats.selection_fraction), k, rtol=1e-6)
    # expert_load: kept assignments per expert over all kept; capacity 0.5 drops some
    assert int(stats.num_dropped) > 0
    kept = np.asarray(stats.expert_load) * (int(stats.num_routed) - int(stats.num_dropped))
    np.testing.assert_allclose(kept, np.round(kept), atol=1e-4)
    assert kept.max() <= 2 * stats.capacity + 1e-4           # 2 groups of 12 tokens
