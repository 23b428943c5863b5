"""Model zoo: configs (:mod:`~moejax.models.config`), shared layers, the decoder-only
(Llama / Mistral / Mixtral / OpenMoE) and encoder-decoder (T5 / Switch / NLLB-MoE) families, the
registry of published sizes, parameter accounting, and the seqio-batch forward helper."""

from moejax.models.build import abstract_model, build_model
from moejax.models.config import DecoderConfig, EncDecConfig, ModelConfig, routes_by_task
from moejax.models.decoder import Decoder
from moejax.models.encdec import EncoderDecoder
from moejax.models.stack import DecoderAux, EncDecAux

__all__ = ["Decoder", "DecoderAux", "DecoderConfig", "EncDecAux", "EncDecConfig", "EncoderDecoder", "ModelConfig",
           "abstract_model", "build_model", "routes_by_task"]
