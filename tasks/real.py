"""Real-data tasks over TFDS for users who have the data (c4, GLUE SST-2, WMT14 de-en).

Nothing is downloaded by moejax: TFDS reads ``$TFDS_DATA_DIR`` (or ``data_dir``). They use the
byte vocabulary unless another is given (e.g. T5's 32k SentencePiece model path), and are tested
offline with ``tfds.testing.mock_data``.
"""

from __future__ import annotations

import seqio
import tensorflow as tf

from moejax.data import metrics, preprocessors
from moejax.data.vocab import get_vocabulary
from moejax.tasks.common import TEXT_METRICS, add_task, features


@seqio.map_over_dataset
def _sst2(ex):
    label = tf.where(ex["label"] > 0, "positive", "negative")
    return {"inputs": tf.strings.join(["sst2 sentence: ", ex["sentence"]]), "targets": label}


@seqio.map_over_dataset
def _wmt(ex):
    return {"inputs": tf.strings.join(["translate German to English: ", ex["de"]]), "targets": ex["en"]}


def register_real_data_tasks(vocabulary: seqio.Vocabulary | None = None, prefix: str = "") -> None:
    """Register ``{prefix}c4_span_corruption``, ``c4_lm``, ``glue_sst2``, ``wmt14_de_en``."""
    vocab = vocabulary or get_vocabulary("byte")
    c4 = seqio.TfdsDataSource(tfds_name="c4/en:3.1.0")
    lm_pre = [preprocessors.text_to_targets, seqio.preprocessors.tokenize]
    add_task(f"{prefix}c4_span_corruption", source=c4, output_features=features(vocab),
             preprocessors=lm_pre + [preprocessors.span_corruption, seqio.preprocessors.append_eos_after_trim])
    add_task(f"{prefix}c4_lm", source=c4, output_features=features(vocab, inputs=False),
             preprocessors=lm_pre + [seqio.preprocessors.append_eos_after_trim])
    pre = [seqio.preprocessors.tokenize, seqio.preprocessors.append_eos_after_trim]
    add_task(f"{prefix}glue_sst2", source=seqio.TfdsDataSource(tfds_name="glue/sst2:2.0.0"),
             output_features=features(vocab), preprocessors=[_sst2] + pre, metric_fns=TEXT_METRICS)
    add_task(f"{prefix}wmt14_de_en", source=seqio.TfdsDataSource(tfds_name="wmt14_translate/de-en:1.0.0"),
             output_features=features(vocab), preprocessors=[_wmt] + pre, metric_fns=[metrics.bleu])
