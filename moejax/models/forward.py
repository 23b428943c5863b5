"""Run a model on a batch of seqio features (the trainer's, evaluator's and compression tools'
one forward helper).

Batches are seqio feature-converter outputs: encoder-decoder ``encoder_input_tokens [b, t]``,
``decoder_input_tokens``, ``decoder_target_tokens``, ``decoder_loss_weights [b, s]``; decoder-only
the same without the encoder input; optionally ``task_ids [b]`` for task-level routing.
"""

from __future__ import annotations

import jax

from moejax.models.encdec import EncoderDecoder
from moejax.models.stack import MoeAux
from moejax.moe import MoeStats


def apply(model, batch: dict, deterministic: bool) -> tuple[jax.Array, MoeAux]:
    """``(logits [b, s, v], aux)``: the model's own aux (``EncDecAux`` or ``DecoderAux``); a
    ``task_ids [b]`` entry is passed on."""
    dec_mask = batch["decoder_target_tokens"] > 0
    tids = batch.get("task_ids")
    if isinstance(model, EncoderDecoder):
        enc = batch["encoder_input_tokens"]
        return model(enc, batch["decoder_input_tokens"], encoder_mask=enc > 0, decoder_mask=dec_mask,
                     deterministic=deterministic, task_ids=tids)
    return model(batch["decoder_input_tokens"], padding_mask=dec_mask, deterministic=deterministic, task_ids=tids)


def forward(model, batch: dict, deterministic: bool) -> tuple[jax.Array, list[MoeStats]]:
    """:func:`apply` -> ``(logits [b, s, v], list of MoeStats)`` of the sparse stacks."""
    logits, aux = apply(model, batch, deterministic)
    return logits, aux.moe_stats()
