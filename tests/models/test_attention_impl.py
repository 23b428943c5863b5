"""Attention kernels (``attention_impl``): ``chunked`` and ``dot_product`` equal ``xla`` (forward and
gradients) with causal + sliding-window + padding masks, T5 relative bias, cross-attention and
grouped queries; whole models and cached decoding with the chunked kernel equal the default."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from moejax.inference.decode import generate
from moejax.models import build_model
from moejax.models.layers import Attention
from moejax.models.registry import get_config

IMPLS = ["chunked", "dot_product", "auto"]


def _attn(impl, heads=4, kv_heads=2, **kw):
    return Attention(32, heads, kv_heads, 8, impl=impl, chunk=4, rngs=nnx.Rngs(0), **kw)


def _compare(make, call, impls=IMPLS):
    """Output and gradients (params and input) of ``call(module)`` for each kernel vs ``xla``."""
    def run(impl):
        m = make(impl)
        graphdef, params = nnx.split(m)

        def f(p, x):
            return call(nnx.merge(graphdef, p), x)

        x = jnp.asarray(np.random.default_rng(0).normal(size=(2, 11, 32)), jnp.float32)
        y = f(params, x)
        grads = jax.grad(lambda p, x: jnp.sum(jnp.sin(f(p, x))), argnums=(0, 1))(params, x)
        return y, grads

    y0, g0 = run("xla")
    for impl in impls:
        y, g = run(impl)
        np.testing.assert_allclose(np.asarray(y), np.asarray(y0), atol=2e-6, rtol=1e-5, err_msg=impl)
        for a, b in zip(jax.tree.leaves(g), jax.tree.leaves(g0), strict=True):
            np.testing.assert_allclose(np.asarray(a), np.asarray(b), atol=5e-6, rtol=1e-4, err_msg=impl)


def test_causal_sliding_window_and_padding():
    pos = jnp.broadcast_to(jnp.arange(11), (2, 11))
    pad = jnp.asarray(np.arange(11)[None] < np.array([[11], [7]]))
    _compare(lambda i: _attn(i, sliding_window=3),
             lambda m, x: m(x, positions=pos, padding_mask=pad, causal=True))


def test_relative_bias_bidirectional_no_rope():
    bias = jnp.asarray(np.random.default_rng(1).normal(size=(1, 4, 11, 11)), jnp.float32)
    pad = jnp.asarray(np.arange(11)[None] < np.array([[11], [9]]))
    _compare(lambda i: _attn(i, kv_heads=4, rope_theta=None, scale=1.0),
             lambda m, x: m(x, padding_mask=pad, causal=False, bias=bias))


def test_cross_attention_with_explicit_mask():
    enc = jnp.asarray(np.random.default_rng(2).normal(size=(2, 6, 32)), jnp.float32)
    mask = jnp.asarray(np.arange(6)[None, None, None] < np.array([6, 4])[:, None, None, None])   # [b, 1, 1, m]
    _compare(lambda i: _attn(i, kv_heads=4, rope_theta=None),
             lambda m, x: m(x, kv=enc, mask=mask, causal=False))


@pytest.mark.parametrize("name", ["tiny_mixtral", "tiny_switch"])
def test_models_with_the_chunked_kernel(name):
    cfg = get_config(name)
    ids = jnp.asarray(np.random.default_rng(0).integers(1, cfg.vocab_size, (2, 13)))
    outs = []
    for impl in ("xla", "chunked"):
        m = build_model(cfg.replace(attention_impl=impl, attention_chunk=4), nnx.Rngs(0))
        outs.append(np.asarray((m(ids, ids) if name == "tiny_switch" else m(ids))[0]))
        if name == "tiny_mixtral":
            outs.append(np.asarray(generate(m, ids[:, :5], 6)))
    np.testing.assert_allclose(outs[0], outs[len(outs) // 2], atol=1e-5, rtol=1e-5)
    if name == "tiny_mixtral":
        np.testing.assert_array_equal(outs[1], outs[3])          # cached greedy decoding unchanged


def test_chunked_scores_are_smaller():
    """The chunked kernel's compiled temporaries hold [b, h, chunk, m], not [b, h, s, m], scores."""
    temps = {}
    for impl in ("xla", "chunked"):
        m = Attention(64, 4, 4, 16, impl=impl, chunk=64, rngs=nnx.Rngs(0))
        graphdef, params = nnx.split(m)
        x = jnp.zeros((1, 1024, 64))
        pos = jnp.broadcast_to(jnp.arange(1024), (1, 1024))
        loss = jax.jit(jax.grad(lambda p, g=graphdef, x=x, pos=pos: jnp.sum(nnx.merge(g, p)(x, positions=pos))))
        temps[impl] = loss.lower(params).compile().memory_analysis().temp_size_in_bytes
    assert temps["chunked"] < temps["xla"] / 3, temps


def test_bad_impl_is_refused():
    with pytest.raises(ValueError, match="unknown attention_impl 'flash'; valid: auto, xla, chunked, dot_product"):
        get_config("tiny_mixtral").replace(attention_impl="flash").validate()


def test_cudnn_eligibility_rules():
    """Where cuDNN's flash attention is asked for: never on CPU or in float32; head dims and odd
    lengths it cannot take go to XLA (checked on abstract shapes, any platform)."""
    from moejax.models.attend import cudnn_eligible

    q = jax.ShapeDtypeStruct((1, 16, 4, 64), jnp.bfloat16)
    on_gpu = jax.devices()[0].platform == "gpu"
    assert cudnn_eligible(q, q) == on_gpu
    assert not cudnn_eligible(jax.ShapeDtypeStruct((1, 16, 4, 64), jnp.float32), q)
    assert not cudnn_eligible(jax.ShapeDtypeStruct((1, 16, 4, 60), jnp.bfloat16), q)
    assert not cudnn_eligible(jax.ShapeDtypeStruct((1, 15, 4, 64), jnp.bfloat16), q)


