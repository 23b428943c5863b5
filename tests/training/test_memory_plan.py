"""The train-step memory plan (``moejax.training.memory``) against what XLA assigns to the real
compiled step on the 8-device CPU mesh, and ``moejax layout --model``."""

import jax
import pytest

from moejax.main import main
from moejax.models.config import override
from moejax.models.registry import get_config
from moejax.sharding import make_mesh
from moejax.training.memory import compiled_peak, parse_bytes, plan

MIB = 2**20


def _mixtral(**kw):
    # its global-batch balance loss lets the dropless layer group the step's tokens by the 8 batch
    # shards itself (moejax.moe.capacity.group_multiple): the MoE splits over the devices
    return override(get_config("tiny_mixtral"), kw)


@pytest.mark.parametrize("remat,shape", [("none", {"data": 8}), ("full", {"fsdp": 8})],
                         ids=["no-remat-data8", "full-remat-fsdp8"])
def test_moe_decoder_plan_within_15_percent_of_the_compiled_step(remat, shape, devices):
    cfg = _mixtral(remat=remat)
    assert cfg.moe.balance_loss_scope == "global" and cfg.moe.group_multiple == 1
    lengths = {"targets": 128}
    p = plan(cfg, shape, 32, lengths)
    mesh = make_mesh(shape, devices)
    real = compiled_peak(cfg, mesh, 32, lengths)
    assert abs(p.total / real - 1) <= 0.15, (remat, shape, p.total / MIB, real / MIB, p.rows)
    assert p.rows["activations"] > 0.1 * p.total or remat == "full"   # activations matter at this size
    assert not p.flags
    if remat == "none":
        # with a per-group loss the 4096 tokens stay one group, which every device computes whole
        whole = compiled_peak(override(cfg, {"moe.balance_loss_scope": "group"}), mesh, 32, lengths)
        assert real < 0.5 * whole, (real / MIB, whole / MIB)


def test_remat_and_fsdp_change_the_rows_they_should():
    base = plan(_mixtral(), {"data": 8}, 32, {"targets": 128})
    full = plan(_mixtral(), {"data": 8}, 32, {"targets": 128}, remat="full")
    fsdp = plan(_mixtral(), {"fsdp": 8}, 32, {"targets": 128})
    assert full.rows["activations"] < 0.25 * base.rows["activations"]
    assert full.rows["params"] == base.rows["params"]
    for row in ("params", "optimizer state", "gradients"):
        assert fsdp.rows[row] < base.rows[row] / 6, row         # ~1/8 (norms and routers are tiny)
    assert fsdp.rows["activations"] == base.rows["activations"]


@pytest.mark.parametrize("remat,shape", [("none", {"data": 2, "expert": 4}), ("full", {"fsdp": 2, "expert": 4})],
                         ids=["no-remat-data2xexpert4", "full-remat-fsdp2xexpert4"])
def test_encoder_decoder_plan_within_15_percent_of_the_compiled_step(remat, shape, devices):
    """A Switch encoder-decoder of 4 + 4 layers (two scanned periods per stack; with a single period
    XLA unrolls the one-trip loop and merges the rematerialised forward back into the original)."""
    cfg = override(get_config("tiny_switch"), {"moe.group_multiple": 2, "num_encoder_layers": 4,
                                               "num_decoder_layers": 4, "remat": remat})
    lengths = {"inputs": 128, "targets": 64}
    p = plan(cfg, shape, 32, lengths)
    real = compiled_peak(cfg, make_mesh(shape, devices), 32, lengths)
    assert abs(p.total / real - 1) <= 0.15, (remat, shape, p.total / MIB, real / MIB, p.rows)


def test_groups_that_do_not_split_are_flagged():
    # 4096 tokens, one group: a per-group balance loss keeps the config's grouping
    p = plan(override(get_config("tiny_mixtral"), {"moe.balance_loss_scope": "group"}), {"data": 8}, 32,
             {"targets": 128})
    assert p.flags and "set moe.group_multiple=8" in p.flags[0], p.flags


def test_bad_values_are_refused():
    with pytest.raises(ValueError, match="batch 12 does not divide the 8 batch shards"):
        plan(_mixtral(), {"data": 8}, 12, {"targets": 16})
    with pytest.raises(ValueError, match="unknown optimizer 'sgdd'"):
        plan(_mixtral(), {"data": 8}, 8, {"targets": 16}, optimizer="sgdd")
    with pytest.raises(ValueError, match="bad memory size '95 parsecs'"):
        parse_bytes("95 parsecs")
    assert parse_bytes("95GiB") == 95 * 2**30 and parse_bytes("80GB") == 80e9


def test_layout_cli_mixtral_8x7b_fits_with_fsdp_and_remat_not_without(capsys):
    """The README's two commands: 8x7B on 256 chips of 95 GiB, bf16 compute, AdamW."""
    common = ["layout", "--model", "mixtral_8x7b", "--batch", "256", "--seq", "4096", "--dtype", "bfloat16",
              "--hbm", "95GiB"]
    assert main(common + ["--mesh", "fsdp=32,expert=8", "--remat", "full"]) == 0
    out = capsys.readouterr().out
    assert "| activations |" in out and "fits in 95 GiB" in out and "NOT" not in out, out
    total = float(out.split("**total** | **")[1].split("**")[0].replace(",", ""))
    assert total < 95
    assert main(common + ["--mesh", "data=32,expert=8", "--remat", "none"]) == 0
    out = capsys.readouterr().out
    assert "does NOT fit in 95 GiB" in out and "largest: activations" in out, out
    assert jax.devices()   # nothing above needed more than the abstract mesh
