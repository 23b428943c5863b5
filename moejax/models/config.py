"""Model configs: :class:`DecoderConfig` (decoder-only: Llama / Mistral / Mixtral / OpenMoE) and
:class:`EncDecConfig` (encoder-decoder: T5 / Switch / NLLB-MoE), plain validated dataclasses."""

from __future__ import annotations

import dataclasses
import math
from typing import Any

import jax.numpy as jnp

from moejax.models.attend import check_impl
from moejax.models.layers import Llama3Rope, Yarn, check_qk_norm
from moejax.models.remat import check_remat
from moejax.moe import MoeConfig


@dataclasses.dataclass(frozen=True)
class DecoderConfig:
    """A pre-norm decoder-only transformer; dense (Llama) or with MoE FFNs (Mixtral, OpenMoE).

    Layout: with ``moe`` set, block ``i`` is sparse when ``(i + 1) % moe_every == 0``
    (``moe_every=1``: every block, Mixtral). ``moe_extra_mlp`` adds OpenMoE's residual dense MLP
    after each MoE FFN. ``attn_scale`` multiplies the attention scores (None: ``head_dim**-0.5``;
    OpenMoE, trained in T5X with the scale folded into the query init, uses 1.0). Layers are stacked
    in periods of ``moe_every`` blocks and scanned, so compile time does not grow with depth;
    ``num_layers`` must be a multiple of ``moe_every``. ``remat``: the scanned periods'
    rematerialisation policy (:mod:`moejax.models.remat`); ``attention_impl`` / ``attention_chunk``:
    the attention kernel (:mod:`moejax.models.attend`).

    Attention variants (see :class:`moejax.models.layers.Attention`): ``attention_bias`` ``'none'``,
    ``'qkv'`` (q, k, v biased: Qwen2-MoE) or ``'all'`` (q, k, v and o); ``qk_norm`` ``'none'``,
    ``'head'`` (per-head RMSNorm of q and k: Qwen3-MoE) or ``'full'`` (over the whole projection:
    OLMoE), eps ``norm_eps``; ``qkv_clip`` (OLMoE's ``clip_qkv``). ``head_dim`` is free:
    ``num_heads * head_dim`` need not equal ``d_model`` (Qwen3-MoE: 32 x 128 on d_model 2048).
    ``attention='mla'``: DeepSeek's multi-head latent attention (:class:`moejax.models.mla.
    MLAttention`) with ``q_lora_rank`` (None: a plain query projection), ``kv_lora_rank``,
    ``qk_nope_head_dim``, ``qk_rope_head_dim``, ``v_head_dim`` (``head_dim``, ``num_kv_heads``
    unused); its KV cache holds the latent. ``rope_scaling``: a :class:`~moejax.models.layers.Yarn`,
    a :class:`~moejax.models.layers.Llama3Rope` or None. ``first_dense_layers``: the first k blocks
    are dense (DeepSeek's ``first_k_dense_replace``), scanned as their own stack before the periodic
    one; block ``i >= k`` is sparse when ``(i - k + 1) % moe_every == 0``. ``window_pattern``: per-layer sliding windows
    repeating over the layers (gpt-oss: ``(128, None)``, even layers a 128-token window, odd ones
    full; the scanned period becomes ``lcm(moe_every, len(pattern))``; each windowed layer's KV
    cache is a ring of its window), instead of one ``sliding_window`` for all. ``attention_sinks``:
    gpt-oss's per-head sink logits.
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
    attention_bias: str = "none"
    qk_norm: str = "none"
    qkv_clip: float | None = None
    tie_embeddings: bool = False
    attention: str = "mha"
    q_lora_rank: int | None = None
    kv_lora_rank: int = 0
    qk_nope_head_dim: int = 0
    qk_rope_head_dim: int = 0
    v_head_dim: int = 0
    rope_scaling: Yarn | Llama3Rope | None = None
    window_pattern: tuple | None = None
    attention_sinks: bool = False
    first_dense_layers: int = 0
    moe: MoeConfig | None = None
    moe_every: int = 1
    moe_extra_mlp: bool = False
    remat: str = "none"
    attention_impl: str = "xla"
    attention_chunk: int = 512
    dtype: Any = jnp.float32
    param_dtype: Any = jnp.float32

    def replace(self, **kw) -> DecoderConfig:
        return dataclasses.replace(self, **kw)

    @property
    def period(self) -> int:
        base = self.moe_every if self.moe is not None else 1
        return math.lcm(base, len(self.window_pattern)) if self.window_pattern else base

    def window(self, layer: int) -> int | None:
        """The sliding window of layer ``layer`` (None: full attention)."""
        if self.window_pattern:
            return self.window_pattern[layer % len(self.window_pattern)]
        return self.sliding_window

    def is_sparse(self, layer: int) -> bool:
        k = self.first_dense_layers
        return self.moe is not None and layer >= k and (layer - k + 1) % self.moe_every == 0

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
        k = self.first_dense_layers
        if not 0 <= k < self.num_layers:
            raise ValueError(f"first_dense_layers={k} must be in [0, num_layers={self.num_layers})")
        if (self.num_layers - k) % self.period:
            what = f"num_layers={self.num_layers}" + (f" - first_dense_layers={k}" if k else "")
            raise ValueError(f"{what} is not a multiple of moe_every={self.moe_every}")
        if self.attention not in ATTENTIONS:
            raise ValueError(f"unknown attention {self.attention!r}; valid: {', '.join(ATTENTIONS)}")
        if self.attention == "mla":
            for name in ("kv_lora_rank", "qk_rope_head_dim", "v_head_dim"):
                if getattr(self, name) < 1:
                    raise ValueError(f"attention='mla' needs {name} >= 1, got {getattr(self, name)}")
            if self.qk_nope_head_dim < 0 or self.qk_rope_head_dim % 2:
                raise ValueError(f"qk_nope_head_dim must be >= 0 and qk_rope_head_dim even, got "
                                 f"{self.qk_nope_head_dim}, {self.qk_rope_head_dim}")
            if self.q_lora_rank is not None and self.q_lora_rank < 1:
                raise ValueError(f"q_lora_rank must be >= 1 or None, got {self.q_lora_rank}")
            bad = [n for n, on in (("sliding_window", self.sliding_window is not None),
                                   ("attention_bias", self.attention_bias != "none"),
                                   ("qk_norm", self.qk_norm != "none"), ("qkv_clip", self.qkv_clip is not None)) if on]
            if bad:
                raise ValueError(f"attention='mla' does not implement {', '.join(bad)}")
        if self.rope_scaling is not None:
            self.rope_scaling.validate()
        if self.window_pattern is not None:
            pat = tuple(self.window_pattern)
            if not pat or any(w is not None and (not isinstance(w, int) or w < 1) for w in pat):
                raise ValueError(f"window_pattern must be a non-empty tuple of windows >= 1 or None, got {pat}")
            if self.sliding_window is not None or k or self.attention == "mla":
                raise ValueError("window_pattern replaces sliding_window and needs first_dense_layers=0 and "
                                 f"attention='mha' (got sliding_window={self.sliding_window}, first_dense_layers={k}, "
                                 f"attention={self.attention!r})")
        if self.attention_sinks and self.attention == "mla":
            raise ValueError("attention='mla' does not implement attention_sinks")
        check_remat(self.remat)
        check_impl(self.attention_impl, self.attention_chunk)
        check_qk_norm(self.qk_norm)
        if self.attention_bias not in ATTENTION_BIASES:
            raise ValueError(f"unknown attention_bias {self.attention_bias!r}; valid: {', '.join(ATTENTION_BIASES)}")
        if self.qkv_clip is not None and not self.qkv_clip > 0:
            raise ValueError(f"qkv_clip must be > 0 or None, got {self.qkv_clip}")
        if self.moe is not None:
            self.moe.validate()
            if self.moe.d_model != self.d_model:
                raise ValueError(f"moe.d_model={self.moe.d_model} must equal d_model={self.d_model}")
        return self


ATTENTION_BIASES = ("none", "qkv", "all")
ATTENTIONS = ("mha", "mla")


@dataclasses.dataclass(frozen=True)
class EncDecConfig:
    """Encoder-decoder config. With ``moe`` set, block ``i`` of the encoder (decoder) is sparse
    when ``i % every == moe_offset % every`` with ``every = encoder_moe_every``
    (``decoder_moe_every``). The default offset -1 gives ``(i + 1) % every == 0`` (Switch with
    every=2: the odd blocks; NLLB with every=4: blocks 3, 7, ...); HF Switch checkpoints with a
    sparse step > 2 use offset 1 (``i % step == 1``); every=1 makes all blocks sparse (switch-c).

    ``pad_id`` (padding; fairseq / NLLB position ids are offset by it) and ``decoder_start_id`` (the
    first decoder input when generating: T5 / Switch 0, NLLB the eos id 2) come from the model's
    vocabulary; the end of a generated sequence is the task vocabulary's ``eos_id``. ``remat``,
    ``attention_impl``, ``attention_chunk``: as in :class:`DecoderConfig`."""

    vocab_size: int = 256
    d_model: int = 64
    num_encoder_layers: int = 2
    num_decoder_layers: int = 2
    num_heads: int = 4
    head_dim: int = 16
    d_ff: int = 128
    activation: str = "relu"
    norm_eps: float = 1e-6
    relpos_buckets: int = 32
    relpos_max_distance: int = 128
    tie_embeddings: bool = True
    moe: MoeConfig | None = None
    encoder_moe_every: int = 2
    decoder_moe_every: int = 2
    moe_offset: int = -1
    # architecture variants: T5 / Switch (defaults) vs NLLB-MoE / fairseq
    norm: str = "rms"
    positions: str = "relative"
    attn_bias: bool = False
    attn_scaled: bool = False
    ffn_bias: bool = False
    embed_scale: bool = False
    scale_tied_logits: bool = True
    pad_id: int = 0
    decoder_start_id: int = 0
    remat: str = "none"
    attention_impl: str = "xla"
    attention_chunk: int = 512
    dtype: Any = jnp.float32
    param_dtype: Any = jnp.float32

    def replace(self, **kw) -> EncDecConfig:
        return dataclasses.replace(self, **kw)

    def period(self, decoder: bool) -> int:
        if self.moe is None:
            return 1
        return self.decoder_moe_every if decoder else self.encoder_moe_every

    def is_sparse(self, layer: int, decoder: bool) -> bool:
        p = self.period(decoder)
        return self.moe is not None and layer % p == self.moe_offset % p

    def validate(self) -> EncDecConfig:
        for name in ("vocab_size", "d_model", "num_encoder_layers", "num_decoder_layers", "num_heads", "head_dim",
                     "d_ff", "encoder_moe_every", "decoder_moe_every", "relpos_buckets"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}")
        for layers, dec in ((self.num_encoder_layers, False), (self.num_decoder_layers, True)):
            if layers % self.period(dec):
                which = "decoder" if dec else "encoder"
                raise ValueError(f"num_{which}_layers={layers} is not a multiple of {which}_moe_every="
                                 f"{self.period(dec)}")
        if self.norm not in ("rms", "layer"):
            raise ValueError(f"unknown norm {self.norm!r}; valid: rms, layer")
        if self.positions not in ("relative", "sinusoidal"):
            raise ValueError(f"unknown positions {self.positions!r}; valid: relative, sinusoidal")
        check_remat(self.remat)
        check_impl(self.attention_impl, self.attention_chunk)
        if self.moe is not None:
            self.moe.validate()
            if self.moe.d_model != self.d_model:
                raise ValueError(f"moe.d_model={self.moe.d_model} must equal d_model={self.d_model}")
        return self


ModelConfig = DecoderConfig | EncDecConfig


def routes_by_task(cfg: ModelConfig) -> bool:
    """Does the model route by each example's task id (its MoE router reads ``task_ids [b]``)?"""
    return cfg.moe is not None and cfg.moe.uses_task_ids


