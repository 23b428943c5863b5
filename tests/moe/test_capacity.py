"""Capacity arithmetic tables, group splitting, and slot assignment vs a Python loop."""

import jax
import numpy as np
import pytest

from moejax.moe import assign_slots, expert_capacity, num_groups


@pytest.mark.parametrize(
    "t,e,cf,k,min_cap,expected",
    [
        (4096, 8, 1.25, 1, 4, 640),     # Switch: ceil(1.25 * 4096 / 8)
        (4096, 128, 1.25, 2, 4, 80),    # top-2: ceil(1.25 * 2 * 4096 / 128)
        (4096, 128, 1.0, 1, 4, 32),
        (2048, 2048, 1.0, 1, 2, 2),     # switch-c: 1 token per expert, min 2
        (16, 64, 1.0, 1, 4, 4),         # min_capacity wins
        (10, 3, 1.0, 1, 0, 4),          # ceil(3.33)
        (12, 4, 0.5, 2, 1, 3),
        (8192, 8, 2.0, 2, 4, 4096),
    ],
)
def test_capacity_table(t, e, cf, k, min_cap, expected):
    assert expert_capacity(t, e, cf, k, min_cap) == expected


@pytest.mark.parametrize(
    "n,max_g,mult,expected",
    [(8192, 4096, 1, 2), (100, 4096, 1, 1), (96, 32, 1, 3), (96, 32, 4, 4), (10, 3, 1, 5), (128, 16, 8, 8),
     (128, 4096, 8, 8)],
)
def test_num_groups(n, max_g, mult, expected):
    g = num_groups(n, max_g, mult)
    assert g == expected and n % g == 0 and n // g <= max_g and g % mult == 0


def test_num_groups_impossible():
    with pytest.raises(ValueError, match="multiple of 2"):
        num_groups(7, 8, 2)


def python_slots(expert, priority, valid, e, c):
    slot = np.zeros_like(expert)
    kept = np.zeros_like(valid)
    fill = [0] * e
    for a in np.argsort(priority):
        if not valid[a]:
            continue
        slot[a] = fill[expert[a]]
        fill[expert[a]] += 1
        kept[a] = slot[a] < c
    return slot, kept


@pytest.mark.parametrize("seed", range(5))
def test_assign_slots_matches_loop(seed):
    rng = np.random.default_rng(seed)
    g, a, e, c = 3, 40, 5, 6
    expert = rng.integers(0, e, (g, a))
    priority = np.stack([rng.permutation(a) for _ in range(g)])
    valid = rng.random((g, a)) < 0.8
    slot, kept = jax.jit(assign_slots, static_argnums=(3, 4))(expert, priority, valid, e, c)
    for gi in range(g):
        rs, rk = python_slots(expert[gi], priority[gi], valid[gi], e, c)
        np.testing.assert_array_equal(np.asarray(kept[gi]), rk)
        np.testing.assert_array_equal(np.asarray(slot[gi])[valid[gi]], rs[valid[gi]])


def test_dropless_layers_with_pooled_losses_group_by_the_mesh(devices):
    """A dropless layer whose losses do not depend on the grouping (global / sequence balance loss)
    makes its groups a multiple of the batch shards of the current mesh; a per-group loss, a capacity
    layer or no mesh keep ``group_multiple``; tokens that cannot split fall back to it."""
    from moejax.moe import MoeConfig
    from moejax.moe.capacity import group_multiple, layer_groups
    from moejax.sharding import make_mesh

    glob = MoeConfig(num_experts=4, d_model=8, d_ff=16, top_k=2, dropless=True, balance_loss_scope="global")
    per_group = glob.replace(balance_loss_scope="group")
    capped = glob.replace(dropless=False)
    assert layer_groups(glob, 32, 128) == 1                      # no mesh: 4096 tokens fit one group
    with jax.set_mesh(make_mesh({"data": 2, "expert": 4}, devices)):
        assert group_multiple(glob) == 8 and layer_groups(glob, 32, 128) == 8
        assert layer_groups(glob.replace(balance_loss_scope="sequence", group_multiple=3), 48, 128) == 24
        assert layer_groups(per_group, 32, 128) == 1 and layer_groups(capped, 32, 128) == 1
        assert layer_groups(glob, 1, 4) == 1                     # 4 tokens: no multiple of 8 groups
    assert group_multiple(glob, batch_shards=16) == 16
