"""Model zoo: shared layers, the decoder-only family (Llama, Mixtral, OpenMoE), registry, params."""

from moejax.models.config import DecoderConfig
from moejax.models.decoder import Decoder, DecoderAux

__all__ = ["Decoder", "DecoderAux", "DecoderConfig"]
