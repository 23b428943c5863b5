"""seqio preprocessors written for moejax: span corruption, prefix-LM split, instruction wrapping.

Randomness is derived from the example's own tokens (crc32) and a salt, so a dataset gives the
same examples in every run and every process (deterministic data order is what makes resume exact).
"""

from __future__ import annotations

import zlib

import numpy as np
import seqio
import tensorflow as tf


def noise_span_mask(length: int, density: float, mean_span: float, rng: np.random.Generator) -> np.ndarray:
    """T5's random spans: ``[length]`` bool, ``round(length*density)`` noise tokens split into
    ``round(noise/mean_span)`` spans interleaved with non-noise spans (starting with non-noise)."""
    num_noise = int(np.clip(round(length * density), 1, max(length - 1, 1)))
    num_spans = max(int(round(num_noise / mean_span)), 1)
    num_spans = min(num_spans, num_noise, max(length - num_noise, 1))

    def segment(n, k):
        cuts = np.sort(rng.choice(np.arange(1, n), size=k - 1, replace=False)) if k > 1 else np.array([], int)
        return np.diff(np.concatenate([[0], cuts, [n]]))

    noise_lens, keep_lens = segment(num_noise, num_spans), segment(length - num_noise, num_spans)
    mask = np.zeros(length, bool)
    pos = 0
    for keep, noise in zip(keep_lens, noise_lens):
        pos += keep
        mask[pos:pos + noise] = True
        pos += noise
    return mask


def corrupt(tokens: np.ndarray, vocab_size: int, density: float, mean_span: float, salt: int = 0):
    """``tokens [n]`` -> ``(inputs, targets)``: each noise span becomes one sentinel id
    (``vocab_size - 1 - i``) in ``inputs``; ``targets`` lists each sentinel followed by its span."""
    tokens = np.asarray(tokens)
    if tokens.size < 2:
        return tokens, np.zeros([0], tokens.dtype)
    rng = np.random.default_rng([zlib.crc32(tokens.tobytes()), salt])
    mask = noise_span_mask(tokens.size, density, mean_span, rng)
    starts = mask & ~np.concatenate([[False], mask[:-1]])
    span_id = np.cumsum(starts)
    sentinel = (vocab_size - span_id).astype(tokens.dtype)
    inputs = np.where(starts, sentinel, tokens)[~mask | starts]
    # targets: for each noise position, its sentinel first when it starts a span, then the token
    idx = np.nonzero(mask)[0]
    pieces = np.stack([np.where(starts[idx], sentinel[idx], -1), tokens[idx]], axis=1).reshape(-1)
    targets = pieces[pieces >= 0].astype(tokens.dtype)
    return inputs, targets


def span_corruption(dataset: tf.data.Dataset, output_features, max_tokens: int = 56, density: float = 0.15,
                    mean_span: float = 3.0, salt: int = 0) -> tf.data.Dataset:
    """Tokenized ``targets`` (truncated to ``max_tokens``) -> ``{'inputs', 'targets'}`` by T5 span
    corruption with sentinels from the ``targets`` vocabulary."""
    vocab_size = output_features["targets"].vocabulary.vocab_size

    def fn(tokens):
        i, t = corrupt(tokens[:max_tokens], vocab_size, density, mean_span, salt)
        return i.astype(np.int32), t.astype(np.int32)

    return _split_targets(dataset, fn)


def prefix_lm(dataset: tf.data.Dataset, output_features, max_tokens: int = 96, salt: int = 0) -> tf.data.Dataset:
    """Tokenized ``targets`` -> ``{'inputs': prefix, 'targets': rest}`` split at a random point."""

    def fn(tokens):
        tokens = tokens[:max_tokens]
        rng = np.random.default_rng([zlib.crc32(tokens.tobytes()), salt])
        cut = int(rng.integers(1, max(len(tokens), 2)))
        return tokens[:cut].astype(np.int32), tokens[cut:].astype(np.int32)

    return _split_targets(dataset, fn)


def _split_targets(dataset: tf.data.Dataset, fn) -> tf.data.Dataset:
    """Map ``fn(targets tokens) -> (inputs, targets)`` (numpy) over the dataset, in order."""

    def map_fn(ex):
        i, t = tf.numpy_function(fn, [ex["targets"]], [tf.int32, tf.int32])
        i.set_shape([None])
        t.set_shape([None])
        return {"inputs": i, "targets": t}

    return dataset.map(map_fn, num_parallel_calls=1, deterministic=True)


@seqio.map_over_dataset
def text_to_targets(ex, key: str = "text"):
    return {"targets": ex[key]}
