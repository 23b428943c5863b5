"""Build the model a config describes, concretely or abstractly (shapes only)."""

from __future__ import annotations

from collections.abc import Callable

from flax import nnx

from moejax.models.config import EncDecConfig, ModelConfig
from moejax.models.decoder import Decoder
from moejax.models.encdec import EncoderDecoder


def build_model(cfg: ModelConfig, rngs: nnx.Rngs | None = None) -> Decoder | EncoderDecoder:
    """The model class a config describes (:class:`Decoder` or :class:`EncoderDecoder`)."""
    cls = EncoderDecoder if isinstance(cfg, EncDecConfig) else Decoder
    return cls(cfg, rngs=rngs or nnx.Rngs(0))


def abstract_model(factory: Callable[[], nnx.Module] | ModelConfig) -> nnx.Module:
    """``factory()`` (or the model of a config) built with shapes only (``nnx.eval_shape``: nothing
    is allocated)."""
    if not callable(factory):
        cfg = factory
        factory = lambda: build_model(cfg, nnx.Rngs(0))
    return nnx.eval_shape(factory)
