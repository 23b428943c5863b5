"""Tasks over the user's own text files (one example per line): the ``TEXT_FILES`` gin macro."""

from __future__ import annotations

import glob
import os

import seqio
import tensorflow as tf

from moejax.data import preprocessors
from moejax.tasks.common import add_task, features


def register_text_files(patterns, name: str = "text_files", vocabulary: seqio.Vocabulary | None = None,
                        validation_fraction: float = 0.05) -> list[str]:
    """Register ``{name}_span_corruption`` and ``{name}_lm`` over the lines of the files matching
    ``patterns`` (a glob or a list of globs); the last ``validation_fraction`` of the lines is
    the validation split. Returns the task names. Raises ValueError when nothing matches."""
    patterns = [patterns] if isinstance(patterns, str) else list(patterns)
    if not patterns or not all(isinstance(p, str) and p for p in patterns):
        raise ValueError(f"TEXT_FILES must be a glob or a list of globs, got {patterns!r}")
    files = sorted({f for p in patterns for f in glob.glob(os.path.expanduser(p)) if os.path.isfile(f)})
    if not files:
        raise ValueError(f"TEXT_FILES {patterns} matched no files")
    lines = []
    for f in files:
        lines += _lines(f)
    if not lines:
        raise ValueError(f"TEXT_FILES {patterns}: the {len(files)} matching files ({', '.join(files[:3])}"
                         f"{', ...' if len(files) > 3 else ''}) hold no text (empty or whitespace only)")
    n_val = max(1, int(len(lines) * validation_fraction)) if len(lines) > 1 else 0
    split_lines = {"train": lines[:len(lines) - n_val] or lines, "validation": lines[len(lines) - n_val:] or lines}

    def fn(split, shuffle_files=False, seed=None):
        return tf.data.Dataset.from_tensor_slices({"text": split_lines[split]})

    src = seqio.FunctionDataSource(fn, splits=["train", "validation"])
    pre = [preprocessors.text_to_targets, seqio.preprocessors.tokenize]
    sc, lm = f"{name}_span_corruption", f"{name}_lm"
    for n in (sc, lm):
        if n in seqio.TaskRegistry.names():
            seqio.TaskRegistry.remove(n)
    add_task(sc, source=src, output_features=features(vocabulary),
             preprocessors=pre + [preprocessors.span_corruption, seqio.preprocessors.append_eos_after_trim])
    add_task(lm, source=src, output_features=features(vocabulary, inputs=False),
             preprocessors=pre + [seqio.preprocessors.append_eos_after_trim])
    return [sc, lm]


def _lines(path: str) -> list[str]:
    """The non-blank lines of a UTF-8 text file; ValueError naming the file for anything else."""
    with open(path, "rb") as fh:
        raw = fh.read()
    if b"\x00" in raw:
        raise ValueError(f"TEXT_FILES: {path!r} is a binary file (it holds NUL bytes); give UTF-8 text files")
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as e:
        bad = raw[e.start:e.start + 1]
        raise ValueError(f"TEXT_FILES: {path!r} is not UTF-8 text (byte {e.start}: {bad!r})") from None
    return [ln.strip() for ln in text.splitlines() if ln.strip()]
