"""DeepSeek-V2/V3 routing options of the top-k router (sigmoid scores, group-limited selection, a
selection-only bias, routed scaling) against the per-expert loop reference (forward and all
gradients) through every dispatch backend; the bias's load-carrying gradient; refusals."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from moejax.moe import MoeConfig
from tests.moe.reference import ref_moe
from tests.moe.test_layer import assert_match, build, inputs, layer_params

CONFIGS = {
    # V2: softmax, groups scored by their best expert, raw weights times routed_scale
    "v2_group_limited": dict(num_experts=8, top_k=3, num_expert_groups=4, top_k_groups=2, group_score="max",
                             routed_scale=2.0),
    # V3: sigmoid, selection bias, groups scored by their top-2 sum, renormalised, times 2.5
    "v3_noaux_tc": dict(num_experts=8, top_k=3, router_score="sigmoid", selection_bias=True,
                        num_expert_groups=4, top_k_groups=2, group_score="top2_sum", weight_norm="topk",
                        routed_scale=2.5),
    "sigmoid_top2": dict(num_experts=4, top_k=2, router_score="sigmoid", weight_norm="topk"),
}


def _layer(name, **kw):
    layer = build(router_init_std=1.0, **CONFIGS[name], **kw)
    if layer.router.selection_bias is not None:       # a trained-looking bias that changes the choices
        e = layer.cfg.num_experts
        layer.router.selection_bias[...] = jnp.asarray(np.linspace(-0.3, 0.3, e)[::-1], jnp.float32)
    return layer


@pytest.mark.parametrize("backend", ["gather", "einsum", "ragged", "bucket"])
@pytest.mark.parametrize("name", sorted(CONFIGS))
def test_matches_reference(name, backend):
    kw = dict(backend=backend, dropless=True) if backend == "bucket" else dict(backend=backend,
                                                                               capacity_factor_eval=0.75)
    layer = _layer(name, **kw)
    x = inputs()
    pad = jnp.asarray(np.arange(x.shape[1])[None] < np.array([[x.shape[1]], [x.shape[1] - 3]]))
    dec = assert_match(layer, x, mask=pad)
    kept = sum(1 for g in dec for (_, _, _, r, k) in g if r and k)
    routed = sum(1 for g in dec for (_, _, _, r, _) in g if r)
    assert (kept == routed) == (backend == "bucket")          # capacity 0.75 drops; dropless never


def test_group_limit_and_bias_change_the_choices():
    """The options are not inert: the chosen experts differ from plain top-k of the scores, and
    every choice lies in one of the token's top_k_groups groups."""
    layer = _layer("v3_noaux_tc", dropless=True)
    x = inputs()
    _, dec = ref_moe(layer_params(layer), x, layer.cfg)
    plain = layer.cfg.replace(num_expert_groups=1, selection_bias=False)
    _, dec_plain = ref_moe({k: v for k, v in layer_params(layer).items() if k != "selection_bias"}, x, plain)
    assert [c[:2] for g in dec for c in g] != [c[:2] for g in dec_plain for c in g]
    for g in dec:
        by_token = {}
        for (tok, ex, _, _, _) in g:
            by_token.setdefault(tok, set()).add(ex // 2)
        assert all(len(groups) <= 2 for groups in by_token.values())


def test_one_expert_takes_every_token_dropless_exact():
    """A bias that sends every token's first choice to expert 0: still exact, nothing dropped."""
    layer = _layer("v3_noaux_tc", dropless=True, backend="bucket")
    layer.router.selection_bias[...] = jnp.zeros((8,)).at[0].set(10.0)
    x = inputs()
    dec = assert_match(layer, x)
    assert all(any(ex == 0 for (t, ex, j, _, _) in g if t == tok) for g in dec for tok in {c[0] for c in g})
    _, stats = layer(x, deterministic=True)
    assert int(stats.num_dropped) == 0 and float(stats.selection_fraction[0]) == pytest.approx(1.0)


def test_selection_bias_gradient_is_the_load_deviation():
    """The bias's gradient slot holds share_e - k/E over the real tokens (whatever the loss), and
    the other gradients do not see the bias."""
    layer = _layer("v3_noaux_tc", dropless=True)
    from flax import nnx

    x = inputs()
    pad = jnp.asarray(np.arange(x.shape[1])[None] < np.array([[x.shape[1]], [x.shape[1] - 5]]))
    graphdef, params, rest = nnx.split(layer, nnx.Param, ...)
    grads = jax.grad(lambda p: jnp.sum(jnp.sin(nnx.merge(graphdef, p, rest)(x, padding_mask=pad,
                                                                              deterministic=True)[0])))(params)
    _, dec = ref_moe(layer_params(layer), x, layer.cfg, padding_mask=pad)
    counts = np.zeros(8)
    for g in dec:
        for (_, ex, _, routed, _) in g:
            counts[ex] += routed
    share = counts / float(np.sum(np.asarray(pad)))
    np.testing.assert_allclose(np.asarray(grads["router"]["selection_bias"][...]), share - 3 / 8, atol=1e-6)


@pytest.mark.parametrize("kw, match", [
    (dict(num_expert_groups=3), "num_expert_groups=3 must be >= 1 and divide num_experts=8"),
    (dict(num_expert_groups=4, top_k_groups=5), r"top_k_groups=5 must be in \[1, num_expert_groups=4\]"),
    (dict(num_expert_groups=4, top_k_groups=1, top_k=3), "top_k=3 > the 2 experts"),
    (dict(num_expert_groups=8, top_k_groups=2, group_score="top2_sum"), "needs >= 2 experts per group"),
    (dict(router_score="tanh"), "router_score"),
    (dict(group_score="mean"), "group_score"),
    (dict(routed_scale=0.0), "routed_scale must be > 0"),
    (dict(balance_loss_scope="batch"), "balance_loss_scope"),
    (dict(router="expert_choice", router_score="sigmoid"), "need router='top_k'"),
    (dict(top_k=2, selection_bias=True, second_expert_policy="random"), "cannot be combined"),
])
def test_bad_options_are_refused(kw, match):
    base = dict(num_experts=8, d_model=8, d_ff=8, top_k=1)
    base.update(kw)
    with pytest.raises(ValueError, match=match):
        MoeConfig(**base).validate()


def _np_balance(probs, selected, mask, e):
    """numpy ``E * sum_e f_e P_e`` over one set of tokens (``probs [n, e]``, ``selected [n, k]``)."""
    m = mask.astype(np.float64)
    f = np.zeros(e)
    for row, ok in zip(selected, m, strict=True):
        for ex in row:
            f[ex] += ok
    f /= m.sum()
    p = (probs * m[:, None]).sum(0) / m.sum()
    return e * float(np.sum(f * p))


@pytest.mark.parametrize("scope", ["group", "sequence", "global"])
def test_balance_loss_scopes_against_numpy(scope):
    """4 sequences of 8 tokens in groups of 16 (two sequences each): the loss pooled per group, per
    sequence or over everything, with padding."""
    from flax import nnx

    from moejax.moe import MoeLayer

    cfg = MoeConfig(num_experts=4, d_model=8, d_ff=8, top_k=2, dropless=True, max_group_size=16,
                    router_init_std=1.0, balance_loss_scope=scope, router_score="sigmoid", weight_norm="topk")
    layer = MoeLayer(cfg.validate(), rngs=nnx.Rngs(0))
    x = jax.random.normal(jax.random.key(3), (4, 8, 8))
    pad = np.arange(8)[None] < np.array([[8], [5], [8], [2]])
    _, stats = layer(x, padding_mask=jnp.asarray(pad), deterministic=True)
    logits = np.asarray(x, np.float64).reshape(32, 8) @ np.asarray(layer.router.kernel[...], np.float64)
    s = 1 / (1 + np.exp(-logits))
    probs = s / s.sum(-1, keepdims=True)
    selected = np.argsort(-s, axis=-1, kind="stable")[:, :2]
    mask = pad.reshape(32)
    size = {"group": 16, "sequence": 8, "global": 32}[scope]
    want = np.mean([_np_balance(probs[i:i + size], selected[i:i + size], mask[i:i + size], 4)
                    for i in range(0, 32, size)])
    np.testing.assert_allclose(float(stats.load_balancing_loss), want, rtol=1e-5)


@pytest.mark.parametrize("backend", ["gather", "einsum", "ragged", "bucket"])
def test_clamped_swiglu_experts_with_biases_match_reference(backend):
    """gpt-oss's experts (clamped SwiGLU, biased) through every backend, forward and gradients;
    biases and weights large enough that both clamps act."""
    kw = dict(dropless=True) if backend == "bucket" else dict(capacity_factor_eval=1.0)
    layer = build(top_k=2, weight_norm="topk", activation="clamped-swiglu", use_bias=True, backend=backend,
                  router_init_std=1.0, **kw)
    rng = np.random.default_rng(0)
    for name in ("wi_0", "wi_1", "bi", "bi_1", "bo"):
        p = getattr(layer.experts, name)
        p[...] = jnp.asarray(rng.normal(size=p[...].shape) * (4.0 if name.startswith("wi") else 1.0), jnp.float32)
    x = inputs()
    assert_match(layer, x, atol=2e-5)
    g = np.asarray(x) @ np.asarray(layer.experts.wi_0[...][0]) + np.asarray(layer.experts.bi[...][0])
    assert (g > 7).any() and (g < 7).any()                       # the gate clamp is active somewhere
