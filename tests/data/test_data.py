"""Embedded corpus, vocabulary, preprocessors, metrics and task registrations."""

import os

import numpy as np
import pytest
import seqio

import moejax.tasks  # noqa: F401  (registers the shipped seqio tasks)
from moejax.data import corpus, metrics
from moejax.data.batches import check_lengths, get_provider
from moejax.data.preprocessors import corrupt, noise_span_mask
from moejax.data.vocab import get_vocabulary


def test_corpus_is_deterministic_and_splits_differ():
    a, b = corpus.documents("train", 50), corpus.documents("train", 50)
    assert a == b
    assert a != corpus.documents("validation", 50)
    assert {d["domain"] for d in a} == set(corpus.DOMAINS)
    ex = corpus.task_examples("sort", "train", 20)
    assert all(e["targets"].split() == sorted(e["inputs"].split()) for e in ex)
    ex = corpus.task_examples("reverse", "train", 20)
    assert all(e["targets"].split() == e["inputs"].split()[::-1] for e in ex)
    add = corpus.task_examples("add", "train", 20)
    assert all(corpus.NUMBERS.index(e["targets"]) == sum(corpus.NUMBERS.index(w) for w in e["inputs"].split(" plus "))
               for e in add)


@pytest.mark.parametrize("length,density,mean_span",
                         [(30, 0.15, 3.0), (57, 0.5, 8.0), (12, 0.15, 3.0), (100, 0.5, 64.0)])
def test_span_corruption_reconstructs_the_original(length, density, mean_span):
    vocab = 500
    tokens = np.arange(10, 10 + length, dtype=np.int32)
    inputs, targets = corrupt(tokens, vocab, density, mean_span, salt=7)
    sent = lambda t: t >= vocab - 100
    # splice targets back into inputs at their sentinels
    spans, cur = {}, None
    for t in targets:
        if sent(t):
            cur = int(t)
            spans[cur] = []
        else:
            spans[cur].append(int(t))
    rebuilt = []
    for t in inputs:
        rebuilt.extend(spans[int(t)] if sent(t) else [int(t)])
    assert rebuilt == tokens.tolist()
    n_noise = sum(len(v) for v in spans.values())
    assert n_noise == int(np.clip(round(length * density), 1, length - 1))
    # sentinels count down from vocab - 1 in order
    assert [int(t) for t in inputs if sent(t)] == list(range(vocab - 1, vocab - 1 - len(spans), -1))


def test_noise_mask_span_count():
    rng = np.random.default_rng(0)
    m = noise_span_mask(1000, 0.15, 3.0, rng)
    starts = m & ~np.concatenate([[False], m[:-1]])
    assert m.sum() == 150 and starts.sum() == 50


def test_vocabulary_trained_and_cached():
    v = get_vocabulary("spm")
    text = "the quick fox runs in the forest . Sort these words alphabetically: owl cat"
    ids = v.encode(text)
    assert v.decode(ids) == text
    assert len(ids) < len(text) / 2          # real subwords, not characters
    assert os.path.exists(v.sentencepiece_model_file)
    b = get_vocabulary("byte")
    assert b.decode(b.encode("héllo")) == "héllo"
    with pytest.raises(ValueError, match="unknown vocabulary 'wordpiece'"):
        get_vocabulary("wordpiece")


def test_tasks_registered_and_produce_examples():

    names = set(seqio.TaskRegistry.names()) | set(seqio.MixtureRegistry.names())
    for n in ["corpus_span_corruption", "corpus_lm", "corpus_prefix_lm", "corpus_ul2", "synth_sort",
              "synth_translate", "synth_multitask", "synth_instruct", "synth_instruct_add", "c4_span_corruption",
              "c4_lm", "glue_sst2", "wmt14_de_en"]:
        assert n in names, n
    task = seqio.get_mixture_or_task("synth_instruct_sort")
    train = [e["inputs_pretokenized"].decode() for e in
             task.get_dataset({"inputs": 64, "targets": 32}, split="train", shuffle=False).take(50).as_numpy_iterator()]
    val = [e["inputs_pretokenized"].decode() for e in
           task.get_dataset({"inputs": 64, "targets": 32}, split="validation", shuffle=False).as_numpy_iterator()]
    held_out = corpus.TEMPLATES["sort"][-1].split("{")[0]
    assert all(v.startswith(held_out) for v in val)
    assert not any(t.startswith(held_out) for t in train)
    assert len({t.split(":")[0] for t in train}) >= 2      # several phrasings in training
    ul2 = seqio.get_mixture_or_task("corpus_ul2")
    assert sorted(round(r, 2) for r in (ul2.get_rate(t) for t in ul2.tasks)) == [0.1] * 5 + [0.5]


