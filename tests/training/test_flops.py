"""Model FLOPs per train step (closed form for a dense decoder, MoE counted at its active experts,
encoder-decoder per stack) and the device peak / MFU reported in the train metrics."""

import jax
import pytest

from moejax.models.registry import get_config
from moejax.training.flops import PEAK_FLOPS, device_peak_flops, mfu, train_step_flops


def test_dense_decoder_closed_form():
    cfg = get_config("tiny_llama")          # d=64, 2 layers, 4 heads x 16, kv 2, swiglu 256, vocab 256, untied
    d, f, h, x, j, v, layers, s = 64, 256, 4, 16, 2, 256, 2, 24
    per_layer = d * h * x + 2 * d * j * x + h * x * d + 3 * d * f          # attention + swiglu (norms ~0)
    n = layers * per_layer + d * v                                          # + the output projection
    norms = (2 * layers + 1) * d
    want = 8 * (6 * (n + norms) * s + 12 * layers * h * x * s * s)
    assert train_step_flops(cfg, 8, {"inputs": 8, "targets": 16}) == pytest.approx(want, rel=1e-9)


def test_moe_counts_active_experts_and_encdec_counts_each_stack():
    dense, moe = get_config("tiny_llama"), get_config("tiny_mixtral")
    lengths = {"inputs": 8, "targets": 8}
    # tiny_mixtral: 4 experts top-2 of d_ff 128 = the active FFN of a dense 256-wide SwiGLU
    assert train_step_flops(moe, 4, lengths) > train_step_flops(dense.replace(d_ff=256), 4, lengths) * 0.99
    t5 = train_step_flops(get_config("tiny_t5"), 4, {"inputs": 16, "targets": 8})
    assert t5 > 0 and train_step_flops(get_config("tiny_t5"), 4, {"inputs": 32, "targets": 8}) > t5


def test_peak_table_and_mfu():
    assert dict(PEAK_FLOPS)["H100"] == 989e12
    peak, src = device_peak_flops()
    if jax.devices()[0].platform == "cpu":
        assert "measured" in src and 1e8 < peak < 1e14
    assert mfu(1e12, 2.0, 8, 1e12) == pytest.approx(0.25)

