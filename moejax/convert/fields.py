"""Every Hugging Face ``config.json`` field a converter meets: honoured, inert, or refused by name.

A converter must never silently drop a field that changes the numbers. Each family's
:class:`FieldTable` sorts the fields transformers (4.x and 5.x) writes for its config classes:

* ``honoured``: mapped onto the moejax config (or checked against it);
* ``inert``: cannot change a converted model's forward pass (bookkeeping, generation defaults,
  initialisers, dropout and loss weights that moejax's trainer takes from its own config), each
  with the reason;
* ``fixed``: fields moejax reproduces only at some values (``attention_bias: False``); any other
  value is refused with the field, its value and what would be valid.

A field in none of these is refused as unknown (a future transformers field shows up as an error,
not as drift); ``ignore=(names, ...)`` converts anyway when the user knows it is harmless.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Iterable, Mapping

#: PretrainedConfig bookkeeping and generation defaults (4.x and 5.x layouts, and keys older
#: releases wrote), with why they cannot change a converted model's numbers.
GENERIC_INERT: Mapping[str, str] = {
    **{k: "bookkeeping" for k in (
        "_name_or_path", "architectures", "model_type", "transformers_version", "dtype", "torch_dtype",
        "use_bfloat16", "id2label", "label2id", "problem_type", "finetuning_task", "tokenizer_class", "prefix",
        "task_specific_params", "return_dict", "output_attentions", "output_hidden_states", "torchscript",
        "use_cache", "output_past", "gradient_checkpointing", "tf_legacy_loss", "is_encoder_decoder", "auto_map",
        "_attn_implementation_autoset", "_commit_hash")},
    **{k: "generation default (moejax's infer takes its own)" for k in (
        "max_length", "min_length", "do_sample", "early_stopping", "num_beams", "temperature", "top_k", "top_p",
        "typical_p", "repetition_penalty", "length_penalty", "no_repeat_ngram_size",
        "encoder_no_repeat_ngram_size", "bad_words_ids", "num_return_sequences", "output_scores",
        "return_dict_in_generate", "forced_bos_token_id", "forced_eos_token_id", "remove_invalid_values",
        "exponential_decay_length_penalty", "suppress_tokens", "begin_suppress_tokens", "num_beam_groups",
        "diversity_penalty", "bos_token_id", "eos_token_id", "sep_token_id")},
    "chunk_size_feed_forward": "chunks the FFN over the sequence: the same numbers",
    "initializer_range": "initialiser only", "initializer_factor": "initialiser only", "init_std": "initialiser only",
}

#: Fixed by every converter: values of the generic fields that would change the model.
GENERIC_FIXED: Mapping[str, tuple] = {
    "pruned_heads": ({}, None), "tie_encoder_decoder": (False, None), "add_cross_attention": (False, None),
    "cross_attention_hidden_size": (None,), "is_decoder": (False, None),
}


@dataclasses.dataclass(frozen=True)
class FieldTable:
    """How one family's converter treats each ``config.json`` field (see the module docstring)."""

    family: str
    honoured: frozenset[str]
    inert: Mapping[str, str] = dataclasses.field(default_factory=dict)
    fixed: Mapping[str, tuple] = dataclasses.field(default_factory=dict)

    def all_fixed(self) -> dict[str, tuple]:
        return {**GENERIC_FIXED, **self.fixed}

    def known(self) -> set[str]:
        """Every field this converter has decided on."""
        return set(self.honoured) | set(GENERIC_INERT) | set(self.inert) | set(self.all_fixed())

    def check(self, hf: Mapping, ignore: Iterable[str] = ()) -> None:
        """Refuse (ValueError, one line) a field at a value moejax does not reproduce, or unknown."""
        ignore = set(ignore)
        family = hf.get("model_type", self.family)
        fixed = self.all_fixed()
        for key, value in hf.items():
            if key in fixed and key not in ignore and value not in fixed[key]:
                allowed = " or ".join(repr(v) for v in fixed[key])
                raise ValueError(f"{family} config.json has {key}={value!r}, which moejax's converter does not "
                                 f"reproduce (supported: {key}={allowed})")
        unknown = sorted(k for k in hf if k not in self.known() and k not in ignore)
        if unknown:
            raise ValueError(
                f"{family} config.json has fields moejax's converter does not know: {', '.join(unknown)}; it "
                f"cannot tell whether they change the model's numbers. If they do not, convert with "
                f"ignore_fields={tuple(unknown)!r} (CLI: --ignore_hf_fields {','.join(unknown)})")


TRAINING_ONLY = "training regularisation or loss weight: moejax's trainer takes its own"

#: Inert in every decoder-only family (Mixtral / Llama / Mistral, Qwen-MoE, OLMoE).
DECODER_INERT: Mapping[str, str] = {
    "max_position_embeddings": "plain RoPE does not depend on it (scaled RoPE is refused)",
    "pad_token_id": "the pad id only matters to the tokenizer and the loss mask",
    "decoder_start_token_id": "a decoder-only model has no decoder start",
    "attention_dropout": TRAINING_ONLY, "router_aux_loss_coef": TRAINING_ONLY,
    "output_router_logits": "an output option",
}