def test_unknown_task_lists_close_matches():
    with pytest.raises(ValueError, match=r"unknown task or mixture 'synth_srot'; did you mean synth_sort"):
        get_provider("synth_srot")
    with pytest.raises(ValueError, match=r"task_feature_lengths\[.targets.\]=2 is too short"):
        check_lengths({"inputs": 64, "targets": 2}, get_provider("synth_sort"))
    with pytest.raises(ValueError, match=r"lacks \['inputs'\]"):
        check_lengths({"targets": 32}, get_provider("synth_sort"))


def test_text_files_task(tmp_path):
    from moejax.tasks import register_text_files

    f = tmp_path / "a.txt"
    f.write_text("\n".join(f"line number {i} of my own text" for i in range(40)))
    names = register_text_files(str(tmp_path / "*.txt"), name="mytext")
    assert names == ["mytext_span_corruption", "mytext_lm"]
    ex = next(seqio.get_mixture_or_task("mytext_lm").get_dataset({"targets": 32}, split="train",
                                                                  shuffle=False).as_numpy_iterator())
    assert ex["targets_pretokenized"].decode() == "line number 0 of my own text"
    with pytest.raises(ValueError, match="matched no files"):
        register_text_files(str(tmp_path / "*.csv"))


def test_real_data_tasks_with_mock_data():
    import tensorflow_datasets as tfds


    for name, lengths in [("glue_sst2", {"inputs": 64, "targets": 8}), ("wmt14_de_en", {"inputs": 64, "targets": 64}),
                          ("c4_span_corruption", {"inputs": 64, "targets": 32}), ("c4_lm", {"targets": 64})]:
        with tfds.testing.mock_data(num_examples=4, policy=tfds.testing.MockPolicy.USE_CODE):
            task = seqio.get_mixture_or_task(name)
            exs = list(task.get_dataset(lengths, split="train", shuffle=False, try_in_mem_cache=False)
                       .take(4).as_numpy_iterator())
        assert len(exs) == 4, name
        assert all(len(e["targets"]) > 0 and len(e["targets"]) <= lengths["targets"] for e in exs), name
        if name == "glue_sst2":
            assert {e["targets_pretokenized"].decode() for e in exs} <= {"positive", "negative"}
            assert all(e["inputs_pretokenized"].decode().startswith("sst2 sentence: ") for e in exs)


def test_metrics_against_closed_forms():
    assert metrics.accuracy(["a", "b", "c", "d"], ["a", "x", "c", " d "]) == {"accuracy": 75.0}
    assert metrics.exact_match(["a b", "c"], ["a  b", "d"]) == {"exact_match": 0.5}
    assert metrics.bleu(["the cat sat on the mat"], ["the cat sat on the mat"])["bleu"] == pytest.approx(100.0)
    # hyp of 7 tokens vs ref of 6; precisions 5/7, 3/6, 1/5, 0 -> BLEU 0 (no smoothing)
    assert metrics.bleu(["a b c d e f"], ["a b c x d e g"])["bleu"] == 0.0
    # 1..4-gram precisions 5/6, 3/5, 2/4, 1/3 with brevity penalty exp(1 - 7/6)
    ref, hyp = "w1 w2 w3 w4 w5 w6 w7", "w1 w2 w3 w4 x w6"
    import math
    p = [5 / 6, 3 / 5, 2 / 4, 1 / 3]
    want = 100 * math.exp(1 - 7 / 6) * math.exp(sum(math.log(x) for x in p) / 4)
    assert metrics.bleu([ref], [hyp])["bleu"] == pytest.approx(want)
