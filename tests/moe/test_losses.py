"""Auxiliary losses against closed forms and plain numpy."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from moejax.moe import importance_loss, load_balancing_loss, load_loss, router_z_loss


@pytest.mark.parametrize("e", [2, 4, 8])
def test_load_balancing_exactly_one_when_balanced(e):
    t = 4 * e
    probs = jax.nn.softmax(jax.random.normal(jax.random.key(0), (2, t, e)))
    selected = (jnp.arange(t) % e)[None, :, None].repeat(2, 0)  # perfectly balanced top-1
    mask = jnp.ones((2, t), bool)
    np.testing.assert_allclose(load_balancing_loss(probs, selected, mask), 1.0, rtol=1e-6)


def test_load_balancing_top_k_convention_equals_k():
    e, t = 4, 16
    probs = jnp.full((1, t, e), 1.0 / e)
    sel = jnp.stack([jnp.arange(t) % e, (jnp.arange(t) + 1) % e], -1)[None]
    np.testing.assert_allclose(load_balancing_loss(probs, sel, jnp.ones((1, t), bool)), 2.0, rtol=1e-6)


def test_load_balancing_matches_switch_formula_and_masks_padding():
    rng = np.random.default_rng(0)
    g, t, e = 3, 10, 4
    logits = rng.normal(size=(g, t, e))
    probs = np.exp(logits) / np.exp(logits).sum(-1, keepdims=True)
    sel = probs.argmax(-1)[..., None]
    mask = np.ones((g, t), bool)
    mask[:, 7:] = False
    # HF / Switch eq. 4 per group on the real tokens: E^2 * mean_e(f_e * P_e)
    expected = []
    for gi in range(g):
        f = np.eye(e)[sel[gi, :7, 0]].mean(0)
        p = probs[gi, :7].mean(0)
        expected.append(e * e * np.mean(f * p))
    got = load_balancing_loss(jnp.asarray(probs), jnp.asarray(sel), jnp.asarray(mask))
    np.testing.assert_allclose(got, np.mean(expected), rtol=1e-5)


def test_z_loss_closed_form():
    e = 8
    np.testing.assert_allclose(router_z_loss(jnp.zeros((2, 5, e)), jnp.ones((2, 5), bool)), np.log(e) ** 2,
                               rtol=1e-6)
    logits = jnp.array([[[1.0, 2.0], [3.0, -1.0], [100.0, 100.0]]])
    mask = jnp.array([[True, True, False]])
    lse = np.log(np.exp([1, 2]).sum()), np.log(np.exp([3, -1]).sum())
    np.testing.assert_allclose(router_z_loss(logits, mask), np.mean(np.square(lse)), rtol=1e-6)


def test_importance_loss_cv_squared():
    gates = jnp.array([[[0.5, 0.5, 0.0], [1.0, 0.0, 0.0]]])
    imp = np.array([1.5, 0.5, 0.0])
    np.testing.assert_allclose(importance_loss(gates, jnp.ones((1, 2), bool)), imp.var() / imp.mean() ** 2,
                               rtol=1e-5)
    assert float(importance_loss(jnp.full((1, 4, 4), 0.25), jnp.ones((1, 4), bool))) < 1e-9


def test_load_loss_matches_numpy():
    from scipy.stats import norm

    rng = np.random.default_rng(1)
    g, t, e, k = 1, 6, 4, 2
    clean = rng.normal(size=(g, t, e))
    std = np.abs(rng.normal(size=(g, t, e))) + 0.1
    noisy = clean + rng.normal(size=(g, t, e)) * std
    load = np.zeros(e)
    for i in range(t):
        for j in range(e):
            others = np.delete(noisy[0, i], j)
            thr = np.sort(others)[::-1][k - 1]  # k-th largest among the other experts
            load[j] += norm.cdf((clean[0, i, j] - thr) / std[0, i, j])
    expected = load.var() / load.mean() ** 2
    got = load_loss(jnp.asarray(clean), jnp.asarray(noisy), jnp.asarray(std), k, jnp.ones((g, t), bool))
    np.testing.assert_allclose(got, expected, rtol=1e-4)
    grad = jax.grad(lambda c: load_loss(c, jnp.asarray(noisy), jnp.asarray(std), k, jnp.ones((g, t), bool)))(
        jnp.asarray(clean))
    assert bool(jnp.all(jnp.isfinite(grad))) and float(jnp.abs(grad).sum()) > 0
