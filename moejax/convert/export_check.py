"""The check every Hugging Face exporter makes before writing: the ``config.json`` it would write,
read back by moejax's own importer (tested against transformers), must give the model being
exported, so an export never silently drops a feature (an expert map, a task router, a capacity
rule) that the HF family cannot hold."""

from __future__ import annotations

from moejax.models.config import RUNTIME_FIELDS, DecoderConfig, EncDecConfig, config_diff

#: fields a HF config does not carry and that cannot change an exported model's forward pass:
#: the parameter dtype (the tensors carry it), initialisers, training-only knobs and the MoE layout.
NOT_EXPORTED = RUNTIME_FIELDS | {"param_dtype", "router_dtype", "group_multiple", "router_init_std", "expert_dropout"}


def sparse_layers(cfg: DecoderConfig | EncDecConfig) -> tuple:
    """Which layers hold an MoE (encoder and decoder stacks for an encoder-decoder)."""
    if isinstance(cfg, EncDecConfig):
        return tuple(tuple(cfg.is_sparse(i, dec) for i in range(n))
                     for n, dec in ((cfg.num_encoder_layers, False), (cfg.num_decoder_layers, True)))
    return tuple(cfg.is_sparse(i) for i in range(cfg.num_layers))


def check_round_trip(cfg, back, family: str, relaxed: tuple[str, ...] = ()) -> None:
    """ValueError naming every field where ``back`` (the exported ``config.json`` read by moejax's
    importer) differs from ``cfg``, beyond dtypes, kernels and ``relaxed``. The layer pattern is
    compared as which layers are sparse (however the period is spelled); a tied, unscaled
    encoder-decoder head written untied reads back untied (the same logits)."""
    if isinstance(cfg, EncDecConfig) and cfg.tie_embeddings and not cfg.scale_tied_logits:
        back = back.replace(tie_embeddings=True)
    ignore = set(NOT_EXPORTED) | set(relaxed)
    if sparse_layers(cfg) == sparse_layers(back):
        ignore |= {"encoder_moe_every", "decoder_moe_every", "moe_offset", "moe_every", "first_dense_layers"}
    diff = [(k, a, b) for k, a, b in config_diff(cfg, back) if k.rsplit(".", 1)[-1] not in ignore]
    if diff:
        raise ValueError(f"HF {family} export cannot represent this model: "
                         + "; ".join(f"{k}={a!r} (HF would give {b!r})" for k, a, b in diff))
