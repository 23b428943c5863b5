"""seqio Task and Mixture registrations for moejax (installed as ``moejax.tasks``).

Importing this package registers:

* pretraining on the embedded corpus: ``corpus_span_corruption`` (encoder-decoder),
  ``corpus_lm`` (causal LM), ``corpus_prefix_lm`` and the ``corpus_ul2`` mixture (OpenMoE's
  objective: 50% prefix LM, 10% each of five span-corruption settings);
* finetuning: ``synth_{classify,copy,reverse,sort,translate,add}``, the ``synth_multitask``
  mixture, instruction tasks ``synth_instruct_*`` (FLAN-style phrasings, one held out for
  validation) and the ``synth_instruct`` mixture;
* real data over TFDS: ``c4_span_corruption``, ``c4_lm``, ``glue_sst2``, ``wmt14_de_en``;
* user text files: :func:`register_text_files` (the ``TEXT_FILES`` gin macro of the runs).
"""

from moejax.tasks.real import register_real_data_tasks
from moejax.tasks.synthetic import register_synthetic_tasks
from moejax.tasks.text_files import register_text_files

register_synthetic_tasks()
register_real_data_tasks()

__all__ = ["register_real_data_tasks", "register_synthetic_tasks", "register_text_files"]
