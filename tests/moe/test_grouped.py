"""The ragged backend's grouped matmul: the Megablox TPU kernel (run here in Pallas interpret mode,
its CPU fallback) equals jax.lax.ragged_dot, alone and inside the MoE layer vs the Python-loop
reference; the platform choice of ``grouped_matmul='auto'``."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from moejax.moe import MoeConfig
from moejax.moe.grouped import grouped_matmul, megablox_available, resolve
from tests.moe.test_layer import assert_match, build, inputs

needs_megablox = pytest.mark.skipif(not megablox_available(), reason="this jax has no Megablox kernel")


@needs_megablox
@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16])
def test_megablox_equals_ragged_dot(dtype):
    kx, kw = jax.random.split(jax.random.key(0))
    m, k, n = 37, 16, 24                       # m not a multiple of the row tile; rows past the groups
    x = jax.random.normal(kx, (m, k), dtype)
    w = jax.random.normal(kw, (4, k, n), dtype)
    sizes = jnp.array([10, 0, 17, 6], jnp.int32)          # an empty group, 4 rows left over

    def run(impl):
        f = lambda x, w: jnp.sum(jnp.sin(grouped_matmul(x, w, sizes, impl).astype(jnp.float32)))
        return grouped_matmul(x, w, sizes, impl), jax.grad(f, argnums=(0, 1))(x, w)

    (y0, g0), (y1, g1) = run("ragged_dot"), run("megablox")
    tol = 1e-5 if dtype == jnp.float32 else 2e-2
    assert y1.dtype == dtype and y1.shape == (m, n)
    np.testing.assert_array_equal(np.asarray(y1[33:], np.float32), 0.0)
    for a, b in [(y0, y1), *zip(g0, g1)]:
        np.testing.assert_allclose(np.asarray(a, np.float32), np.asarray(b, np.float32), atol=tol, rtol=tol)


@needs_megablox
def test_layer_with_megablox_matches_reference():
    layer = build(top_k=2, activation="swiglu", use_bias=True, backend="ragged", dropless=True,
                  weight_norm="topk", grouped_matmul="megablox")
    for name in ("bi", "bi_1", "bo"):
        if hasattr(layer.experts, name):
            v = getattr(layer.experts, name)
            v[...] = jax.random.normal(jax.random.key(3), v.shape) * 0.1
    assert_match(layer, inputs())
    # ReLU experts with drops (train capacity): dropped assignments sit past sum(group_sizes)
    assert_match(build(top_k=2, backend="ragged", capacity_factor_train=0.75, grouped_matmul="megablox"),
                 inputs(), deterministic=False)


def test_auto_picks_megablox_only_on_tpu():
    assert resolve("auto", "cpu") == resolve("auto", "gpu") == "ragged_dot"
    assert resolve("auto", "tpu") == ("megablox" if megablox_available() else "ragged_dot")
    assert resolve("megablox", "cpu") == "megablox"
    with pytest.raises(ValueError, match="unknown grouped_matmul 'cutlass'; valid: auto, ragged_dot, megablox"):
        resolve("cutlass")
    with pytest.raises(ValueError, match="unknown grouped_matmul 'cutlass'"):
        MoeConfig(grouped_matmul="cutlass").validate()
