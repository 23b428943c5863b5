"""DecoderConfig: decoder-only (Llama / Mixtral / OpenMoE style) model configuration."""

from __future__ import annotations

import dataclasses
from typing import Any

import jax.numpy as jnp

from moejax.moe import MoeConfig


@dataclasses.dataclass(frozen=True)
class DecoderConfig:
    """A pre-norm decoder-only transformer; dense (Llama) or with MoE FFNs (Mixtral, OpenMoE).

    Layout: with ``moe`` set, block ``i`` is sparse when ``(i + 1) % moe_every == 0``
    (``moe_every=1``: every block, Mixtral). ``moe_extra_mlp`` adds OpenMoE's residual dense MLP
    after each MoE FFN. ``attn_scale`` multiplies the attention scores (None: ``head_dim**-0.5``;
    OpenMoE, trained in T5X with the scale folded into the query init, uses 1.0). Layers are stacked in periods of ``moe_every`` blocks and scanned, so
    compile time does not grow with depth; ``num_layers`` must be a multiple of ``moe_every``.
    """

    vocab_size: int = 256
    d_model: int = 64
    num_layers: int = 2
    num_heads: int = 4
    num_kv_heads: int = 4
    head_dim: int = 16
    d_ff: int = 128
    activation: str = "swiglu"
    norm_eps: float = 1e-5
    rope_theta: float = 10000.0
    sliding_window: int | None = None
    attn_scale: float | None = None
    tie_embeddings: bool = False
    moe: MoeConfig | None = None
    moe_every: int = 1
    moe_extra_mlp: bool = False
    dtype: Any = jnp.float32
    param_dtype: Any = jnp.float32

    def replace(self, **kw) -> DecoderConfig:
        return dataclasses.replace(self, **kw)

    @property
    def period(self) -> int:
        return self.moe_every if self.moe is not None else 1

    def is_sparse(self, layer: int) -> bool:
        return self.moe is not None and (layer + 1) % self.moe_every == 0

    def validate(self) -> DecoderConfig:
        """Fail fast on a config that violates an invariant, naming the values."""
        for name in ("vocab_size", "d_model", "num_layers", "num_heads", "num_kv_heads", "head_dim", "d_ff",
                     "moe_every"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}")
        if self.num_heads % self.num_kv_heads:
            raise ValueError(f"num_heads={self.num_heads} is not a multiple of num_kv_heads={self.num_kv_heads}")
        if self.head_dim % 2:
            raise ValueError(f"head_dim={self.head_dim} must be even for rotary embeddings")
        if self.num_layers % self.period:
            raise ValueError(f"num_layers={self.num_layers} is not a multiple of moe_every={self.moe_every}")
        if self.moe is not None:
            self.moe.validate()
            if self.moe.d_model != self.d_model:
                raise ValueError(f"moe.d_model={self.moe.d_model} must equal d_model={self.d_model}")
        return self
