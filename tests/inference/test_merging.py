"""Expert merging: identities, identical experts, frequency weights, similarity grouping, errors."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from moejax.inference.merging import expert_usage, merge_experts, moe_layer_paths, param_counts
from moejax.models import build_model
from moejax.models.registry import get_config


def switch(**kw):
    cfg = get_config("tiny_switch")
    moe = cfg.moe.replace(capacity_factor_eval=8.0, num_experts=8, **kw)   # ample capacity: nothing dropped
    return build_model(cfg.replace(moe=moe), nnx.Rngs(0))


def mixtral():
    cfg = get_config("tiny_mixtral")
    return build_model(cfg.replace(moe=cfg.moe.replace(num_experts=8)), nnx.Rngs(0))


ENC = jax.random.randint(jax.random.key(1), (2, 10), 2, 256)
DEC = jax.random.randint(jax.random.key(2), (2, 6), 2, 256)


def out(model):
    return model(ENC, DEC)[0] if hasattr(model, "encode") else model(ENC)[0]


def tie_experts(model, groups):
    """Make the experts of each group identical (copies of the group's first member)."""
    for path in moe_layer_paths(model):
        layer = model
        for k in path:
            layer = layer[k] if isinstance(k, int) else getattr(layer, k)
        for name in ("wi", "wi_0", "wi_1", "wo"):
            if hasattr(layer.experts, name):
                w = getattr(layer.experts, name)
                v = w[...]
                for gr in groups:
                    v = v.at[:, gr].set(v[:, gr[:1]])
                w[...] = v


@pytest.mark.parametrize("make", [switch, mixtral], ids=["switch", "mixtral"])
def test_merge_to_same_count_is_identity(make):
    model = make()
    merged = merge_experts(model, 8)
    np.testing.assert_allclose(out(merged), out(model), atol=1e-6)


@pytest.mark.parametrize("make", [switch, mixtral], ids=["switch", "mixtral"])
def test_merging_identical_experts_changes_nothing(make):
    model = make()
    tie_experts(model, [[0, 1], [2, 3], [4, 5], [6, 7]])
    merged = merge_experts(model, 4)
    assert merged.cfg.moe.num_experts == 4 and merged.cfg.moe.expert_map == (0, 0, 1, 1, 2, 2, 3, 3)
    np.testing.assert_allclose(out(merged), out(model), atol=1e-5)
    tie_experts(model, [list(range(8))])
    np.testing.assert_allclose(out(merge_experts(model, 1)), out(model), atol=1e-5)   # 1 expert = dense FFN
    total, active = param_counts(merge_experts(model, 1))
    assert total < param_counts(model)[0]


def test_router_similarity_grouping_finds_the_pairs():
    model = switch()
    pairs = [[0, 5], [1, 6], [2, 7], [3, 4]]
    tie_experts(model, pairs)
    for path in moe_layer_paths(model):
        layer = model
        for k in path:
            layer = layer[k] if isinstance(k, int) else getattr(layer, k)
        kern = layer.router.kernel[...]
        for a, b in pairs:          # nearly equal router columns within each pair
            kern = kern.at[..., b].set(kern[..., a] + 1e-4)
        layer.router.kernel[...] = kern
    base = out(model)
    by_router = merge_experts(model, 4, group_by="router")
    by_weights = merge_experts(model, 4, group_by="weights")
    by_index = merge_experts(model, 4, group_by="index")
    np.testing.assert_allclose(out(by_router), base, atol=1e-4)
    np.testing.assert_allclose(out(by_weights), base, atol=1e-4)
    assert not np.allclose(out(by_index), base, atol=1e-3)


def test_frequency_weighted_average():
    model = switch()
    batch = {"encoder_input_tokens": np.asarray(ENC), "decoder_input_tokens": np.asarray(DEC),
             "decoder_target_tokens": np.asarray(DEC)}
    usage = expert_usage(model, [batch])
    path = [p for p in moe_layer_paths(model) if p[0] == "encoder"][0]
    f = usage[path]
    assert f.shape == (1, 8) and np.allclose(f.sum(-1), 1.0)          # top-1: one selection per token
    merged = merge_experts(model, 4, method="frequency", usage=usage)
    src = model.encoder.stack.blocks[1].ffn.experts.wi[...][0]
    got = merged.encoder.stack.blocks[1].ffn.experts.wi[...][0]
    w = f[0, :2] / f[0, :2].sum() if f[0, :2].sum() > 0 else np.array([0.5, 0.5])
    np.testing.assert_allclose(got[0], w[0] * src[0] + w[1] * src[1], atol=1e-6)


def test_merge_errors():
    model = switch()
    with pytest.raises(ValueError, match=r"cannot merge 8 experts into 0; choose 1 <= num_experts <= 8"):
        merge_experts(model, 0)
    with pytest.raises(ValueError, match=r"cannot merge 8 experts into 16"):
        merge_experts(model, 16)
    with pytest.raises(ValueError, match="num_experts=3 must divide the 8 experts"):
        merge_experts(model, 3)
    with pytest.raises(ValueError, match="unknown merge method 'median'"):
        merge_experts(model, 4, method="median")
    with pytest.raises(ValueError, match="needs usage="):
        merge_experts(model, 4, method="frequency")
    with pytest.raises(ValueError, match="no MoE layers"):
        merge_experts(build_model(get_config("tiny_t5"), nnx.Rngs(0)), 1)
    assert jnp is not None
