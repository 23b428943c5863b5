"""Shared pieces of the task registrations: features, idempotent registration."""

from __future__ import annotations

import seqio

from moejax.data import metrics
from moejax.data.vocab import get_vocabulary


def features(vocab=None, inputs: bool = True) -> dict:
    vocab = vocab or get_vocabulary("spm")
    out = {"targets": seqio.Feature(vocab, add_eos=True)}
    if inputs:
        out = {"inputs": seqio.Feature(vocab, add_eos=True), **out}
    return out


def add_task(name: str, **kw) -> None:
    """Register a seqio Task unless one of that name exists (importing twice is harmless)."""
    if name not in seqio.TaskRegistry.names():
        seqio.TaskRegistry.add(name, **kw)


def add_mixture(name: str, tasks) -> None:
    if name not in seqio.MixtureRegistry.names():
        seqio.MixtureRegistry.add(name, tasks)


TEXT_METRICS = [metrics.accuracy, metrics.exact_match]
