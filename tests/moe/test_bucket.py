"""The ``bucket`` dropless backend: exact against the per-expert loop reference (forward and all
gradients), whatever the loads; the bucket and round it picks; its VJP against JAX's autodiff."""

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from moejax.moe import MoeConfig, MoeLayer
from moejax.moe.bucket import BucketBackend, bucket_capacities
from tests.moe.reference import layer_params, ref_moe
from tests.moe.test_layer import assert_match, layer_grads

D, F = 8, 16


def build(seed=0, t=32, **kw):
    base = dict(num_experts=8, d_model=D, d_ff=F, max_group_size=t, dropless=True, weight_norm="topk",
                activation="swiglu")
    base.update(kw)
    return MoeLayer(MoeConfig(**base), rngs=nnx.Rngs(seed, dropout=3))


def inputs(seed=1, b=2, s=32):
    """Random tokens whose feature 0 is >= 1 (so that a router can be skewed, see :func:`skew`)."""
    x = jax.random.normal(jax.random.key(seed), (b, s, D))
    return x.at[..., 0].set(jnp.abs(x[..., 0]) + 1.0)


def skew(layer, expert=0, scale=10.0):
    """Every token's logit for ``expert`` grows by ``scale * x[0] >= scale``."""
    layer.router.kernel[...] = layer.router.kernel[...].at[0, expert].add(scale)


@pytest.mark.parametrize("top_k", [1, 2])
def test_capacity_limited_same_drops_as_reference(top_k):
    """With a capacity limit the bucket backend drops exactly what the limit drops (ladder capped at C)."""
    layer = build(top_k=top_k, dropless=False, backend="bucket", capacity_factor_eval=1.0, min_capacity=1)
    x = inputs()
    dec = assert_match(layer, x)
    n_dropped = sum(1 for gdec in dec for (_, _, _, r, k) in gdec if r and not k)
    _, st = layer(x, deterministic=True)
    assert int(st.num_dropped) == n_dropped > 0
    assert int(st.capacity_used) == st.capacity            # the loads reach C: the top bucket is C
    roomy = build(top_k=top_k, dropless=False, backend="bucket", capacity_factor_eval=8.0)
    _, st = roomy(x, deterministic=True)
    assert int(st.num_dropped) == 0 and int(st.capacity_used) < st.capacity   # a smaller bucket suffices
    assert_match(roomy, x)


def test_default_backend_of_dropless_is_bucket():
    assert isinstance(build().backend, BucketBackend)
    assert not isinstance(build(dropless=False).backend, BucketBackend)


def test_ladder_rounding_and_cap():
    # t=64, e=8, k=2: mean load 16 -> factors 1 .. 3 -> 16, 18, 20, 22, 24, 28, 32, 48 -> multiples of 8
    assert bucket_capacities(64, 8, 2, 64) == (16, 24, 32, 48)
    assert bucket_capacities(64, 8, 2, 40) == (16, 24, 32, 40)       # capped at the exact bound
    assert bucket_capacities(4096, 8, 2, 4096, (1.0, 1.125, 1.25)) == (1024, 1152, 1280)


@pytest.mark.parametrize("top_k,padded", [(1, False), (2, False), (2, True), (3, True), (8, False)])
def test_matches_reference(top_k, padded):
    layer = build(top_k=top_k)
    x = inputs()
    mask = None
    if padded:
        mask = jnp.arange(32)[None, :] < jnp.array([[32], [13]])
    dec = assert_match(layer, x, mask=mask)
    assert all(k for gdec in dec for (_, _, _, r, k) in gdec if r)            # nothing dropped
    _, st = layer(x, padding_mask=mask, deterministic=True)
    assert int(st.num_dropped) == 0 and int(st.tokens_dropped) == 0
    caps = layer.backend.capacities(layer.router(x.reshape(2, 32, D), jnp.ones((2, 32), bool), deterministic=True,
                                                 rngs=layer.rngs)[0])
    # the chosen capacity is the smallest bucket that holds the largest load
    load = int(st.max_expert_load)
    assert int(st.capacity_used) == min(c for c in caps if c >= load)


def test_one_expert_gets_every_token_still_exact():
    """All 32 tokens' first choice is expert 0: load 32 > the top bucket (24), so two rounds run."""
    layer = build(top_k=2)
    x = inputs()
    skew(layer)
    dec = assert_match(layer, x)
    assert all(k for gdec in dec for (_, _, _, r, k) in gdec if r)
    assert sum(1 for (_, ex, j, _, _) in dec[0] if ex == 0 and j == 0) == 32
    _, st = layer(x, deterministic=True)
    assert int(st.max_expert_load) == 32 and int(st.num_dropped) == 0
    assert int(st.capacity_used) == 48                       # 2 rounds of the 24-slot bucket


def test_rounds_of_a_small_bucket_are_exact():
    """A ladder whose only bucket is half the mean load: every call runs several rounds."""
    layer = build(top_k=2, capacity_buckets=(0.5,))
    x = inputs()
    assert_match(layer, x)
    _, st = layer(x, deterministic=True)
    assert int(st.capacity_used) % 8 == 0 and int(st.capacity_used) >= int(st.max_expert_load) > 8


def test_bias_and_activations_match_gather():
    for act in ("relu", "split-swiglu"):
        x = inputs()
        a = build(top_k=2, activation=act, use_bias=True)
        b = build(top_k=2, activation=act, use_bias=True, backend="gather")
        for layer in (a, b):
            layer.experts.bi[...] = jax.random.normal(jax.random.key(5), layer.experts.bi[...].shape)
            layer.experts.bo[...] = jax.random.normal(jax.random.key(6), layer.experts.bo[...].shape)
        assert_match(a, x)                      # the reference covers biases and every activation
        np.testing.assert_allclose(a(x, deterministic=True)[0], b(x, deterministic=True)[0], atol=1e-5)


