"""Inference: KV-cached decoding (greedy, temperature, top-p) and scoring."""

from moejax.inference.decode import generate, score

__all__ = ["generate", "score"]