#: Config fields that change how a model computes or trains but not its parameters: a run may
#: resume with other values of these (e.g. bf16 compute, remat, another attention kernel or MoE
#: backend, the balance loss taken over the global batch instead of per group).
RUNTIME_FIELDS = frozenset({"dtype", "remat", "attention_impl", "attention_chunk", "backend", "grouped_matmul",
                            "axis_rules", "balance_loss_scope"})


def config_diff(a, b, prefix: str = "") -> list[tuple[str, Any, Any]]:
    """``[(dotted field, value in a, value in b)]`` for every field where configs ``a`` and ``b``
    differ (nested configs field by field)."""
    if type(a) is not type(b) or not dataclasses.is_dataclass(a):
        return [] if a == b else [(prefix.rstrip(".") or type(a).__name__, a, b)]
    out = []
    for f in dataclasses.fields(a):
        x, y = getattr(a, f.name), getattr(b, f.name)
        if dataclasses.is_dataclass(x) and type(x) is type(y):
            out += config_diff(x, y, f"{prefix}{f.name}.")
        elif x != y:
            out.append((prefix + f.name, x, y))
    return out


def with_dtypes(cfg, *, dtype=None, param_dtype=None):
    """``cfg`` with the compute ``dtype`` and / or ``param_dtype`` set on the model and its MoE layers."""
    kw = {}
    for name, value in (("dtype", dtype), ("param_dtype", param_dtype)):
        if value is not None:
            try:
                jnp.dtype(value)
            except TypeError:
                raise ValueError(f"{name} {value!r} is not a dtype; e.g. float32, bfloat16, float16") from None
            if not jnp.issubdtype(jnp.dtype(value), jnp.floating):
                raise ValueError(f"{name} {value!r} is not a floating-point dtype; e.g. float32, bfloat16, float16")
            kw[name] = jnp.dtype(value)
            if cfg.moe is not None:
                kw[f"moe.{name}"] = jnp.dtype(value)
    return override(cfg, kw)


def override(cfg, overrides: dict):
    """``cfg`` with ``overrides`` applied, each key a field name or a dotted path into nested config
    dataclasses (``{'d_model': 32, 'moe.expert_dropout': 0.2, 'moe.inner.top_k': 1}``); the result
    is not validated (the caller validates once). An unknown field, or a path through a field that is
    None or not a config, is a ValueError naming it and the valid fields.
    """
    nested: dict[str, dict] = {}
    top: dict = {}
    for key, value in overrides.items():
        head, _, rest = str(key).partition(".")
        names = [f.name for f in dataclasses.fields(cfg)]
        if head not in names:
            raise ValueError(f"unknown {type(cfg).__name__} field {head!r} in override {key!r}; "
                             f"valid: {', '.join(names)}")
        if rest:
            nested.setdefault(head, {})[rest] = value
        else:
            top[head] = value
    for head, sub in nested.items():
        inner = top.get(head, getattr(cfg, head))
        if not dataclasses.is_dataclass(inner):
            raise ValueError(f"cannot override {', '.join(head + '.' + k for k in sub)}: {type(cfg).__name__}.{head} "
                             f"is {inner!r}, not a config")
        top[head] = override(inner, sub)
    return dataclasses.replace(cfg, **top) if top else cfg

