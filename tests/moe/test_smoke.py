"""Smoke test: the layer builds, jits and returns finite outputs on 8 emulated devices."""

import jax
import jax.numpy as jnp
from flax import nnx

from moejax.moe import MoeConfig, MoeLayer


def test_layer_jits_and_is_finite(devices):
    layer = MoeLayer(MoeConfig(num_experts=4, d_model=16, d_ff=32, top_k=2), rngs=nnx.Rngs(0))
    x = jax.random.normal(jax.random.key(0), (2, 8, 16))
    y, stats = nnx.jit(lambda m, x: m(x, deterministic=True))(layer, x)
    assert y.shape == x.shape and bool(jnp.all(jnp.isfinite(y)))
    assert int(stats.num_routed) == 2 * 8 * 2
