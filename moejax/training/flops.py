"""Model FLOPs of a train step and the device peak they are compared with (MFU).

Model FLOPs count the useful work of the model, not what the hardware ran (no MoE capacity padding,
no rematerialisation, no dropped-token savings): the PaLM estimate ``6 N`` per token for the
matmuls of the ``N`` active non-embedding parameters (plus the output projection) in forward and
backward, plus ``12 * layers * heads * head_dim * keys`` per token for the attention scores and
context. Encoder-decoders count each stack on its own tokens (the decoder's cross-attention over
the inputs). ``mfu = model FLOPs per second / (devices * peak per device)``.

The peak per device comes from a table of bf16 dense peaks by ``device_kind`` (TPU v4 / v5e / v5p /
v6e, A100, H100, H200, B200); any other device (CPU included) uses the float32 matmul rate measured
on it (:func:`measured_matmul_peak`).
"""

from __future__ import annotations

import time

import jax
import jax.numpy as jnp
import numpy as np

from moejax.models.build import abstract_model
from moejax.models.config import EncDecConfig
from moejax.models.params import count

#: bf16 dense peak FLOP/s per device, by a substring of ``jax.Device.device_kind`` (first match).
PEAK_FLOPS = (
    ("TPU v6", 918e12), ("TPU v5 lite", 197e12), ("TPU v5e", 197e12), ("TPU v5", 459e12), ("TPU v4", 275e12),
    ("B200", 2250e12), ("H200", 989e12), ("H100", 989e12), ("A100", 312e12),
)


def measured_matmul_peak(n: int = 1024, reps: int = 3) -> float:
    """FLOP/s of an ``n x n`` float32 matmul on the default device (best of ``reps``)."""
    a = jnp.ones((n, n), jnp.float32)
    f = jax.jit(lambda x: x @ x)
    f(a).block_until_ready()
    best = float("inf")
    for _ in range(reps):
        t = time.perf_counter()
        f(a).block_until_ready()
        best = min(best, time.perf_counter() - t)
    return 2 * n ** 3 / best


def device_peak_flops(device=None) -> tuple[float, str]:
    """``(peak FLOP/s of one device, where it came from)``."""
    device = device or jax.devices()[0]
    kind = getattr(device, "device_kind", "") or ""
    for key, peak in PEAK_FLOPS:
        if key.lower() in kind.lower():
            return peak, f"table ({key}, bf16 dense)"
    return measured_matmul_peak(), f"measured f32 matmul on {device.platform}"


def _stack_flops(active: float, tokens: float, layers: int, heads: int, head_dim: int, keys: float) -> float:
    return 6.0 * active * tokens + 12.0 * layers * heads * head_dim * keys * tokens


def train_step_flops(cfg, batch: int, lengths: dict) -> float:
    """Model FLOPs of one train step (forward + backward) on ``batch`` sequences of the task's
    feature ``lengths`` (``{'inputs': ..., 'targets': ...}``; decoder-only models see
    ``inputs + targets`` tokens per sequence)."""
    model = abstract_model(cfg)
    head = cfg.d_model * cfg.vocab_size                 # the output projection (tied or not) is a matmul
    if isinstance(cfg, EncDecConfig):
        lin, lt = lengths.get("inputs", 0), lengths.get("targets", 0)
        enc = count(model.encoder).active
        dec = count(model.decoder).active + head
        return batch * (_stack_flops(enc, lin, cfg.num_encoder_layers, cfg.num_heads, cfg.head_dim, lin)
                        + _stack_flops(dec, lt, cfg.num_decoder_layers, cfg.num_heads, cfg.head_dim, lt + lin))
    s = lengths.get("inputs", 0) + lengths.get("targets", 0)
    rep = count(model)
    embed = rep.by_component.get("embeddings", 0)
    active = rep.active - embed + head
    qk, v = cfg.head_dim, cfg.head_dim
    if cfg.attention == "mla":                          # DeepSeek: q.k over nope + rope dims, values of v dims
        qk, v = cfg.qk_nope_head_dim + cfg.qk_rope_head_dim, cfg.v_head_dim
    attn = 0.0
    for layer in range(cfg.num_layers):                # each layer's keys: its sliding window, if any
        w = cfg.window(layer)
        attn += 6.0 * cfg.num_heads * (qk + v) * (min(s, w) if w else s) * s
    return batch * (6.0 * active * s + attn)


def mfu(step_flops: float, steps_per_sec: float, devices: int, peak: float) -> float:
    """Model FLOPs utilisation: achieved model FLOP/s over ``devices * peak``."""
    return float(step_flops * steps_per_sec / (devices * peak)) if peak > 0 else float(np.nan)
