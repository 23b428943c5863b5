"""seqio glue: the embedded synthetic corpus, vocabularies, preprocessors, metrics, batches."""
