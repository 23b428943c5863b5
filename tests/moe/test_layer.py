"""MoeLayer vs the per-expert Python-loop reference: forward, gradients, drops, stats, oracles."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from moejax.moe import MoeConfig, MoeLayer
from tests.moe.reference import layer_params, ref_moe

B, S, D, F = 2, 12, 8, 16

ROUTERS = {
    "switch": dict(top_k=1),
    "top2_raw": dict(top_k=2),
    "top2_mixtral": dict(top_k=2, weight_norm="topk"),
    "top2_gshard": dict(top_k=2, weight_norm="kept"),
    "top3": dict(top_k=3, weight_norm="topk"),
    "bpr_top2": dict(top_k=2, batch_prioritized=True),
    "expert_choice": dict(router="expert_choice", top_k=2),
}
BACKENDS = ["einsum", "gather", "ragged"]


def build(seed=0, **kw):
    base = dict(num_experts=4, d_model=D, d_ff=F, max_group_size=S, min_capacity=1)
    base.update(kw)
    return MoeLayer(MoeConfig(**base), rngs=nnx.Rngs(seed))


def inputs(seed=1, b=B, s=S):
    return jax.random.normal(jax.random.key(seed), (b, s, D))


def layer_grads(layer, x, cot, deterministic, mask=None):
    graphdef, params, rest = nnx.split(layer, nnx.Param, ...)

    def f(params, x, rest):
        m = nnx.merge(graphdef, params, rest)
        y, _ = m(x, padding_mask=mask, deterministic=deterministic)
        return jnp.sum(y * cot), y

    (_, y), (gp, gx) = jax.value_and_grad(f, argnums=(0, 1), has_aux=True)(params, x, rest)
    flat = {"router": gp["router"]["kernel"][...]}
    for name in ("wi", "wi_0", "wi_1", "wo", "bi", "bi_1", "bo"):
        if name in gp["experts"]:
            flat[name] = gp["experts"][name][...]
    return y, gx, flat


def ref_grads(layer, x, cot, deterministic, mask=None):
    fwd, dec = ref_moe(layer_params(layer), x, layer.cfg, deterministic=deterministic, padding_mask=mask)

    def f(p, x):
        y = fwd(p, x)
        return jnp.sum(y * cot), y

    (_, y), (gp, gx) = jax.value_and_grad(f, argnums=(0, 1), has_aux=True)(layer_params(layer), x)
    return y, gx, gp, dec


def assert_match(layer, x, deterministic=True, mask=None, atol=1e-5):
    cot = jax.random.normal(jax.random.key(7), x.shape)
    y, gx, gp = layer_grads(layer, x, cot, deterministic, mask)
    ry, rgx, rgp, dec = ref_grads(layer, x, cot, deterministic, mask)
    np.testing.assert_allclose(y, ry, atol=atol, rtol=1e-5)
    np.testing.assert_allclose(gx, rgx, atol=atol, rtol=1e-5)
    for name, g in gp.items():
        np.testing.assert_allclose(g, rgp[name], atol=atol, rtol=1e-5, err_msg=name)
    return dec


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("router", sorted(ROUTERS))
@pytest.mark.parametrize("drops", [False, True], ids=["ample", "drops"])
def test_matches_reference(backend, router, drops):
    kw = dict(ROUTERS[router], backend=backend)
    kw.update(capacity_factor_eval=0.5 if drops else 4.0)
    layer = build(**kw)
    x = inputs()
    dec = assert_match(layer, x)
    n_dropped = sum(1 for gdec in dec for (_, _, _, r, k) in gdec if r and not k)
    _, stats = layer(x, deterministic=True)
    if router == "expert_choice":
        assert int(stats.num_dropped) == int(stats.tokens_dropped)
    else:
        assert int(stats.num_dropped) == n_dropped
        assert (n_dropped > 0) == drops


@pytest.mark.parametrize("activation", ["relu", "gelu", "swiglu", "gated-gelu", "split-swiglu"])
@pytest.mark.parametrize("use_bias", [False, True])
@pytest.mark.parametrize("backend", ["gather", "ragged"])
def test_expert_variants_match_reference(activation, use_bias, backend):
    layer = build(top_k=2, activation=activation, use_bias=use_bias, backend=backend,
                  dropless=backend == "ragged")
    # non-zero biases so they matter
    for name in ("bi", "bi_1", "bo"):
        if hasattr(layer.experts, name):
            v = getattr(layer.experts, name)
            v[...] = jax.random.normal(jax.random.key(3), v.shape) * 0.1
    assert_match(layer, inputs())


@pytest.mark.parametrize("backend", BACKENDS)
def test_ragged_bias_and_train_capacity(backend):
    layer = build(top_k=2, use_bias=True, backend=backend, capacity_factor_train=0.75)
    layer.experts.bo[...] = jnp.ones_like(layer.experts.bo[...])
    assert_match(layer, inputs(), deterministic=False)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("router", ["switch", "top2_gshard", "expert_choice"])
def test_padding_excluded(backend, router):
    layer = build(backend=backend, **ROUTERS[router], capacity_factor_eval=1.0)
    x = inputs()
    mask = jnp.arange(S)[None, :] < jnp.array([[S - 3], [S - 5]])
    assert_match(layer, x, mask=mask)
    y, stats = layer(x, padding_mask=mask, deterministic=True)
    np.testing.assert_array_equal(np.asarray(y)[~np.asarray(mask)], 0.0)
    if router != "expert_choice":
        assert int(stats.num_routed) == int(mask.sum()) * layer.cfg.top_k
    # padding does not change the losses: compare with the same real tokens and different padding
    x2 = jnp.where(mask[..., None], x, 100.0)
    _, stats2 = layer(x2, padding_mask=mask, deterministic=True)
    np.testing.assert_allclose(stats.load_balancing_loss, stats2.load_balancing_loss, rtol=1e-6)
    np.testing.assert_allclose(stats.router_z_loss, stats2.router_z_loss, rtol=1e-6)


@pytest.mark.parametrize("backend", BACKENDS)
def test_dropless(backend):
    layer = build(top_k=2, dropless=True, weight_norm="topk", backend=backend, num_experts=3)
    x = inputs()
    # skew the router so one expert is chosen by every token: still nothing dropped
    layer.router.kernel[...] = layer.router.kernel[...].at[:, 0].add(10.0 * jnp.sign(x.mean((0, 1))))
    dec = assert_match(layer, x)
    assert all(k for gdec in dec for (_, _, _, _, k) in gdec)
    _, stats = layer(x, deterministic=True)
    assert int(stats.num_dropped) == 0 and stats.capacity == S


@pytest.mark.parametrize("backend", BACKENDS)
def test_identity_experts_return_weighted_input(backend):
    """Oracle: experts = identity (ReLU on positive inputs) -> y = (sum of kept weights) * x."""
    layer = build(top_k=2, weight_norm="topk", backend=backend, d_ff=D, capacity_factor_eval=8.0)
    eye = jnp.broadcast_to(jnp.eye(D), (4, D, D))
    layer.experts.wi[...] = eye
    layer.experts.wo[...] = eye
    x = jnp.abs(inputs()) + 0.1
    y, _ = layer(x, deterministic=True)
    np.testing.assert_allclose(y, x, rtol=1e-5)  # renormalised top-2 weights sum to 1
    layer2 = build(top_k=1, backend=backend, d_ff=D, capacity_factor_eval=8.0)
    layer2.experts.wi[...] = eye
    layer2.experts.wo[...] = eye
    y2, _ = layer2(x, deterministic=True)
    p = jax.nn.softmax(jnp.einsum("bsd,de->bse", x, layer2.router.kernel[...]))
    np.testing.assert_allclose(y2, x * p.max(-1, keepdims=True), rtol=1e-5)


@pytest.mark.parametrize("backend", BACKENDS)
def test_round_robin_router(backend):
    """Oracle: a router that sends token i to expert i mod E (one-hot-ish inputs)."""
    e, t = 4, 8
    layer = MoeLayer(MoeConfig(num_experts=e, d_model=e, d_ff=e, max_group_size=t, capacity_factor_eval=1.0,
                               min_capacity=1, backend=backend), rngs=nnx.Rngs(0))
    layer.router.kernel[...] = 20.0 * jnp.eye(e)
    x = jax.nn.one_hot(jnp.arange(t) % e, e)[None]  # [1, t, e]
    y, stats = layer(x, deterministic=True)
    np.testing.assert_allclose(stats.expert_load, np.full(e, 1 / e), rtol=1e-6)
    assert int(stats.num_dropped) == 0 and stats.capacity == t // e
    np.testing.assert_allclose(stats.load_balancing_loss, 1.0, atol=1e-6)
    # every token went to expert i mod e: compare with running that expert directly
    for i in range(t):
        ex = i % e
        direct = jax.nn.relu(x[0, i] @ layer.experts.wi[...][ex]) @ layer.experts.wo[...][ex]
        gate = jax.nn.softmax(x[0, i] @ layer.router.kernel[...])[ex]
        np.testing.assert_allclose(y[0, i], gate * direct, rtol=1e-5, atol=1e-6)


def test_dropped_by_position_counts():
    """A router that sends every token to expert 0: with C slots, positions >= C are dropped."""
    layer = build(top_k=1, capacity_factor_eval=1.0, num_experts=4)
    layer.router.kernel[...] = jnp.zeros_like(layer.router.kernel[...]).at[:, 0].set(1.0)
    x = jnp.abs(inputs()) + 0.1
    _, stats = layer(x, deterministic=True)
    c = stats.capacity
    assert c == 3  # ceil(1.0 * 1 * 12 / 4)
    expected = np.where(np.arange(S) < c, 0.0, 1.0)
    np.testing.assert_allclose(stats.dropped_by_position, expected)
    assert int(stats.num_dropped) == B * (S - c)
    assert int(stats.tokens_dropped) == B * (S - c)
    np.testing.assert_allclose(stats.dropped_fraction, (S - c) / S, rtol=1e-6)
    np.testing.assert_allclose(stats.expert_load, [1, 0, 0, 0])
    y, _ = layer(x, deterministic=True)
    np.testing.assert_array_equal(np.asarray(y)[:, c:], 0.0)


def test_train_vs_eval_capacity_flag():
    layer = build(top_k=1, capacity_factor_train=1.0, capacity_factor_eval=2.0, num_experts=4)
    x = inputs()
    _, st_train = layer(x, deterministic=False)
    _, st_eval = layer(x, deterministic=True)
    assert (st_train.capacity, st_eval.capacity) == (3, 6)
    layer.eval()
    assert layer(x)[1].capacity == 6
    layer.train()
    assert layer(x)[1].capacity == 3


@pytest.mark.parametrize("backend", ["gather", "einsum", "ragged"])
def test_jit_bf16_params_router_stays_f32(backend):
    layer = build(top_k=2, backend=backend, param_dtype=jnp.bfloat16, dtype=jnp.bfloat16)
    assert layer.router.kernel[...].dtype == jnp.bfloat16
    assert layer.experts.wi[...].dtype == jnp.bfloat16
    x = inputs().astype(jnp.bfloat16)
    y, stats = nnx.jit(lambda m, x: m(x, deterministic=True))(layer, x)
    assert y.dtype == jnp.bfloat16
    assert stats.router_z_loss.dtype == jnp.float32
    # the router itself computes in f32: logits equal the f32 computation of the bf16 values
    logits = layer.router.logits(x.reshape(1, B * S, D))
    assert logits.dtype == jnp.float32
    ref = x.astype(jnp.float32).reshape(1, B * S, D) @ layer.router.kernel[...].astype(jnp.float32)
    np.testing.assert_allclose(logits, ref, rtol=1e-6, atol=1e-6)
    y32, _ = MoeLayer.__call__(layer, x.astype(jnp.float32), deterministic=True)
    np.testing.assert_allclose(np.asarray(y, np.float32), y32, atol=0.05)


def test_jit_static_shapes_no_retrace():
    layer = build(top_k=2)
    traces = []

    @nnx.jit
    def f(m, x):
        traces.append(1)
        return m(x, deterministic=True)[0]

    f(layer, inputs(1))
    f(layer, inputs(2))
    assert len(traces) == 1


def test_shared_experts_added():
    layer = build(top_k=1, num_shared_experts=2, shared_d_ff=4)
    x = inputs()
    y, _ = layer(x, deterministic=True)
    shared = layer.shared(x)
    fwd, _ = ref_moe(layer_params(layer), x, layer.cfg)
    np.testing.assert_allclose(y, fwd(layer_params(layer), x) + shared, atol=1e-5)
    assert layer.shared.wi[...].shape == (D, 8)


def test_expert_dropout_train_only():
    layer = build(top_k=1, expert_dropout=0.5, capacity_factor_train=4.0, capacity_factor_eval=4.0)
    x = inputs()
    y_eval, _ = layer(x, deterministic=True)
    fwd, _ = ref_moe(layer_params(layer), x, layer.cfg)
    np.testing.assert_allclose(y_eval, fwd(layer_params(layer), x), atol=1e-5)
    y1, _ = layer(x, deterministic=False)
    y2, _ = layer(x, deterministic=False)
    assert not np.allclose(y1, y_eval) and not np.allclose(y1, y2)


def test_jitter_training_only():
    layer = build(top_k=1, jitter_eps=0.5, capacity_factor_train=8.0, capacity_factor_eval=8.0)
    x = inputs()
    ye1, _ = layer(x, deterministic=True)
    ye2, _ = layer(x, deterministic=True)
    np.testing.assert_array_equal(ye1, ye2)
    yt, st = layer(x, deterministic=False)
    assert not np.allclose(yt, ye1)


def test_group_splitting_matches_reference():
    layer = build(top_k=2, max_group_size=8, capacity_factor_eval=1.0)
    x = inputs(b=3, s=8)  # 24 tokens -> 3 groups of 8
    dec = assert_match(layer, x)
    assert len(dec) == 3


@pytest.mark.parametrize("backend", ["gather", "einsum"])
def test_hierarchical_moe(backend):
    inner = MoeConfig(num_experts=2, d_model=D, d_ff=F, top_k=1, capacity_factor_eval=4.0, min_capacity=1)
    layer = build(top_k=1, inner=inner, backend=backend, capacity_factor_eval=4.0)
    assert layer.experts.experts.wi[...].shape == (4, 2, D, F)
    x = inputs()
    y, stats = nnx.jit(lambda m, x: m(x, deterministic=True))(layer, x)
    # reference: outer top-1 routing, then each token goes through its outer expert's inner MoE
    xf = np.asarray(x.reshape(-1, D), np.float64)          # in numpy: a per-token loop, not per-token jax ops

    def softmax(z):
        z = np.exp(z - z.max(-1, keepdims=True))
        return z / z.sum(-1, keepdims=True)

    p = softmax(xf @ np.asarray(layer.router.kernel[...]))
    outer = np.argmax(p, -1)
    inner_k = np.asarray(layer.experts.router.kernel[...])
    wis, wos = np.asarray(layer.experts.experts.wi[...]), np.asarray(layer.experts.experts.wo[...])
    expected = np.zeros_like(xf)
    for i in range(xf.shape[0]):
        ex = outer[i]
        q = softmax(xf[i] @ inner_k[ex])
        ie = int(np.argmax(q))
        expected[i] = p[i, ex] * q[ie] * (np.maximum(xf[i] @ wis[ex, ie], 0) @ wos[ex, ie])
    np.testing.assert_allclose(np.asarray(y).reshape(-1, D), expected, atol=1e-5)
    assert float(stats.load_balancing_loss) > 1.0  # outer + mean inner
    g = nnx.grad(lambda m, x: jnp.sum(m(x, deterministic=False)[0]), argnums=1)(layer, x)
    assert bool(jnp.all(jnp.isfinite(g)))
