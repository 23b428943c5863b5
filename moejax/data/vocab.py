"""Vocabularies: a SentencePiece model trained by moejax on its own corpus (cached), or bytes.

``get_vocabulary('spm')`` trains a unigram SentencePiece model (T5 ids: pad 0, eos 1, unk 2, plus
100 sentinel ids for span corruption) on :func:`moejax.data.corpus.corpus_text` the first time it is
asked for and caches it under ``$MOEJAX_CACHE`` (default ``~/.cache/moejax``); later calls and
other processes reuse the file. ``get_vocabulary('byte')`` is seqio's byte-level fallback.
"""

from __future__ import annotations

import functools
import hashlib
import os
import tempfile

import seqio

SPM_SIZE = 384
EXTRA_IDS = 100
CORPUS_VERSION = "1"


def cache_dir() -> str:
    return os.environ.get("MOEJAX_CACHE", os.path.join(os.path.expanduser("~"), ".cache", "moejax"))


def train_spm(path: str, vocab_size: int = SPM_SIZE) -> str:
    """Train the corpus SentencePiece model into ``path`` (atomic: written to a temp file first)."""
    import sentencepiece as spm

    from moejax.data.corpus import corpus_text

    os.makedirs(os.path.dirname(path), exist_ok=True)
    if hasattr(spm, "set_random_generator_seed"):
        spm.set_random_generator_seed(0)
    with tempfile.TemporaryDirectory(dir=os.path.dirname(path)) as tmp:
        prefix = os.path.join(tmp, "spm")
        spm.SentencePieceTrainer.train(
            sentence_iterator=iter(corpus_text()), model_prefix=prefix, vocab_size=vocab_size,
            model_type="unigram", pad_id=0, eos_id=1, unk_id=2, bos_id=-1, character_coverage=1.0,
            num_threads=1, minloglevel=2, hard_vocab_limit=False)
        os.replace(prefix + ".model", path)
    return path


class CorpusVocabulary(seqio.SentencePieceVocabulary):
    """The corpus SentencePiece vocabulary; the model file is trained when first needed, so
    importing the tasks costs nothing."""

    def __init__(self):
        key = hashlib.sha1(f"{CORPUS_VERSION}-{SPM_SIZE}".encode()).hexdigest()[:10]
        super().__init__(os.path.join(cache_dir(), f"corpus-spm-{key}.model"), extra_ids=EXTRA_IDS)

    def _model_context(self):
        if not self._model and not os.path.exists(self._sentencepiece_model_file):
            train_spm(self._sentencepiece_model_file)
        return super()._model_context()


@functools.cache
def get_vocabulary(kind: str = "spm") -> seqio.Vocabulary:
    """``'spm'`` (trained and cached on first use) or ``'byte'``."""
    if kind == "byte":
        return seqio.ByteVocabulary(extra_ids=EXTRA_IDS)
    if kind != "spm":
        raise ValueError(f"unknown vocabulary {kind!r}; valid: 'spm', 'byte'")
    return CorpusVocabulary()
