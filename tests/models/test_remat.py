"""Rematerialisation policies on the scanned blocks: gradients equal to no remat (decoder and
encoder-decoder, MoE included), compiled temporary memory falls, bad names refused."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from moejax.models import build_model
from moejax.models.registry import get_config
from moejax.models.remat import Remat

POLICIES = [r.value for r in Remat]           # CPU devices have pinned_host memory: offload runs here too
REMAT_CASES = [("tiny_mixtral", ("none", "full", "dots_with_no_batch_dims_saveable", "offload_dots")),
               ("tiny_switch", ("none", "full", "dots_saveable"))]


def _batch(cfg, b=4, s=16):
    rng = np.random.default_rng(0)
    ids = jnp.asarray(rng.integers(1, cfg.vocab_size, (b, s)))
    return ids, jnp.asarray(rng.integers(1, cfg.vocab_size, (b, s)))


def _grad_fn(cfg):
    model = build_model(cfg, nnx.Rngs(0))
    graphdef, params, rest = nnx.split(model, nnx.Param, ...)
    ids, tgt = _batch(cfg)
    encdec = hasattr(cfg, "num_encoder_layers")

    def loss(p):
        m = nnx.merge(graphdef, p, rest)
        logits = (m(ids, tgt, deterministic=True) if encdec else m(ids, deterministic=True))[0]
        return jnp.mean(jax.nn.log_softmax(logits)[..., 0] ** 2)

    return jax.jit(jax.value_and_grad(loss)), params


@pytest.mark.parametrize("name,policies", REMAT_CASES)
def test_gradients_equal_without_remat(name, policies):
    """Every policy on at least one model (each extra policy is a full fwd+bwd compile)."""
    assert set(POLICIES) <= set(policies) | {p for _, ps in REMAT_CASES for p in ps}
    base = get_config(name)
    ref_loss, ref = None, None
    for pol in policies:
        fn, params = _grad_fn(base.replace(remat=pol))
        loss, grads = fn(params)
        if ref is None:
            ref_loss, ref = loss, grads
            continue
        np.testing.assert_allclose(float(loss), float(ref_loss), rtol=1e-6)
        # the recomputed forward fuses differently: equal up to f32 summation order
        for a, b in zip(jax.tree.leaves(grads), jax.tree.leaves(ref), strict=True):
            a, b = np.asarray(a), np.asarray(b)
            assert np.max(np.abs(a - b)) <= 1e-5 * max(np.max(np.abs(b)), 1e-6), (pol, np.max(np.abs(a - b)))


def test_full_remat_needs_less_temporary_memory():
    cfg = get_config("tiny_llama").replace(num_layers=8)
    temps = {}
    for pol in ("none", "dots_with_no_batch_dims_saveable", "full"):
        fn, params = _grad_fn(cfg.replace(remat=pol))
        temps[pol] = fn.lower(params).compile().memory_analysis().temp_size_in_bytes
    assert temps["full"] < temps["dots_with_no_batch_dims_saveable"] <= temps["none"], temps
    assert temps["full"] < 0.7 * temps["none"], temps


def test_bad_policy_is_refused(monkeypatch):
    from moejax.models import remat

    with pytest.raises(ValueError, match="unknown remat policy 'some'; valid: none, full"):
        get_config("tiny_mixtral").replace(remat="some").validate()
    monkeypatch.setattr(remat, "_has_pinned_host", lambda: False)      # a device without host memory
    with pytest.raises(ValueError, match="remat='offload_dots' offloads to host memory"):
        remat.policy("offload_dots")