@pytest.mark.skipif(jax.devices()[0].platform != "gpu", reason="cuDNN attention needs a GPU")
def test_cudnn_dot_product_bf16_equals_float32_reference():
    """On a GPU, bf16 ``dot_product`` runs cuDNN's fused kernel (its custom call is in the program)
    and equals the float32 ``xla`` kernel on the same bf16 inputs: causal + sliding window, a
    right-padded row and a left-padded one (whose first queries see no key: finite, ignored)."""
    from moejax.models.attend import attend

    b, s, h, j, x = 2, 256, 8, 2, 64
    rng = np.random.default_rng(0)
    q, k, v, cot = (jnp.asarray(rng.normal(size=shape), jnp.bfloat16)
                    for shape in [(b, s, h, x), (b, s, j, x), (b, s, j, x), (b, s, h, x)])
    idx = np.arange(s)
    valid = np.stack([idx < 200, idx >= 30])                                     # [b, m]
    mask = valid[:, None, :] & (idx[None, :] <= idx[:, None]) & (idx[:, None] - idx[None, :] < 100)
    mask = jnp.asarray(mask[:, None])                                            # [b, 1, s, m]
    seen = np.asarray(mask[:, 0].any(-1))                                        # [b, s] queries that see a key

    def run(impl, dt):
        f = lambda q, k, v: attend(q, k, v, mask=mask, scale=x**-0.5, dtype=dt, impl=impl)
        args = tuple(a.astype(dt) for a in (q, k, v))
        y, back = jax.vjp(f, *args)
        w = jnp.asarray(seen[:, :, None, None], dt)
        return y, back(cot.astype(dt) * w), jax.jit(f).lower(*args).as_text()

    y, g, hlo = run("dot_product", jnp.bfloat16)
    y0, g0, _ = run("xla", jnp.float32)
    assert "cudnn" in hlo.lower()
    for a in (y, *g):
        assert bool(jnp.all(jnp.isfinite(a.astype(jnp.float32))))
    rel = lambda a, r: float(jnp.linalg.norm((a.astype(jnp.float32) - r).ravel()) / jnp.linalg.norm(r.ravel()))
    keep = jnp.asarray(seen[:, :, None, None])
    assert rel(jnp.where(keep, y, 0), jnp.where(keep, y0, 0)) < 1e-2
    for a, r in zip(g, g0, strict=True):
        assert rel(a, r) < 2e-2


@pytest.mark.parametrize("window,causal", [(None, True), (100, True), (None, False)],
                         ids=["causal", "causal-window", "bidirectional"])
def test_splash_equals_xla_on_real_tokens(window, causal):
    """Pallas splash attention (in its interpreter off a TPU) on a self-attention over token-index
    positions: output and every gradient equal ``xla`` on the real tokens (a padding query attends
    padding keys there instead of the real ones: its output is discarded either way)."""
    s = 256
    x = jnp.asarray(np.random.default_rng(0).normal(size=(2, s, 32)), jnp.float32)
    pad = jnp.asarray(np.arange(s)[None] < np.array([[s], [190]]))

    def run(impl):
        graphdef, params = nnx.split(_attn(impl, sliding_window=window))

        def loss(p, x):
            y = nnx.merge(graphdef, p)(x, padding_mask=pad, causal=causal)
            return jnp.sum(jnp.sin(y) * pad[..., None]), y

        (_, y), grads = jax.value_and_grad(loss, argnums=(0, 1), has_aux=True)(params, x)
        return y, grads

    (y0, g0), (y1, g1) = run("xla"), run("splash")
    real = np.asarray(pad)
    np.testing.assert_allclose(np.asarray(y1)[real], np.asarray(y0)[real], atol=2e-6, rtol=1e-5)
    for a, b in zip(jax.tree.leaves(g1), jax.tree.leaves(g0), strict=True):
        # blockwise online softmax: another f32 summation order over 256 keys (gradients up to ~60)
        scale = float(np.max(np.abs(np.asarray(b))))
        np.testing.assert_allclose(np.asarray(a), np.asarray(b), atol=2e-6 * scale + 5e-6, rtol=1e-4)


def test_splash_falls_back_where_it_does_not_apply():
    """A bias, explicit positions or a KV cache leave no structure: ``splash`` runs ``chunked``
    (equal to ``xla`` everywhere, padding rows included); and a whole model with it, cached decoding
    included, equals the default on its real tokens."""
    _compare(lambda i: _attn(i, kv_heads=4, rope_theta=None, scale=1.0),
             lambda m, x: m(x, causal=False, bias=jnp.ones((1, 4, 11, 11))), impls=["splash"])
    pos = jnp.broadcast_to(jnp.arange(11), (2, 11))
    _compare(lambda i: _attn(i), lambda m, x: m(x, positions=pos), impls=["splash"])
    cfg = get_config("tiny_mixtral")
    ids = jnp.asarray(np.random.default_rng(3).integers(0, 256, (2, 128)))
    ref = build_model(cfg, nnx.Rngs(0))
    splash = build_model(cfg.replace(attention_impl="splash"), nnx.Rngs(0))
    np.testing.assert_allclose(np.asarray(splash(ids)[0]), np.asarray(ref(ids)[0]), atol=1e-4, rtol=1e-4)
    np.testing.assert_array_equal(np.asarray(generate(splash, ids[:, :8], 4)), np.asarray(generate(ref, ids[:, :8], 4)))
