"""Metric writers: TensorBoard event files (``tf.summary``), a JSON-lines log, and the console.

``MetricWriter(model_dir, 'train')`` writes scalars and histograms under ``<model_dir>/train``
(open it with ``tensorboard --logdir MODEL_DIR``) and appends every record to
``<model_dir>/train_metrics.jsonl``. In a multi-process run only process 0 writes (the values are
global); the writers of the other processes do nothing.
"""

from __future__ import annotations

import json
import os

import numpy as np


class MetricWriter:
    def __init__(self, model_dir: str, name: str):
        import jax
        import tensorflow as tf

        self._tf = tf
        self.enabled = jax.process_index() == 0
        self.writer = tf.summary.create_file_writer(os.path.join(model_dir, name)) if self.enabled else None
        self.jsonl = os.path.join(model_dir, f"{name}_metrics.jsonl")

    def write(self, step: int, scalars: dict, histograms: dict | None = None) -> None:
        if not self.enabled:
            return
        tf = self._tf
        with self.writer.as_default(step=int(step)):
            for k, v in scalars.items():
                tf.summary.scalar(k, float(v))
            for k, v in (histograms or {}).items():
                tf.summary.histogram(k, np.asarray(v))
        self.writer.flush()
        rec = {"step": int(step), **{k: float(v) for k, v in scalars.items()}}
        rec.update({k: np.asarray(v).tolist() for k, v in (histograms or {}).items()})
        with open(self.jsonl, "a") as f:
            f.write(json.dumps(rec) + "\n")

    def close(self) -> None:
        if self.writer is not None:
            self.writer.close()


def read_jsonl(path: str) -> list[dict]:
    """Records of a metrics log; a step logged twice (before and after a resume) keeps the last."""
    by_step = {}
    with open(path) as f:
        for line in f:
            if line.strip():
                rec = json.loads(line)
                by_step[rec["step"]] = rec
    return [by_step[s] for s in sorted(by_step)]
