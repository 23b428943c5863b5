"""Aux-loss-free load balancing (DeepSeek-V3): the selection biases move by exactly
``rate * sign(mean load - load)`` per step through the normal train step (not by the optimizer,
not by weight decay), and the rule balances a skewed router on a toy problem."""

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx

from moejax.data.batches import to_global
from moejax.models.registry import get_config
from moejax.moe import MoeConfig, MoeLayer
from moejax.training.balance import bias_paths, sign_update, with_balance_labels
from moejax.training.optim import make_optimizer
from moejax.training.state import StepFns
from tests.training.test_training import fake_batch


def test_train_step_moves_each_bias_by_the_rate(make_test_mesh):
    cfg = get_config("tiny_mixtral", vocab_size=512)
    cfg = dataclasses.replace(cfg, moe=cfg.moe.replace(router_score="sigmoid", selection_bias=True,
                                                       weight_norm="topk", routed_scale=2.5))
    mesh = make_test_mesh({"data": 2, "expert": 4})
    rate = 0.01
    fns = StepFns(cfg, make_optimizer("adamw", 1e-2, schedule="constant", weight_decay=0.5).tx, mesh,
                  bias_update_rate=rate)
    state = fns.init()
    biases = lambda p: [np.asarray(v) for path, v in jax.tree_util.tree_flatten_with_path(p)[0]
                        if "selection_bias" in jax.tree_util.keystr(path)]
    kernels = lambda p: [np.asarray(v) for path, v in jax.tree_util.tree_flatten_with_path(p)[0]
                         if "router" in jax.tree_util.keystr(path) and "kernel" in jax.tree_util.keystr(path)]
    b0, k0 = biases(state.params), kernels(state.params)
    assert b0 and all(np.all(b == 0) for b in b0)
    with jax.set_mesh(mesh):
        state, _ = fns.train_step(state, to_global(fake_batch(enc=False), mesh))
    b1 = biases(state.params)
    for b in b1:
        steps = np.round(np.abs(b) / rate, 4)
        assert set(np.unique(steps)) <= {0.0, 1.0}, b          # +-rate or 0 (an expert exactly at the mean)
        assert np.any(b > 0) and np.any(b < 0)                  # some experts under-, some overloaded
    assert all(not np.array_equal(a, b) for a, b in zip(k0, kernels(state.params), strict=True))


def test_bias_rule_balances_a_skewed_router():
    """A router whose logits favour experts 0-1 strongly: the bias alone (the kernel frozen)
    brings the largest expert share from ~3x the mean to within 1.25x of it in 150 steps."""
    cfg = MoeConfig(num_experts=8, d_model=16, d_ff=16, top_k=2, router_score="sigmoid", selection_bias=True,
                    weight_norm="topk", dropless=True, router_bias=True, router_init_std=0.5).validate()
    layer = MoeLayer(cfg, rngs=nnx.Rngs(0))
    layer.router.bias[...] = jnp.asarray([4.0, 4.0, 0, 0, 0, 0, 0, 0], jnp.float32)
    graphdef, params, rest = nnx.split(layer, nnx.Param, ...)
    paths = bias_paths(layer)
    labels = with_balance_labels(lambda key: "train", params, paths)      # the bias balanced, the rest frozen
    labels = jax.tree.map(lambda lab: "freeze" if lab == "train" else lab, labels)
    tx = optax.multi_transform({"freeze": optax.set_to_zero(), "balance": sign_update(0.02)}, labels)
    opt = tx.init(params)

    def share(p, x):
        _, st = nnx.merge(graphdef, p, rest)(x, deterministic=True)
        return st.selection_fraction / cfg.top_k * cfg.num_experts          # load / mean load

    @jax.jit
    def step(p, opt, x):
        grads = jax.grad(lambda p: jnp.sum(nnx.merge(graphdef, p, rest)(x, deterministic=True)[0] ** 2))(p)
        updates, opt = tx.update(grads, opt, p)
        return optax.apply_updates(p, updates), opt

    x_eval = jax.random.normal(jax.random.key(99), (8, 32, 16))
    before = float(jnp.max(share(params, x_eval)))
    for i in range(150):
        params, opt = step(params, opt, jax.random.normal(jax.random.key(i), (8, 32, 16)))
    after = float(jnp.max(share(params, x_eval)))
    assert before > 2.5, before
    assert after < 1.25, after
    np.testing.assert_array_equal(np.asarray(params["router"]["kernel"][...]), np.asarray(layer.router.kernel[...]))
