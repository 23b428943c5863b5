"""What the encoder-decoder exporters (T5 / Switch, NLLB-MoE) share: the output head's tensor."""

from __future__ import annotations

from moejax.convert.decoder_io import ExportRow
from moejax.models.config import EncDecConfig


def head_export(cfg: EncDecConfig, written_tied: bool) -> list[ExportRow]:
    """``lm_head.weight`` ``[vocab, d]``: nothing when the config says tied; the embedding itself for
    a tied head written untied (no scaling); else the model's own head ``[d, vocab]`` transposed."""
    if written_tied:
        return []
    if cfg.tie_embeddings:
        return [("lm_head.weight", "embed/embedding", None, lambda w: w)]
    return [("lm_head.weight", "lm_head", None, lambda w: w.T)]
