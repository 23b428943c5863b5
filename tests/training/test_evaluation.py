"""Evaluation decodes with the model's own special tokens: an encoder-decoder starts from its
``decoder_start_id`` (T5 0, NLLB 2), targets and predictions end at the task vocabulary's eos."""

import jax.numpy as jnp
import numpy as np
import optax
import seqio

import moejax.tasks  # noqa: F401  (registers the shipped tasks)
from moejax.inference import generate_encdec
from moejax.models.registry import get_config
from moejax.sharding import make_mesh
from moejax.training import evaluation
from moejax.training.config import TrainConfig
from moejax.training.state import StepFns

LENGTHS = {"inputs": 16, "targets": 6}


def _decode_directly(model, task, start_id, n):
    ex = list(task.get_dataset(LENGTHS, split="validation", shuffle=False, num_epochs=1).take(n).as_numpy_iterator())
    enc = np.zeros((len(ex), LENGTHS["inputs"]), np.int32)
    for i, e in enumerate(ex):
        enc[i, :len(e["inputs"][:LENGTHS["inputs"]])] = e["inputs"][:LENGTHS["inputs"]]
    out = np.asarray(generate_encdec(model, jnp.asarray(enc), LENGTHS["targets"], start_id=start_id,
                                     encoder_mask=jnp.asarray(enc > 0)))
    vocab = task.output_features["targets"].vocabulary
    return [vocab.decode(list(r[:list(r).index(vocab.eos_id)] if vocab.eos_id in r else r)) for r in out]


def test_nllb_decoding_starts_from_its_decoder_start_id(devices):
    cfg = get_config("tiny_nllb_moe", vocab_size=512)
    assert cfg.decoder_start_id == 2 and get_config("tiny_switch").decoder_start_id == 0
    fns = StepFns(cfg, optax.identity(), make_mesh({"data": 1}, devices[:1]))
    params = fns.init().params
    task = seqio.get_mixture_or_task("synth_copy")
    tc = TrainConfig(task_feature_lengths=LENGTHS, batch_size=4)
    rows = evaluation.predict_task(fns, params, cfg, task, tc, "validation", 4)
    model = fns.model(params)
    assert [r["prediction"] for r in rows] == _decode_directly(model, task, 2, 4)
    # the start token matters for this model: starting from T5's 0 decodes something else
    assert [r["prediction"] for r in rows] != _decode_directly(model, task, 0, 4)
    vocab = task.output_features["targets"].vocabulary
    assert all(r["target"] and vocab.eos_id == 1 for r in rows)
