"""Sharded MoE on 8 emulated CPU devices == single device; params sharded per the rules; all-to-all."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

from moejax.moe import MoeConfig, MoeLayer
from moejax.sharding import DEFAULT_RULES, create_sharded, logical_to_spec, make_mesh, state_specs

B, S, D, F, E = 8, 16, 16, 32, 8


def cfg_for(backend="gather", **kw):
    base = dict(num_experts=E, d_model=D, d_ff=F, top_k=2, max_group_size=S, group_multiple=8,
                capacity_factor_eval=1.0, min_capacity=1, backend=backend, activation="swiglu")
    base.update(kw)
    return MoeConfig(**base)


def fwd_and_grads(layer, x, cot):
    graphdef, params, rest = nnx.split(layer, nnx.Param, ...)

    @jax.jit
    def f(params, rest, x):
        def loss(params, x):
            y, stats = nnx.merge(graphdef, params, rest)(x, deterministic=True)
            return jnp.sum(y * cot) + stats.load_balancing_loss + stats.router_z_loss, (y, stats)

        (_, (y, stats)), grads = jax.value_and_grad(loss, argnums=(0, 1), has_aux=True)(params, x)
        return y, stats, grads

    return f(params, rest, x)


def _sharded_matches(layer, mesh, x, cot, y0, gx0, gp0):
    """Run the sharded ``layer`` on ``mesh``; assert output and gradients equal the single-device
    ones; return its stats."""
    with jax.set_mesh(mesh):
        xs = jax.device_put(x, NamedSharding(mesh, P(("data", "expert") if "expert" in mesh.shape else "data")))
        y1, st1, (gp1, gx1) = fwd_and_grads(layer, xs, cot)
    np.testing.assert_allclose(y1, y0, atol=1e-5, rtol=1e-5)
    np.testing.assert_allclose(gx1, gx0, atol=1e-5, rtol=1e-5)
    for (path, a), (_, b) in zip(jax.tree_util.tree_leaves_with_path(gp1), jax.tree_util.tree_leaves_with_path(gp0)):
        np.testing.assert_allclose(a, b, atol=1e-5, rtol=1e-4, err_msg=str(path))
    return st1


@pytest.mark.parametrize("backend", ["gather", "einsum"])
def test_sharded_equals_single_device(mesh, backend):
    cfg = cfg_for(backend)
    x = jax.random.normal(jax.random.key(1), (B, S, D))
    cot = jax.random.normal(jax.random.key(2), (B, S, D))
    ref_layer = MoeLayer(cfg, rngs=nnx.Rngs(0))
    y0, st0, (gp0, gx0) = fwd_and_grads(ref_layer, x, cot)
    assert int(st0.num_dropped) > 0  # cf 1.0 drops some: the sharded run must drop the same ones

    layer = create_sharded(lambda: MoeLayer(cfg, rngs=nnx.Rngs(0)), mesh)
    st1 = _sharded_matches(layer, mesh, x, cot, y0, gx0, gp0)
    assert int(st1.num_dropped) == int(st0.num_dropped)
    np.testing.assert_allclose(st1.load_balancing_loss, st0.load_balancing_loss, rtol=1e-5)


@pytest.mark.parametrize("skewed", [False, True], ids=["balanced", "one-hot-expert"])
def test_dropless_bucket_sharded_equals_single_device(mesh, skewed):
    """The dropless ``bucket`` backend (default for dropless): same outputs, gradients and bucket
    on every mesh; skewed, expert 0 gets every token and the top bucket runs in rounds."""
    cfg = cfg_for("auto", dropless=True, weight_norm="topk", capacity_buckets=(1.0, 1.5))
    x = jax.random.normal(jax.random.key(1), (B, S, D))
    x = x.at[..., 0].set(jnp.abs(x[..., 0]) + 1.0)          # feature 0 >= 1 ...
    cot = jax.random.normal(jax.random.key(2), (B, S, D))

    def make():
        layer = MoeLayer(cfg, rngs=nnx.Rngs(0))
        if skewed:                                          # ... so every token's first choice is expert 0
            layer.router.kernel[...] = layer.router.kernel[...].at[0, 0].add(10.0)
        return layer

    y0, st0, (gp0, gx0) = fwd_and_grads(make(), x, cot)
    assert int(st0.num_dropped) == 0
    assert int(st0.capacity_used) >= int(st0.max_expert_load)
    if skewed:                       # ladder (8,) at t = 16: expert 0 holds all 16 tokens -> 2 rounds of 8
        assert int(st0.max_expert_load) == S and int(st0.capacity_used) == 2 * 8
    layer = create_sharded(make, mesh)
    st1 = _sharded_matches(layer, mesh, x, cot, y0, gx0, gp0)
    assert int(st1.capacity_used) == int(st0.capacity_used)
    assert int(st1.max_expert_load) == int(st0.max_expert_load)


def test_params_sharded_as_rules_say(make_test_mesh):
    mesh = make_test_mesh({"data": 2, "expert": 2, "model": 2})
    layer = create_sharded(lambda: MoeLayer(cfg_for(), rngs=nnx.Rngs(0)), mesh)
    wi0 = layer.experts.wi_0[...]
    assert wi0.sharding.spec == P("expert", None, "model")
    assert layer.experts.wo[...].sharding.spec == P("expert", "model", None)
    assert layer.router.kernel[...].sharding.spec == P(None, None)
    # each device holds 1/2 of the experts and 1/2 of d_ff
    shard = wi0.addressable_shards[0].data
    assert shard.shape == (E // 2, D, F // 2)
    # logical -> mesh mapping drops axes the mesh lacks
    assert logical_to_spec(("batch", "embed"), DEFAULT_RULES, make_test_mesh({"data": 8})) == P("data", None)


def _compiled_text(layer, x, mesh, grad=False):
    graphdef, params, rest = nnx.split(layer, nnx.Param, ...)

    def fwd(params, x):
        return nnx.merge(graphdef, params, rest)(x, deterministic=True)[0]

    with jax.set_mesh(mesh):
        f = jax.jit(jax.grad(lambda p, x: jnp.sum(fwd(p, x) ** 2), argnums=(0, 1)) if grad else fwd)
        return f.lower(params, x).compile().as_text()


def test_expert_parallel_hlo_has_all_to_all(make_test_mesh):
    for shape in ({"data": 2, "expert": 4}, {"data": 1, "expert": 8}):
        mesh = make_test_mesh(shape)
        layer = create_sharded(lambda: MoeLayer(cfg_for(), rngs=nnx.Rngs(0)), mesh)
        x = jax.device_put(jax.random.normal(jax.random.key(1), (B, S, D)),
                           NamedSharding(mesh, P(("data", "expert"))))
        hlo = _compiled_text(layer, x, mesh)
        assert "all-to-all" in hlo, shape
        # the expert weights are never gathered: no all-gather produces an [E, ...] weight tensor
        gathers = " ".join(line for line in hlo.splitlines() if "all-gather" in line)
        assert f"f32[{E},{D},{F}]" not in gathers and f"f32[{E},{F},{D}]" not in gathers


@pytest.mark.parametrize("grad", [False, True], ids=["forward", "gradient"])
def test_dropless_bucket_hlo_has_all_to_all(make_test_mesh, grad):
    cfg = cfg_for("auto", dropless=True, weight_norm="topk")
    for shape in ({"data": 2, "expert": 4}, {"data": 1, "expert": 8}):
        mesh = make_test_mesh(shape)
        layer = create_sharded(lambda: MoeLayer(cfg, rngs=nnx.Rngs(0)), mesh)
        x = jax.device_put(jax.random.normal(jax.random.key(1), (B, S, D)),
                           NamedSharding(mesh, P(("data", "expert"))))
        hlo = _compiled_text(layer, x, mesh, grad)
        assert "all-to-all" in hlo, shape
        gathers = " ".join(line for line in hlo.splitlines() if "all-gather" in line)
        assert f"f32[{E},{D},{F}]" not in gathers and f"f32[{E},{F},{D}]" not in gathers


def test_experts_not_divisible_by_expert_axis(make_test_mesh):
    mesh = make_test_mesh({"data": 2, "expert": 4})
    with pytest.raises(ValueError, match=r"size 6.*not divisible by the 4 shards"):
        create_sharded(lambda: MoeLayer(cfg_for(num_experts=6), rngs=nnx.Rngs(0)), mesh)


def test_state_specs_replicate_unannotated(make_test_mesh):
    mesh = make_test_mesh({"data": 8})
    abstract = nnx.eval_shape(lambda: MoeLayer(cfg_for(), rngs=nnx.Rngs(0)))
    specs = state_specs(nnx.state(abstract), mesh)
    leaves = jax.tree.leaves(specs, is_leaf=lambda s: isinstance(s, P))
    assert all(isinstance(s, P) for s in leaves)


def test_make_mesh_wrong_device_count(devices):
    with pytest.raises(ValueError, match="needs 6 devices but 8"):
        make_mesh({"data": 2, "expert": 3}, devices)
