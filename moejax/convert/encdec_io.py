"""What the encoder-decoder exporters (T5 / Switch, NLLB-MoE) share: the output head's tensor and
the check that the ``config.json`` an exporter writes reads back as the model being exported."""

from __future__ import annotations

from moejax.convert.decoder_io import ExportRow
from moejax.models.config import RUNTIME_FIELDS, EncDecConfig, config_diff

#: fields a HF config does not carry and that cannot change an exported model's forward pass:
#: the parameter dtype (the tensors carry it), training-time routing knobs and the MoE layout.
_NOT_EXPORTED = RUNTIME_FIELDS | {"param_dtype", "router_dtype", "group_multiple", "router_init_std",
                                  "expert_dropout"}


def sparse_layers(cfg: EncDecConfig) -> tuple[tuple[bool, ...], tuple[bool, ...]]:
    """Which encoder and which decoder layers hold an MoE."""
    return tuple(tuple(cfg.is_sparse(i, dec) for i in range(n))
                 for n, dec in ((cfg.num_encoder_layers, False), (cfg.num_decoder_layers, True)))


def head_export(cfg: EncDecConfig, written_tied: bool) -> list[ExportRow]:
    """``lm_head.weight`` ``[vocab, d]``: nothing when the config says tied; the embedding itself for
    a tied head written untied (no scaling); else the model's own head ``[d, vocab]`` transposed."""
    if written_tied:
        return []
    if cfg.tie_embeddings:
        return [("lm_head.weight", "embed/embedding", None, lambda w: w)]
    return [("lm_head.weight", "lm_head", None, lambda w: w.T)]


def check_round_trip(cfg: EncDecConfig, back: EncDecConfig, family: str, relaxed: tuple[str, ...] = ()) -> None:
    """ValueError naming every field where ``back`` (the exported ``config.json`` read by moejax's
    importer) differs from ``cfg``, beyond dtypes, kernels and ``relaxed``; a tied unscaled head
    reads back untied (the same logits)."""
    if cfg.tie_embeddings and not cfg.scale_tied_logits:
        back = back.replace(tie_embeddings=True)
    ignore = set(_NOT_EXPORTED) | set(relaxed)
    if sparse_layers(cfg) == sparse_layers(back):      # the same layers sparse, however the period is spelled
        ignore |= {"encoder_moe_every", "decoder_moe_every", "moe_offset"}
    diff = [(k, a, b) for k, a, b in config_diff(cfg, back) if k.rsplit(".", 1)[-1] not in ignore]
    if diff:
        raise ValueError(f"HF {family} export cannot represent this model: "
                         + "; ".join(f"{k}={a!r} (HF would give {b!r})" for k, a, b in diff))