def test_bf16_params():
    """bf16 weights, f32 compute: equal to the reference on the same (bf16-valued) weights."""
    layer = build(top_k=2, param_dtype=jnp.bfloat16)
    x = inputs()
    cot = jax.random.normal(jax.random.key(7), x.shape)
    y, gx, gp = layer_grads(layer, x, cot, True)
    # the reference in f32 on the same (bf16-valued) weights: its bf16 scatter-adds would round per token
    p32 = {k: v.astype(jnp.float32) for k, v in layer_params(layer).items()}
    fwd, _ = ref_moe(p32, x, layer.cfg)
    ry, vjp = jax.vjp(fwd, p32, x)
    rgp, rgx = vjp(cot)
    np.testing.assert_allclose(y, ry, atol=1e-5, rtol=1e-5)
    np.testing.assert_allclose(gx, rgx, atol=1e-5, rtol=1e-5)
    for name, g in gp.items():            # the weight gradients are bf16: within one rounding
        assert g.dtype == jnp.bfloat16
        np.testing.assert_allclose(np.asarray(g, np.float32), np.asarray(rgp[name]), rtol=2 ** -7, atol=1e-6,
                                   err_msg=name)
    # bf16 compute: equal to gather's C = t buffers (the same arithmetic on other slots)
    x = inputs().astype(jnp.bfloat16)
    a = build(top_k=2, param_dtype=jnp.bfloat16, dtype=jnp.bfloat16)
    b = build(top_k=2, param_dtype=jnp.bfloat16, dtype=jnp.bfloat16, backend="gather")
    ya, yb = a(x, deterministic=True)[0], b(x, deterministic=True)[0]
    assert ya.dtype == jnp.bfloat16
    np.testing.assert_allclose(np.asarray(ya, np.float32), np.asarray(yb, np.float32), atol=1e-2)


def _loss_and_grads(layer, x, cot, deterministic):
    graphdef, params, rest = nnx.split(layer, nnx.Param, ...)

    @jax.jit
    def f(params, rest, x):
        def loss(params, x):
            y, stats = nnx.merge(graphdef, params, rest, copy=True)(x, deterministic=deterministic)
            return jnp.sum(y * cot) + stats.load_balancing_loss, y
        return jax.value_and_grad(loss, argnums=(0, 1), has_aux=True)(params, x)

    return f(params, rest, x)


STOCHASTIC = {"dropout+eom": dict(expert_dropout=0.3, eom_rate=0.2),
              "dropout+rounds": dict(expert_dropout=0.2, capacity_buckets=(0.5,))}


@pytest.mark.parametrize("kw", list(STOCHASTIC.values()), ids=list(STOCHASTIC))
def test_training_vjp_matches_autodiff(kw):
    """Stochastic experts in training: the bucket VJP == JAX's autodiff of the same switch (same masks)."""
    layer = build(top_k=2, **kw)
    x, cot = inputs(), jax.random.normal(jax.random.key(7), (2, 32, D))
    (l1, y1), (gp1, gx1) = _loss_and_grads(layer, x, cot, False)
    layer.backend = dataclasses.replace(layer.backend, autodiff=True)
    (l2, y2), (gp2, gx2) = _loss_and_grads(layer, x, cot, False)
    np.testing.assert_allclose(y1, y2, atol=1e-6)
    assert float(jnp.mean(y1 == 0)) < 0.5                    # dropout acted, but not everywhere
    np.testing.assert_allclose(gx1, gx2, atol=1e-5)
    for a, b in zip(jax.tree.leaves(gp1), jax.tree.leaves(gp2)):
        np.testing.assert_allclose(a, b, atol=1e-5, rtol=1e-5)
    # a deterministic call drops no hidden units and matches the loop reference (which has no EOM)
    assert_match(build(top_k=2, **{k: v for k, v in kw.items() if k != "eom_rate"}), x)


def test_merged_experts_exact():
    """expert_map merges router outputs: one expert may receive k choices of one token."""
    x = inputs()
    kw = dict(num_experts=4, top_k=2, expert_map=(0, 0, 1, 1, 2, 2, 3, 3))
    a, b = build(**kw), build(**kw, backend="gather")
    for layer in (a, b):              # both choices of every token -> router outputs 0, 1 -> physical expert 0
        skew(layer, 0, 10.0), skew(layer, 1, 5.0)
    ya, sa = a(x, deterministic=True)
    yb, _ = b(x, deterministic=True)
    assert int(sa.max_expert_load) == 64 and int(sa.num_dropped) == 0
    np.testing.assert_allclose(ya, yb, atol=1e-5)


def test_quantized_experts_match_gather():
    x = inputs()
    a, b = build(top_k=2, quant_bits=8), build(top_k=2, quant_bits=8, backend="gather")
    np.testing.assert_allclose(a(x, deterministic=True)[0], b(x, deterministic=True)[0], atol=1e-5)


def test_hierarchical_auto_is_gather_and_bucket_refused():
    inner = MoeConfig(num_experts=2, d_model=D, d_ff=F)
    assert not isinstance(build(top_k=1, inner=inner).backend, BucketBackend)
    with pytest.raises(ValueError, match="hierarchical experts .* need backend 'gather' or 'einsum'"):
        build(top_k=1, inner=inner, backend="bucket")
