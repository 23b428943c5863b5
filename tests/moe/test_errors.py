"""Bad input raises a clear ValueError that names the offending value and what is valid."""

import jax
import jax.numpy as jnp
import pytest
from flax import nnx

from moejax.moe import MoeConfig, MoeLayer
from moejax.sharding import make_mesh


def build(**kw):
    base = dict(num_experts=4, d_model=8, d_ff=16)
    base.update(kw)
    return MoeLayer(MoeConfig(**base), rngs=nnx.Rngs(0))


@pytest.mark.parametrize(
    "kw,match",
    [
        (dict(top_k=5), r"top_k=5 > num_experts=4"),
        (dict(top_k=0), r"top_k must be >= 1, got 0"),
        (dict(capacity_factor_train=0.0), r"capacity_factor_train must be > 0, got 0.0"),
        (dict(capacity_factor_eval=-1.0), r"capacity_factor_eval must be > 0, got -1.0"),
        (dict(backend="scatter"), r"unknown backend 'scatter'; valid: auto, bucket, gather, einsum, ragged"),
        (dict(backend="bucket", router="expert_choice"), r"backend='bucket' needs a token-choice router"),
        (dict(dropless=True, capacity_buckets=()), r"capacity_buckets must be a non-empty tuple"),
        (dict(dropless=True, capacity_buckets=(1.0, 0.0)), r"capacity_buckets must be .* > 0, got \(1.0, 0.0\)"),
        (dict(second_expert_policy="best", top_k=2), r"unknown second_expert_policy 'best'; valid: all"),
        (dict(activation="tanh"), r"unknown activation 'tanh'; valid: relu"),
        (dict(router="hash"), r"unknown router 'hash'; valid: top_k, expert_choice, noisy_top_k"),
        (dict(weight_norm="l2"), r"unknown weight_norm 'l2'"),
        (dict(second_expert_policy="random", top_k=1), r"needs router='top_k' with top_k=2"),
        (dict(expert_dropout=1.0), r"expert_dropout must be in \[0, 1\), got 1.0"),
        (dict(num_experts=0, top_k=1), r"num_experts must be >= 1, got 0"),
        (dict(router="expert_choice", dropless=True), r"dropless=True is invalid"),
        (dict(inner=MoeConfig(num_experts=2, d_model=4, d_ff=4)), r"inner MoE d_model=4 must equal"),
    ],
)
def test_bad_config(kw, match):
    with pytest.raises(ValueError, match=match):
        build(**kw)


@pytest.mark.parametrize("shape", [(2, 8), (1, 2, 3, 8)])
def test_wrong_rank(shape):
    with pytest.raises(ValueError, match=r"rank 3 \[batch, length, d_model\]; got shape"):
        build()(jnp.ones(shape), deterministic=True)


def test_wrong_d_model_and_mask():
    layer = build()
    with pytest.raises(ValueError, match="d_model=6 but the layer was built with d_model=8"):
        layer(jnp.ones((1, 2, 6)), deterministic=True)
    with pytest.raises(ValueError, match=r"padding_mask shape \(1, 3\) must equal"):
        layer(jnp.ones((1, 2, 8)), padding_mask=jnp.ones((1, 3), bool), deterministic=True)


def test_experts_not_divisible_by_mesh_at_call(devices):
    layer = build(num_experts=6, top_k=1)
    mesh = make_mesh({"data": 2, "expert": 4}, devices)
    with jax.set_mesh(mesh):
        with pytest.raises(ValueError, match=r"num_experts=6 is not divisible by the expert mesh axis of size 4"):
            layer(jnp.ones((8, 4, 8)), deterministic=True)


def test_ragged_rejects_hierarchical():
    with pytest.raises(ValueError, match="need backend 'gather' or 'einsum', not 'ragged'"):
        build(backend="ragged", inner=MoeConfig(num_experts=2, d_model=8, d_ff=8))
