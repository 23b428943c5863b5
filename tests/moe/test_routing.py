"""Routers: second-expert policies, noisy top-k, expert choice, BPR, float32 routing."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from moejax.moe import MoeConfig, MoeLayer, expert_choice_route, top_k_route
from tests.moe.reference import route_top_k


def _logits(seed, g=2, t=64, e=4, scale=1.0):
    return jax.random.normal(jax.random.key(seed), (g, t, e)) * scale


def test_random_policy_matches_documented_rule():
    logits = _logits(0)
    mask = jnp.ones(logits.shape[:2], bool)
    rng = jax.random.key(5)
    plan = top_k_route(logits, k=2, capacity=1000, token_mask=mask, policy="random", train=True, rng=rng)
    probs = np.asarray(jax.nn.softmax(logits))
    u = np.asarray(jax.random.uniform(rng, logits.shape[:2]))
    p2 = np.sort(probs, -1)[..., -2]
    t = logits.shape[1]
    np.testing.assert_array_equal(np.asarray(plan.routed)[:, t:], 2 * p2 > u)
    assert bool(jnp.all(plan.routed[:, :t]))
    # eval: the policy is off -> both kept
    plan_eval = top_k_route(logits, k=2, capacity=1000, token_mask=mask, policy="random", train=False)
    assert bool(jnp.all(plan_eval.routed))


def test_random_policy_rate_within_statistical_bounds():
    logits = _logits(1, g=4, t=4096, e=8)
    mask = jnp.ones(logits.shape[:2], bool)
    plan = top_k_route(logits, k=2, capacity=10**6, token_mask=mask, policy="random", train=True,
                       rng=jax.random.key(2))
    p2 = np.sort(np.asarray(jax.nn.softmax(logits)), -1)[..., -2]
    keep_prob = np.minimum(2 * p2, 1.0)
    n = keep_prob.size
    expected = keep_prob.mean()
    std = np.sqrt(np.sum(keep_prob * (1 - keep_prob))) / n
    observed = float(jnp.mean(plan.routed[:, logits.shape[1]:]))
    assert abs(observed - expected) < 5 * std, (observed, expected, std)


def test_sampling_policy_distribution():
    e = 4
    base = jnp.log(jnp.array([0.5, 0.3, 0.15, 0.05]))
    logits = jnp.broadcast_to(base, (1, 20000, e))
    mask = jnp.ones((1, 20000), bool)
    plan = top_k_route(logits, k=2, capacity=10**6, token_mask=mask, policy="sampling", train=True,
                       rng=jax.random.key(3))
    sel = np.asarray(plan.selected[0])
    assert (sel[:, 0] == 0).all() and (sel[:, 1] != 0).all()
    freq = np.bincount(sel[:, 1], minlength=e)[1:] / sel.shape[0]
    expected = np.array([0.3, 0.15, 0.05]) / 0.5  # Gumbel-max: p_j / (1 - p_first)
    np.testing.assert_allclose(freq, expected, atol=0.015)
    # the combine weight of the 2nd choice is its raw probability
    t = logits.shape[1]
    np.testing.assert_allclose(np.asarray(plan.weight[0, t:]), np.array([0.5, 0.3, 0.15, 0.05])[sel[:, 1]], rtol=1e-5)


@pytest.mark.parametrize("bpr", [False, True])
@pytest.mark.parametrize("k", [1, 2, 3])
def test_top_k_plan_matches_reference_decisions(k, bpr):
    logits = _logits(4, g=1, t=24, e=4)
    mask = jnp.ones((1, 24), bool).at[0, 5].set(False)
    cap = 5
    plan = top_k_route(logits, k=k, capacity=cap, token_mask=mask, batch_prioritized=bpr)
    ref = route_top_k(np.asarray(jax.nn.softmax(logits))[0], k, cap, np.asarray(mask[0]), bpr=bpr)
    got = {(int(i), int(j)): bool(kp) for i, j, kp in zip(plan.token[0], plan.expert[0], plan.kept[0])}
    for (i, ex, _, _, kept) in ref:
        assert got[(i, ex)] == kept


def test_first_choices_placed_before_second():
    # every token's 1st choice is expert 0 for the first half and expert 1 for the second; 2nd choices
    # collide with 1st choices but must never evict them.
    t = 8
    logits = jnp.where(jnp.arange(t)[:, None] < t // 2, jnp.array([2.0, 1.0]), jnp.array([1.0, 2.0]))[None]
    plan = top_k_route(logits, k=2, capacity=t // 2, token_mask=jnp.ones((1, t), bool))
    assert bool(jnp.all(plan.kept[0, :t])) and not bool(jnp.any(plan.kept[0, t:]))


def test_bpr_prefers_confident_tokens():
    t = 6
    conf = jnp.array([0.1, 0.2, 3.0, 0.3, 2.0, 0.4])  # all prefer expert 0
    logits = jnp.stack([conf, jnp.zeros(t)], -1)[None]
    plan = top_k_route(logits, k=1, capacity=2, token_mask=jnp.ones((1, t), bool), batch_prioritized=True)
    assert set(np.flatnonzero(np.asarray(plan.kept[0]))) == {2, 4}
    plan = top_k_route(logits, k=1, capacity=2, token_mask=jnp.ones((1, t), bool))
    assert set(np.flatnonzero(np.asarray(plan.kept[0]))) == {0, 1}


def test_expert_choice_balanced_and_weights_are_probs():
    logits = _logits(6, g=2, t=16, e=4)
    mask = jnp.ones((2, 16), bool)
    plan = expert_choice_route(logits, capacity=8, token_mask=mask)
    counts = np.stack([np.bincount(np.asarray(plan.expert[g]), minlength=4) for g in range(2)])
    assert (counts == 8).all()
    probs = jax.nn.softmax(logits)
    want = jnp.take_along_axis(probs.reshape(2, 16 * 4), plan.token * 4 + plan.expert, axis=1)
    np.testing.assert_allclose(plan.weight, want, rtol=1e-6)
    # each expert took its top-8 tokens by probability
    for g in range(2):
        for ex in range(4):
            chosen = set(np.asarray(plan.token[g, ex * 8:(ex + 1) * 8]))
            assert chosen == set(np.argsort(-np.asarray(probs[g, :, ex]), kind="stable")[:8])


def test_expert_choice_is_not_causal():
    """Changing a later token can change whether an earlier token is processed (documented)."""
    layer = MoeLayer(MoeConfig(num_experts=2, d_model=4, d_ff=8, router="expert_choice",
                               capacity_factor_eval=0.5, min_capacity=1), rngs=nnx.Rngs(0))
    x = jax.random.normal(jax.random.key(0), (1, 8, 4))
    y1, _ = layer(x, deterministic=True)
    x2 = x.at[0, 7].set(x[0, 0] * 5)
    y2, _ = layer(x2, deterministic=True)
    assert not np.allclose(y1[0, :7], y2[0, :7])


def test_noisy_top_k_eval_is_clean_top_k_and_train_adds_noise():
    cfg = MoeConfig(num_experts=4, d_model=8, d_ff=16, router="noisy_top_k", top_k=2, weight_norm="topk",
                    capacity_factor_train=4.0, capacity_factor_eval=4.0)
    layer = MoeLayer(cfg, rngs=nnx.Rngs(0))
    clean = MoeLayer(cfg.replace(router="top_k"), rngs=nnx.Rngs(0))
    x = jax.random.normal(jax.random.key(1), (2, 16, 8))
    ye, se = layer(x, deterministic=True)
    yc, _ = clean(x, deterministic=True)
    np.testing.assert_allclose(ye, yc, rtol=1e-6)
    assert float(se.load_loss) == 0.0
    yt, st = layer(x, deterministic=False)
    assert not np.allclose(yt, ye)
    assert float(st.importance_loss) > 0 and float(st.load_loss) > 0
    # learned noise: the noise kernel receives gradient through the load loss
    g = nnx.grad(lambda m: m(x, deterministic=False)[1].load_loss)(layer)
    assert float(jnp.abs(g["router"]["noise_kernel"][...]).sum()) > 0


def test_router_float32_with_bf16_input():
    layer = MoeLayer(MoeConfig(num_experts=4, d_model=8, d_ff=16, param_dtype=jnp.bfloat16, dtype=jnp.bfloat16),
                     rngs=nnx.Rngs(0))
    x = jax.random.normal(jax.random.key(0), (1, 4, 8)).astype(jnp.bfloat16)
    assert layer.router.logits(x).dtype == jnp.float32
    plan, losses = layer.router(x, jnp.ones((1, 4), bool), deterministic=True, rngs=layer.rngs)
    assert plan.probs.dtype == jnp.float32 and losses.router_z_loss.dtype == jnp.float32


def test_random_policy_layer_counts_unrouted_not_dropped():
    cfg = MoeConfig(num_experts=4, d_model=8, d_ff=16, top_k=2, second_expert_policy="random",
                    weight_norm="kept", capacity_factor_train=8.0)
    layer = MoeLayer(cfg, rngs=nnx.Rngs(params=0, routing=1))
    x = jax.random.normal(jax.random.key(1), (4, 32, 8))
    _, st = layer(x, deterministic=False)
    assert int(st.num_routed) < 2 * 4 * 32 and int(st.num_dropped) == 0
    _, st_eval = layer(x, deterministic=True)
    assert int(st_eval.num_routed) == 2 * 4 * 32
