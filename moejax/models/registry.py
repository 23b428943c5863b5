"""Named model configs at their published sizes (decoder-only family so far).

``get_config(name)`` returns a validated :class:`DecoderConfig`; unknown names raise a
ValueError that lists the valid ones.
"""

from __future__ import annotations

from typing import Callable

from moejax.models.config import DecoderConfig
from moejax.moe import MoeConfig


def _mixtral(d, f, layers, heads, kv, vocab, experts=8, k=2, sliding_window=None) -> DecoderConfig:
    moe = MoeConfig(num_experts=experts, d_model=d, d_ff=f, top_k=k, weight_norm="topk", dropless=True,
                    activation="swiglu")
    return DecoderConfig(vocab_size=vocab, d_model=d, num_layers=layers, num_heads=heads, num_kv_heads=kv,
                         head_dim=d // heads, d_ff=f, norm_eps=1e-5, rope_theta=1e6, sliding_window=sliding_window,
                         moe=moe, moe_every=1)


def _llama(d, f, layers, heads, kv, vocab, eps=1e-5, theta=1e4) -> DecoderConfig:
    return DecoderConfig(vocab_size=vocab, d_model=d, num_layers=layers, num_heads=heads, num_kv_heads=kv,
                         head_dim=d // heads, d_ff=f, norm_eps=eps, rope_theta=theta)


REGISTRY: dict[str, Callable[[], DecoderConfig]] = {
    # Mixtral 8x7B: 46.70B total / 12.88B active (REFERENCE.md 1.4)
    "mixtral_8x7b": lambda: _mixtral(4096, 14336, 32, 32, 8, 32000),
    # Mixtral 8x22B: hidden 6144, 56 layers, 48 heads (8 kv), ff 16384, vocab 32768
    "mixtral_8x22b": lambda: _mixtral(6144, 16384, 56, 48, 8, 32768),
    "llama_7b": lambda: _llama(4096, 11008, 32, 32, 32, 32000, eps=1e-6),
    "llama2_7b": lambda: _llama(4096, 11008, 32, 32, 32, 32000, eps=1e-5),
    "mistral_7b": lambda: _llama(4096, 14336, 32, 32, 8, 32000),
    # tiny configs for tests and CPU runs
    "tiny_mixtral": lambda: _mixtral(64, 128, 2, 4, 2, 256, experts=4),
    "tiny_llama": lambda: _llama(64, 256, 2, 4, 2, 256),
}


def names() -> list[str]:
    return sorted(REGISTRY)


def get_config(name: str, **overrides) -> DecoderConfig:
    """The registered config ``name`` with dataclass field ``overrides`` applied, validated."""
    if name not in REGISTRY:
        raise ValueError(f"unknown model {name!r}; registered models: {', '.join(names())}")
    return REGISTRY[name]().replace(**overrides).validate()
