"""seqio metric functions ``fn(targets, predictions) -> {name: value}`` (strings in, numbers out).

Written here so the evaluation needs no extra package: accuracy (exact string match, in percent,
as T5's ``accuracy``), sequence exact match, and corpus BLEU-4 (Papineni et al.: geometric mean of
clipped 1-4-gram precisions times the brevity penalty, whitespace tokens, in percent).
"""

from __future__ import annotations

import collections
import math


def accuracy(targets, predictions) -> dict:
    """Percentage of predictions equal to their target (after stripping whitespace)."""
    if len(targets) != len(predictions):
        raise ValueError(f"{len(targets)} targets but {len(predictions)} predictions")
    hits = sum(str(t).strip() == str(p).strip() for t, p in zip(targets, predictions))
    return {"accuracy": 100.0 * hits / max(len(targets), 1)}


def exact_match(targets, predictions) -> dict:
    """Fraction (0-1) of predictions whose whitespace tokens equal the target's."""
    hits = sum(str(t).split() == str(p).split() for t, p in zip(targets, predictions))
    return {"exact_match": hits / max(len(targets), 1)}


def _ngrams(tokens, n):
    return collections.Counter(tuple(tokens[i:i + n]) for i in range(len(tokens) - n + 1))


def bleu(targets, predictions, max_n: int = 4) -> dict:
    """Corpus BLEU (0-100) of ``predictions`` against one reference each; 0 when any n-gram order
    has no match (no smoothing, as sacrebleu's default corpus BLEU)."""
    matches, totals = [0] * max_n, [0] * max_n
    hyp_len = ref_len = 0
    for ref, hyp in zip(targets, predictions):
        r, h = str(ref).split(), str(hyp).split()
        hyp_len, ref_len = hyp_len + len(h), ref_len + len(r)
        for n in range(1, max_n + 1):
            hc, rc = _ngrams(h, n), _ngrams(r, n)
            matches[n - 1] += sum(min(c, rc[g]) for g, c in hc.items())
            totals[n - 1] += max(len(h) - n + 1, 0)
    if hyp_len == 0 or min(matches) == 0:
        return {"bleu": 0.0}
    log_p = sum(math.log(m / t) for m, t in zip(matches, totals)) / max_n
    bp = 1.0 if hyp_len > ref_len else math.exp(1 - ref_len / hyp_len)
    return {"bleu": 100.0 * bp * math.exp(log_p)}
