"""The Megablox checks of tests/moe/test_grouped.py, run there in a fresh Python process.

The TPU kernel runs on CPU in Pallas interpret mode; compiling it inside a long-lived test worker
that has compiled hundreds of other programs crashed XLA (a segfault in ``backend_compile_and_load``,
twice in full-suite runs, never alone), so ``test_grouped.py`` runs this file in its own process.
Not collected by itself (no ``test_`` prefix)."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from moejax.moe.grouped import grouped_matmul
from tests.moe.test_layer import assert_match, build, inputs


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
