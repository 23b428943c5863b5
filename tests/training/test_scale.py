"""A ~100M-parameter Mixtral-shaped decoder trained through the gin CLI on the 8 emulated devices
with FSDP + expert parallelism + full rematerialisation (mesh/fsdp2_expert4.gin, REMAT='full'):
the loss falls over 50 steps and a resume from the step-48 checkpoint replays steps 49-50 with the
same losses. (That FSDP shards the parameters and optimizer state, measured on the arrays, and that
a sharded step equals the single-device one: tests/training/test_fsdp.py.)"""

import json
import os
import shutil

import numpy as np
import pytest

from moejax.main import main
from moejax.training.writers import read_jsonl

pytestmark = pytest.mark.slow

# 8 layers of 8 SwiGLU experts (d 512, f 1024) top-2 + GQA attention (8 heads, 4 kv): 109M parameters
# at the task's vocabulary (the count is checked from the run's own model_config.json)
OVERRIDES = {"d_model": 512, "num_layers": 8, "num_heads": 8, "num_kv_heads": 4, "head_dim": 64, "d_ff": 1024,
             "moe.d_model": 512, "moe.d_ff": 1024, "moe.num_experts": 8}


def _train(model_dir, steps):
    args = ["train", "--gin_file=models/tiny_mixtral.gin", "--gin_file=runs/pretrain.gin",
            "--gin_file=mesh/fsdp2_expert4.gin", f"--gin.MODEL_DIR='{model_dir}'",
            "--gin.MIXTURE_OR_TASK_NAME='corpus_lm'", "--gin.TASK_FEATURE_LENGTHS={'targets': 16}",
            "--gin.BATCH_SIZE=8", f"--gin.TRAIN_STEPS={steps}", "--gin.REMAT='full'", "--gin.WARMUP_STEPS=10",
            "--gin.moejax.optimizer.learning_rate=0.05", f"--gin.moejax.model_config.overrides={OVERRIDES!r}",
            "--gin.moejax.TrainConfig.log_every=1", "--gin.moejax.TrainConfig.save_every=48",
            "--gin.moejax.TrainConfig.eval_batches=1", "--gin.moejax.TrainConfig.infer_examples=0"]
    assert main(args) == 0


def test_100m_mixtral_fsdp_expert_parallel_remat_trains_and_resumes_exactly(tmp_path):
    from moejax.checkpoint import read_config
    from moejax.models.params import report

    run = str(tmp_path / "run")
    _train(run, 50)
    cfg = read_config(run)
    assert cfg.remat == "full" and cfg.moe.num_experts == 8
    assert 100e6 <= report(cfg).total <= 120e6, report(cfg).total
    recs = read_jsonl(os.path.join(run, "train_metrics.jsonl"))
    loss = {r["step"]: r["loss"] for r in recs}
    assert sorted(loss) == list(range(1, 51))
    assert np.mean([loss[s] for s in range(46, 51)]) < np.mean([loss[s] for s in range(1, 6)]) - 0.5, loss
    assert sorted(os.listdir(os.path.join(run, "checkpoints"))) == ["48", "50"]
    # the run's record names its mesh; resume on it from the step-48 checkpoint
    record = open(os.path.join(run, "config.gin")).read()
    assert "'fsdp': 2" in record and "'expert': 4" in record
    again = str(tmp_path / "again")
    shutil.copytree(run, again)
    shutil.rmtree(os.path.join(again, "checkpoints", "50"))
    with open(os.path.join(again, "train_metrics.jsonl"), "w") as f:
        f.writelines(json.dumps(r) + "\n" for r in recs if r["step"] <= 48)
    _train(again, 50)
    replay = {r["step"]: r["loss"] for r in read_jsonl(os.path.join(again, "train_metrics.jsonl"))}
    assert sorted(replay) == list(range(1, 51))
    np.testing.assert_allclose([replay[s] for s in (49, 50)], [loss[s] for s in (49, 50)], rtol=1e-6)
