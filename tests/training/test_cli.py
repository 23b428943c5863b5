"""The gin entry points: T5X flags, required macros, operative config, and clear errors."""

import os

import pytest

from moejax.main import main, parse_gin_flags


def test_parse_gin_flags():
    assert parse_gin_flags(["--gin.TRAIN_STEPS=3", "--gin.MODEL_DIR", "'/tmp/x'"]) == \
        ["TRAIN_STEPS = 3", "MODEL_DIR = '/tmp/x'"]
    with pytest.raises(ValueError, match="unrecognised argument '--steps=3'"):
        parse_gin_flags(["--steps=3"])


def run(args, capsys):
    rc = main(args)
    return rc, capsys.readouterr()


def test_missing_required_macros_are_named(capsys):
    rc, out = run(["train", "--gin_file=models/tiny_switch.gin", "--gin_file=runs/pretrain.gin"], capsys)
    assert rc == 2
    assert "required gin macros not set: MODEL_DIR, MIXTURE_OR_TASK_NAME" in out.err
    rc, out = run(["train", "--gin_file=runs/pretrain.gin", "--gin.MODEL_DIR='/tmp/x'",
                   "--gin.MIXTURE_OR_TASK_NAME='synth_sort'"], capsys)
    assert rc == 2 and "MODEL (load a models/*.gin file)" in out.err
    rc, out = run(["train", "--gin_file=models/tiny_switch.gin", "--gin_file=runs/finetune.gin",
                   "--gin.MODEL_DIR='/tmp/x'", "--gin.MIXTURE_OR_TASK_NAME='synth_sort'"], capsys)
    assert rc == 2 and "INITIAL_CHECKPOINT_PATH" in out.err


def test_gin_typo_and_unknown_task(tmp_path, capsys):
    base = ["train", "--gin_file=models/tiny_switch.gin", "--gin_file=runs/pretrain.gin",
            f"--gin.MODEL_DIR='{tmp_path}'"]
    rc, out = run(base + ["--gin.MIXTURE_OR_TASK_NAME='synth_sort'", "--gin.moejax.TrainConfg.batch_size=4"], capsys)
    assert rc == 2 and "TrainConfg" in out.err
    rc, out = run(base + ["--gin.MIXTURE_OR_TASK_NAME='synth_srot'"], capsys)
    assert rc == 2 and "unknown task or mixture 'synth_srot'; did you mean synth_sort" in out.err
    rc, out = run(["train", "--gin_file=runs/nope.gin"], capsys)
    assert rc == 2 and "nope.gin" in out.err


def test_feature_lengths_too_short(tmp_path, capsys):
    rc, out = run(["train", "--gin_file=models/tiny_switch.gin", "--gin_file=runs/pretrain.gin",
                   f"--gin.MODEL_DIR='{tmp_path}'", "--gin.MIXTURE_OR_TASK_NAME='corpus_span_corruption'",
                   "--gin.TASK_FEATURE_LENGTHS={'inputs': 8, 'targets': 4}", "--gin.BATCH_SIZE=8",
                   "--gin.TRAIN_STEPS=2"], capsys)
    assert rc == 2 and "are too short for 'corpus_span_corruption': " in out.err
    assert "of 'inputs' would be truncated" in out.err
    assert not os.path.exists(tmp_path / "checkpoints" / "1")


def test_every_registered_model_has_a_gin_file():
    from moejax.entry import shipped_gin_dir
    from moejax.models.registry import names

    d = shipped_gin_dir()
    for n in names():
        assert os.path.exists(os.path.join(d, "models", f"{n}.gin")), n
    for r in ("pretrain", "finetune", "multitask", "instruct", "eval", "infer"):
        assert os.path.exists(os.path.join(d, "runs", f"{r}.gin")), r
