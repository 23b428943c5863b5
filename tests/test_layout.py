"""Pod-scale layouts from abstract shapes (moejax.layout) checked against the real sharded train
state on 8 CPU devices, closed-form dispatch-buffer sizes, and the replicated-parameter flags."""

import math

import jax
import numpy as np
import pytest

from moejax.layout import layout, suggest_mesh, table
from moejax.models.registry import get_config
from moejax.sharding import DEFAULT_RULES


def _device0_bytes(tree) -> int:
    """Bytes that device 0 really holds of a tree of sharded arrays."""
    dev = jax.devices()[0]
    return sum(s.data.nbytes for x in jax.tree.leaves(tree) for s in x.addressable_shards if s.device == dev)


@pytest.mark.parametrize("shape", [{"data": 2, "expert": 4}, {"data": 2, "expert": 2, "model": 2}])
def test_abstract_layout_equals_the_real_sharded_state(make_test_mesh, shape):
    from moejax.training.optim import make_optimizer
    from moejax.training.state import StepFns

    cfg = get_config("tiny_switch")
    rep = layout(cfg, shape, 16, {"inputs": 64, "targets": 32})
    for opt in ("adafactor", "adamw"):
        state = StepFns(cfg, make_optimizer(opt).tx, make_test_mesh(shape)).init()
        assert rep.params == _device0_bytes(state.params)
        assert getattr(rep, opt) == _device0_bytes(state.opt_state), opt
    assert rep.devices == 8 and rep.moe_layers == 2
    assert not [f for f in rep.flags if f.startswith(("replicated", "experts not split"))]


def test_dispatch_buffers_closed_form():
    cfg = get_config("tiny_switch")
    m = cfg.moe
    b, lengths, shape = 16, {"inputs": 64, "targets": 32}, {"data": 2, "expert": 4}
    rep = layout(cfg, shape, b, lengths)
    # encoder layers see 16 x 64 tokens: groups of <= max_group_size, a multiple of the 8 batch shards
    tokens = b * 64
    g = next(g for g in range(1, tokens + 1) if tokens % g == 0 and tokens // g <= m.max_group_size and g % 8 == 0)
    t = tokens // g
    c = max(math.ceil(m.capacity_factor_train * m.top_k * t / m.num_experts), m.min_capacity)
    assert (rep.groups, rep.capacity) == (g, c)
    # [g, e, c, d] bf16: before the all-to-all g over 8 batch shards, after it e over 4 and g over 2
    assert rep.dispatch == g * m.num_experts * c * m.d_model * 2 / 8
    assert rep.hidden == g * m.num_experts * c * m.d_ff * 2 / 8
    assert rep.moe_total == 2 * (2 * rep.dispatch + rep.hidden)


def test_flags_replicated_params_unsplit_experts_and_groups():
    cfg = get_config("switch_base_8")
    shape = {"data": 64, "expert": 8, "model": 4}
    ok = layout(cfg, shape, 2048, {"inputs": 512, "targets": 128})
    # the decoder's 2048 x 128 tokens make 128 groups with group_multiple=1: not a multiple of 512 shards
    assert ok.flags == ["set MoeConfig.group_multiple=512"]
    assert ok.replicated < 2**20                       # only small norms / routers / relpos stay whole
    broken = tuple((k, None if k in ("expert", "mlp", "vocab") else v) for k, v in DEFAULT_RULES)
    bad = layout(cfg, shape, 2048, {"inputs": 512, "targets": 128}, rules=broken)
    assert "replicated: embed/embedding" in bad.flags
    assert any(f.startswith("experts not split: encoder/") for f in bad.flags)
    assert bad.params > 8 * ok.params


def test_suggest_mesh_and_pod_table():
    assert suggest_mesh(get_config("switch_c_2048"), 2048) == {"data": 1, "expert": 1024, "model": 2}  # 30 heads
    assert suggest_mesh(get_config("mixtral_8x7b"), 2048) == {"data": 32, "expert": 8, "model": 8}
    text = table(["switch_c_2048", "nllb_moe_54b"], 2048)
    lines = text.splitlines()
    assert len(lines) == 4 and lines[2].startswith("| switch_c_2048 | 1x1024x2 |")
    # Switch-C: 1.57T params; experts split 2048 ways, the rest 2 ways, routers whole (30 x 2080 x 2048 f32)
    rep = layout(get_config("switch_c_2048"), {"data": 1, "expert": 1024, "model": 2}, 2048,
                 {"inputs": 512, "targets": 128})
    routers = 30 * 2080 * 2048 * 4
    assert routers <= rep.replicated < routers + 2**20     # + norms and relative-position tables
    assert 4.0 * 2**30 < rep.params < 5.5 * 2**30
    with pytest.raises(ValueError, match="not divisible by the 4 shards"):
        layout(get_config("switch_c_2048"), {"data": 1, "expert": 512, "model": 4}, 2048,
               {"inputs": 512, "targets": 128})
    assert np.isclose(rep.adamw, 2 * rep.params)
