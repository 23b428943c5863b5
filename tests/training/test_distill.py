"""Distillation of a trained tiny Switch teacher into a dense tiny T5 student."""

import jax
import numpy as np
import pytest
from flax import nnx

from moejax import load
from moejax.models import build_model
from moejax.models.registry import get_config
from moejax.training.distill import init_student_from_teacher
from moejax.training.optim import make_optimizer
from moejax.training.state import StepFns
from moejax.training.trainer import TrainConfig, train
from moejax.training.writers import read_jsonl

LEN = {"inputs": 64, "targets": 32}


def cfg(steps, **kw):
    return TrainConfig(batch_size=16, train_steps=steps, log_every=10, mesh_shape={"data": 8}, eval_batches=4,
                       infer_examples=2, task_feature_lengths=LEN, **kw)


@pytest.fixture(scope="module")
def teacher_dir(tmp_path_factory):
    d = str(tmp_path_factory.mktemp("teacher"))
    train(d, get_config("tiny_switch", vocab_size=512), cfg(200), make_optimizer("adafactor", 0.1, warmup_steps=50),
          progress=False)
    return d


def test_student_init_copies_non_expert_weights(teacher_dir):
    teacher = load(teacher_dir)
    student = build_model(get_config("tiny_t5", vocab_size=512), nnx.Rngs(1))
    sp = nnx.state(student, nnx.Param)
    params, copied, total = init_student_from_teacher(sp, nnx.state(teacher, nnx.Param))
    t_attn = teacher.encoder.stack.blocks[1].self_attn.q[...]          # teacher block 1 of period 0 = layer 1
    np.testing.assert_array_equal(np.asarray(params["encoder"]["stack"]["blocks"][0]["self_attn"]["q"][...])[1],
                                  np.asarray(t_attn)[0])
    np.testing.assert_array_equal(np.asarray(params["embed"]["embedding"][...]),
                                  np.asarray(teacher.embed.embedding[...]))
    # the FFN at the teacher's sparse position (layer 1) keeps the student's init; layer 0's is copied
    s_ffn = np.asarray(params["encoder"]["stack"]["blocks"][0]["ffn"]["wi"][...])
    np.testing.assert_array_equal(s_ffn[1], np.asarray(sp["encoder"]["stack"]["blocks"][0]["ffn"]["wi"][...])[1])
    np.testing.assert_array_equal(s_ffn[0], np.asarray(teacher.encoder.stack.blocks[0].ffn.wi[...])[0])
    assert 0 < copied < total
    mean, _, _ = init_student_from_teacher(sp, nnx.state(teacher, nnx.Param), expert_init="mean")
    np.testing.assert_allclose(np.asarray(mean["encoder"]["stack"]["blocks"][0]["ffn"]["wi"][...])[1],
                               np.asarray(teacher.encoder.stack.blocks[1].ffn.experts.wi[...])[0].mean(0), rtol=1e-6)


def test_distilled_student_beats_plain_student(teacher_dir, tmp_path):
    student = get_config("tiny_t5", vocab_size=512)
    opt = lambda: make_optimizer("adafactor", 0.1, warmup_steps=50)
    train(str(tmp_path / "plain"), student, cfg(60), opt(), progress=False)
    train(str(tmp_path / "kd"), student, cfg(60, teacher_checkpoint=teacher_dir, init_from_teacher=False), opt(),
          progress=False)
    ce = lambda d: read_jsonl(str(d / "eval_metrics.jsonl"))[-1]["eval/cross_entropy"]
    teacher_ce = read_jsonl(teacher_dir + "/eval_metrics.jsonl")[-1]["eval/cross_entropy"]
    assert ce(tmp_path / "kd") < ce(tmp_path / "plain"), (ce(tmp_path / "kd"), ce(tmp_path / "plain"), teacher_ce)
    assert "distill_kl" in read_jsonl(str(tmp_path / "kd" / "train_metrics.jsonl"))[-1]


def test_distill_errors(teacher_dir):
    teacher = load(teacher_dir)
    mesh = jax.sharding.Mesh(np.asarray(jax.devices()), ("data",))
    with pytest.raises(ValueError,
                       match="cannot distill across vocabularies: teacher vocab_size=512, student vocab_size=256"):
        StepFns(get_config("tiny_t5"), make_optimizer().tx, mesh, teacher=teacher)
    with pytest.raises(ValueError, match="distill within one architecture family"):
        StepFns(get_config("tiny_llama", vocab_size=512), make_optimizer().tx, mesh, teacher=teacher)
    with pytest.raises(ValueError, match="unknown expert_init 'zeros'"):
        init_student_from_teacher({}, {}, expert_init="zeros")
