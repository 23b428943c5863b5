"""Inference: KV-cached decoding (greedy, temperature, top-p) and scoring."""

from moejax.inference.decode import generate, generate_encdec, score

__all__ = ["generate", "generate_encdec", "score"]
