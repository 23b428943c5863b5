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


def test_router_dtype_ablation_bf16_router_runs_and_logits_are_f32():
    import jax
    import jax.numpy as jnp
    from flax import nnx

    from moejax.moe import MoeConfig, MoeLayer

    x = jax.random.normal(jax.random.key(0), (2, 8, 16))
    f32 = MoeLayer(MoeConfig(num_experts=4, d_model=16, d_ff=32), rngs=nnx.Rngs(0))
    bf = MoeLayer(MoeConfig(num_experts=4, d_model=16, d_ff=32, router_dtype=jnp.bfloat16), rngs=nnx.Rngs(0))
    la, lb = f32.router.logits(x), bf.router.logits(x)
    assert la.dtype == lb.dtype == jnp.float32
    assert 0 < float(jnp.max(jnp.abs(la - lb))) < 0.05          # bf16 rounding, nothing else
