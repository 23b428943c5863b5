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


BASE = ["--gin_file=models/tiny_switch.gin", "--gin_file=runs/pretrain.gin", "--gin.MIXTURE_OR_TASK_NAME='synth_sort'"]


@pytest.mark.parametrize("flags,match", [
    (["--gin.MODEL_DIR=/tmp/x"], "--gin.MODEL_DIR=/tmp/x: gin cannot parse the value '/tmp/x'; strings need gin "
                                 "quotes: --gin.MODEL_DIR=\"'/tmp/x'\""),
    (["--gin.MODEL_DIR='/tmp/x"], "gin cannot parse the value \"'/tmp/x\""),
    (["--gin.TRAIN_STEPS='ten'"], "TrainConfig.train_steps must be an integer >= 0, got 'ten'"),
    (["--gin.moejax.optimizer.learning_rate='0.1'"], "optimizer learning_rate must be a number >= 0.0, got '0.1'"),
    (["--gin.COMPUTE_DTYPE='bf16'"], "dtype 'bf16' is not a dtype; e.g. float32, bfloat16"),
    (["--gin.BATCH_SIZE=0"], "TrainConfig.batch_size must be an integer >= 1, got 0"),
    (["--gin.moejax.TrainConfig.save_every=0"], "TrainConfig.save_every must be an integer >= 1, got 0"),
    (["--gin.moejax.TrainConfig.log_every=0"], "TrainConfig.log_every must be an integer >= 1, got 0"),
    (["--gin.moejax.TrainConfig.keep=0"], "keep must be an integer >= 1 or None, got 0"),
    (["--gin.TRAIN_STEP=2"], "--gin.TRAIN_STEP: no loaded gin file uses the macro TRAIN_STEP; did you mean "
                             "TRAIN_STEPS"),
    (["--gin.MESH_SHAPE={'data': 2, 'experts': 4}"], "mesh axis 'experts' (did you mean 'expert'?) is not used"),
    (["--gin.BATCH_SIZE=6", "--gin.MESH_SHAPE={'data': 8}"], "BATCH_SIZE=6 does not split over the 8 batch shards"),
    (["--gin.TEXT_FILES='/nonexistent/*.txt'"], "TEXT_FILES ['/nonexistent/*.txt'] matched no files"),
])
def test_bad_values_are_one_line_errors(tmp_path, capsys, flags, match):
    model_dir = [] if any(f.startswith("--gin.MODEL_DIR") for f in flags) else [f"--gin.MODEL_DIR='{tmp_path}'"]
    rc, out = run(["train", *BASE, *model_dir, *flags], capsys)
    lines = [ln for ln in out.err.splitlines() if ln.startswith("error:") or "Traceback" in ln]
    assert rc == 2 and len(lines) == 1 and lines[0].startswith("error:"), out.err
    assert match in lines[0]
    assert not os.path.exists(tmp_path / "config.gin")                 # a refused run records nothing


def test_layout_and_mesh_flag_errors(capsys):
    for args, match in ((["layout", "--devices", "0"], "--devices must be >= 1, got 0"),
                        (["params", "--model", "tiny_switch", "--mesh", "data=2,experts=4"], "mesh axis 'experts'"),
                        (["layout", "--model", "tiny_switch"], "needs --mesh")):
        rc, out = run(args, capsys)
        assert rc == 2 and out.err.startswith("error:") and match in out.err and "Traceback" not in out.err


def test_debug_flag_shows_the_traceback(capsys):
    with pytest.raises(ValueError, match="--devices must be >= 1"):
        main(["--debug", "layout", "--devices", "0"])


def test_text_files_train_eval_and_the_run_record(tmp_path, capsys):
    """TEXT_FILES registers the user's text as tasks; eval / infer and refused runs keep the
    training run's config.gin."""
    (tmp_path / "a.txt").write_text("the quick brown fox jumps over the lazy dog\n" * 40)
    (tmp_path / "b.txt").write_text("pack my box with five dozen liquor jugs\n\n" * 40)
    d = tmp_path / "run"
    common = ["--gin_file=models/tiny_switch.gin", f"--gin.MODEL_DIR='{d}'", f"--gin.TEXT_FILES='{tmp_path}/*.txt'",
              "--gin.MIXTURE_OR_TASK_NAME='text_files_span_corruption'", "--gin.BATCH_SIZE=4",
              "--gin.MESH_SHAPE={'data': 1}", "--gin.moejax.TrainConfig.eval_batches=1",
              "--gin.moejax.TrainConfig.infer_examples=0"]
    rc, out = run(["train", "--gin_file=runs/pretrain.gin", *common, "--gin.TRAIN_STEPS=2"], capsys)
    assert rc == 0, out.err
    record = (d / "config.gin").read_text()
    assert "TRAIN_STEPS = 2" in record and os.path.isdir(d / "checkpoints" / "2")
    rc, out = run(["eval", "--gin_file=runs/eval.gin", *common], capsys)
    assert rc == 0, out.err
    assert (d / "config.gin").read_text() == record and (d / "config_eval.gin").exists()
    assert (d / "operative_config_eval.gin").exists()
    rc, out = run(["train", "--gin_file=runs/pretrain.gin", *common, "--gin.TRAIN_STEPS=1"], capsys)
    assert rc == 2 and "already at step 2, past TRAIN_STEPS=1" in out.err
    assert (d / "config.gin").read_text() == record


def test_text_files_that_are_not_text(tmp_path):
    from moejax.tasks import register_text_files

    (tmp_path / "empty.txt").write_text("  \n\n\t\n")
    with pytest.raises(ValueError, match="hold no text \\(empty or whitespace only\\)"):
        register_text_files(str(tmp_path / "empty.txt"))
    (tmp_path / "blob.txt").write_bytes(b"abc\x00\x01\x02")
    with pytest.raises(ValueError, match="blob.txt' is a binary file"):
        register_text_files(str(tmp_path / "*.txt"))
    (tmp_path / "blob.txt").write_bytes(b"caf\xe9 latin-1\n")
    with pytest.raises(ValueError, match="blob.txt' is not UTF-8 text \\(byte 3"):
        register_text_files(str(tmp_path / "blob.txt"))