def rope_parameters(hf: Mapping, default: float, family: str, allow: tuple[str, ...] = ()) -> tuple[float, dict | None]:
    """``(rope_theta, scaling)`` from a transformers 4.x (``rope_theta``, ``rope_scaling``) or 5.x
    (``rope_parameters``) config: ``scaling`` is the dict of a scaled RoPE whose ``rope_type`` is in
    ``allow`` (None for plain RoPE); any other type is refused by name."""
    params = hf.get("rope_parameters")
    scaling = hf.get("rope_scaling")
    found = None
    for what, p in (("rope_scaling", scaling), ("rope_parameters", params)):
        if p is None:
            continue
        if not isinstance(p, Mapping):
            raise ValueError(f"{family} config.json has {what}={p!r}; expected a dict or null")
        kind = p.get("rope_type", p.get("type", "default"))
        extra = sorted(set(p) - {"rope_type", "type", "rope_theta"})
        if kind in allow:
            if found is not None and {k: v for k, v in found.items() if k != "rope_theta"} != \
                    {k: v for k, v in p.items() if k != "rope_theta"}:
                raise ValueError(f"{family} config.json has rope_scaling and rope_parameters that disagree")
            found = dict(p)
        elif kind != "default" or extra:
            if not allow:
                raise ValueError(f"{family} config.json has {what}={dict(p)!r}: moejax implements plain RoPE only "
                                 f"(rope_type='default' with rope_theta); scaled RoPE is not supported")
            valid = ", ".join(["'default'", *(repr(a) for a in allow)])
            raise ValueError(f"{family} config.json has {what}={dict(p)!r}: moejax implements rope_type {valid} "
                             f"for {family}")
    theta = (params or {}).get("rope_theta", hf.get("rope_theta", default))
    if "rope_theta" in hf and params and "rope_theta" in params and hf["rope_theta"] != params["rope_theta"]:
        raise ValueError(f"{family} config.json has rope_theta={hf['rope_theta']} and "
                         f"rope_parameters.rope_theta={params['rope_theta']}; they must agree")
    return float(theta), found


def rope_theta(hf: Mapping, default: float, family: str) -> float:
    """RoPE base frequency from a transformers 4.x (``rope_theta``, ``rope_scaling``) or 5.x
    (``rope_parameters``) config; any RoPE scaling (llama3, YaRN, linear, dynamic, ...) is refused."""
    return rope_parameters(hf, default, family)[0]


_YARN_KEYS = {"rope_type", "type", "rope_theta", "factor", "original_max_position_embeddings", "beta_fast",
              "beta_slow", "mscale", "mscale_all_dim", "truncate", "attention_factor"}


def yarn(params: Mapping, hf: Mapping, family: str):
    """A :class:`moejax.models.layers.Yarn` from a ``rope_type: yarn`` dict (transformers'
    ``_compute_yarn_parameters`` fields; the original length falls back to
    ``max_position_embeddings`` as there); an unknown field or a missing factor is refused."""
    from moejax.models.layers import Yarn

    extra = sorted(set(params) - _YARN_KEYS)
    if extra:
        raise ValueError(f"{family} config.json has YaRN rope fields moejax does not implement: {extra}")
    if "factor" not in params:
        raise ValueError(f"{family} config.json has YaRN rope scaling without a factor")
    original = params.get("original_max_position_embeddings") or hf.get("max_position_embeddings")
    if not original:
        raise ValueError(f"{family} config.json has YaRN rope scaling but neither "
                         "original_max_position_embeddings nor max_position_embeddings")
    return Yarn(factor=float(params["factor"]), original_max_position=int(original),
                beta_fast=float(params.get("beta_fast") or 32), beta_slow=float(params.get("beta_slow") or 1),
                mscale=float(params.get("mscale") or 0.0), mscale_all_dim=float(params.get("mscale_all_dim") or 0.0),
                truncate=bool(params.get("truncate", True)), attention_factor=params.get("attention_factor")).validate()


_LLAMA3_REQUIRED = {"factor", "low_freq_factor", "high_freq_factor", "original_max_position_embeddings"}
_LLAMA3_KEYS = _LLAMA3_REQUIRED | {"rope_type", "type", "rope_theta"}


def llama3(params: Mapping, family: str):
    """A :class:`moejax.models.layers.Llama3Rope` from a ``rope_type: llama3`` dict (transformers'
    ``_compute_llama3_parameters``: every field required); an unknown field is refused."""
    from moejax.models.layers import Llama3Rope

    extra = sorted(set(params) - _LLAMA3_KEYS)
    missing = sorted(_LLAMA3_REQUIRED - set(params))
    if extra or missing:
        raise ValueError(f"{family} config.json has llama3 rope scaling with "
                         + (f"fields moejax does not implement: {extra}" if extra else f"missing fields: {missing}"))
    return Llama3Rope(factor=float(params["factor"]), low_freq_factor=float(params["low_freq_factor"]),
                      high_freq_factor=float(params["high_freq_factor"]),
                      original_max_position=int(params["original_max_position_embeddings"])).validate()
