"""Faults and bad input around training (issue 18): non-finite steps, preemption, damaged and
mismatched checkpoints, a second trainer, resume edge cases, mesh typos, initial checkpoints from
``merge`` / ``quantize``. One small trained run (tiny_switch, one device) is copied for each case.
Preemption (SIGTERM) runs as a real process in tests/training/test_end_to_end.py."""

import dataclasses
import os
import shutil

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from moejax import checkpoint
from moejax.checkpoint import Checkpointer, CheckpointMismatch
from moejax.models.build import build_model
from moejax.models.registry import get_config
from moejax.training.checkpoints import check_model_dir
from moejax.training.config import TrainConfig
from moejax.training.faults import NonFiniteError
from moejax.training.lock import RunLock
from moejax.training.optim import make_optimizer
from moejax.training.state import StepFns
from moejax.training.trainer import load_for_eval, make_run_mesh, train
from moejax.training.writers import read_jsonl

MODEL = get_config("tiny_switch", vocab_size=512)
CFG = TrainConfig(mixture_or_task="synth_sort", task_feature_lengths={"inputs": 16, "targets": 16}, batch_size=4,
                  train_steps=4, log_every=1, save_every=2, keep=3, mesh_shape={"data": 1}, eval_batches=1,
                  infer_examples=0)           # no decoding in the final evals: these tests are about faults


def opt(lr=0.01, name="adafactor"):
    return make_optimizer(name, lr, schedule="constant")


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """A 4-step run with checkpoints 2 and 4."""
    d = str(tmp_path_factory.mktemp("faults") / "run")
    train(d, MODEL, CFG, opt(), progress=False)
    return d


@pytest.fixture
def run_copy(trained, tmp_path):
    d = str(tmp_path / "run")
    shutil.copytree(trained, d)
    return d


@pytest.fixture(scope="module")
def fns():
    return StepFns(MODEL, opt().tx, make_run_mesh({"data": 1}))


def steps(d):
    return sorted(os.listdir(os.path.join(d, "checkpoints")))


def finite_params(d, step):
    ck = Checkpointer(d, keep=None)
    try:
        got = ck.restore_params(StepFns(MODEL, opt().tx, make_run_mesh({"data": 1})).abstract_params, step)
    finally:
        ck.close()
    return all(bool(np.all(np.isfinite(np.asarray(x)))) for x in jax.tree.leaves(got))


# ----------------------------------------------------------------------------- non-finite steps

def test_a_nonfinite_step_is_not_applied(fns):
    from moejax.data.batches import to_global
    from tests.training.test_training import fake_batch

    state = fns.init()
    batch = to_global(fake_batch(b=4, t=16, s=16), fns.mesh)
    ok, m = fns.train_step(jax.tree.map(jnp.copy, state), batch)
    assert float(m["nonfinite"]) == 0 and int(ok.step) == 1
    leaves = jax.tree_util.tree_flatten_with_path(state.params)[0]
    path = next(p for p, x in leaves if x.ndim >= 2)
    poisoned = jax.tree_util.tree_map_with_path(lambda p, x: x.at[(0,) * x.ndim].set(jnp.nan) if p == path else x,
                                                state.params)
    before = jax.tree.map(np.asarray, (poisoned, state.opt_state))
    new, m = fns.train_step(dataclasses.replace(state, params=poisoned), batch)
    assert float(m["nonfinite"]) == 1 and int(new.step) == 1             # counted, not applied
    jax.tree.map(lambda a, b: np.testing.assert_array_equal(np.asarray(b), a), before, (new.params, new.opt_state))


def test_nonfinite_run_stops_and_keeps_the_good_checkpoints(run_copy):
    d = run_copy
    cfg = dataclasses.replace(CFG, train_steps=30, max_nonfinite_steps=2)
    with pytest.raises(NonFiniteError, match=r"2 consecutive steps \(\d+\.\.\d+\) had a non-finite loss"):
        train(d, MODEL, cfg, opt(lr=1e9), progress=False)
    rec = read_jsonl(os.path.join(d, "train_metrics.jsonl"))
    bad = [r["step"] for r in rec if r["nonfinite"] > 0]
    assert bad and max(r["step"] for r in rec) < 30                      # stopped early
    kept = [int(s) for s in steps(d)]
    assert 2 in kept and 4 in kept and all(s < bad[0] for s in kept)     # none saved at or after a bad step
    assert all(finite_params(d, s) for s in kept)


# ----------------------------------------------------------------------------- bad run settings

@pytest.mark.parametrize("field,value,match", [
    ("keep", 0, "keep must be an integer >= 1 or None"), ("train_steps", "ten", "train_steps must be an integer"),
    ("batch_size", 0, "batch_size must be an integer >= 1"), ("save_every", 0, "save_every must be"),
    ("log_every", 0, "log_every must be"), ("mesh_shape", {"data": "2"}, "mesh_shape must map"),
    ("max_nonfinite_steps", 0, "max_nonfinite_steps must be"),
    ("task_feature_lengths", {"inputs": 0}, "task_feature_lengths"),
])
def test_bad_train_config_values(field, value, match):
    with pytest.raises(ValueError, match=match):
        dataclasses.replace(CFG, **{field: value})


def test_bad_optimizer_values():
    with pytest.raises(ValueError, match="learning_rate must be a number >= 0.0, got '0.1'"):
        make_optimizer("adamw", "0.1")
    with pytest.raises(ValueError, match="warmup_steps must be an integer"):
        make_optimizer("adamw", 0.1, warmup_steps=2.5)


def test_mesh_axis_typo_is_refused():
    with pytest.raises(ValueError, match=r"mesh axis 'experts' \(did you mean 'expert'\?\) is not used"):
        make_run_mesh({"data": 2, "experts": 4})


def test_train_steps_below_the_checkpoint_and_a_lost_final_eval(run_copy):
    d = run_copy
    with pytest.raises(ValueError, match="already at step 4, past TRAIN_STEPS=2"):
        train(d, MODEL, dataclasses.replace(CFG, train_steps=2), opt(), progress=False)
    os.remove(os.path.join(d, "eval_metrics.jsonl"))                     # as if killed during the final eval
    train(d, MODEL, CFG, opt(), progress=False)
    assert [r["step"] for r in read_jsonl(os.path.join(d, "eval_metrics.jsonl"))] == [4]
    assert steps(d) == ["2", "4"]


# ----------------------------------------------------------------------------- one trainer per MODEL_DIR

def test_a_second_trainer_on_the_same_model_dir_is_refused(run_copy):
    d = run_copy
    before = open(os.path.join(d, "train_metrics.jsonl")).read()
    with RunLock(d):
        with pytest.raises(ValueError, match=r"is in use by another moejax train \(host .*pid \d+"):
            train(d, MODEL, dataclasses.replace(CFG, train_steps=6), opt(), progress=False)
    assert open(os.path.join(d, "train_metrics.jsonl")).read() == before and steps(d) == ["2", "4"]
    with RunLock(d):                      # released when the holder ends
        pass


# ----------------------------------------------------------------------------- damaged checkpoints

def _truncate(d):
    for root, _, files in os.walk(os.path.join(d, "checkpoints", "4", "params")):
        for f in files:
            p = os.path.join(root, f)
            if os.path.getsize(p) > 64 and ("/d" in root or f.startswith("manifest")):
                with open(p, "r+b") as fh:
                    fh.truncate(os.path.getsize(p) // 2)


def _garbage_metadata(d):
    for f in ("_CHECKPOINT_METADATA", "params/_METADATA"):
        with open(os.path.join(d, "checkpoints", "4", f), "w") as fh:
            fh.write("{not json")


def _empty_newer(d):
    os.makedirs(os.path.join(d, "checkpoints", "6"))


@pytest.mark.parametrize("damage,broken", [(_truncate, 4), (_garbage_metadata, 4), (_empty_newer, 6)])
def test_damaged_newest_checkpoint_falls_back_to_the_previous(run_copy, fns, damage, broken, capsys):
    d = run_copy
    damage(d)
    ck = Checkpointer(d)
    try:
        state = ck.restore_intact(fns.abstract_state())
    finally:
        ck.close()
    want = 2 if broken == 4 else 4
    assert int(state.step) == want
    out = capsys.readouterr().out
    assert f"checkpoint {broken} in " in out and "is damaged" in out
    assert f"{broken}.damaged" in steps(d)                             # kept for inspection


def test_nonfinite_params_on_disk_are_damage(run_copy, fns, capsys):
    d = run_copy
    ck = Checkpointer(d)
    state = ck.restore(fns.abstract_state())
    nan = jax.tree.map(lambda x: jnp.full_like(x, jnp.nan) if jnp.issubdtype(x.dtype, jnp.floating) else x,
                       state.params)
    ck.save(dataclasses.replace(state, params=nan, step=jnp.int32(6)))
    ck.close()
    with pytest.raises(ValueError, match=r"checkpoints/6' holds non-finite values \(NaN / inf\) in \d+ parameters"):
        load_for_eval(d, MODEL, CFG)
    ck = Checkpointer(d)
    try:
        assert int(ck.restore_intact(fns.abstract_state(), check=_finite_check).step) == 4
    finally:
        ck.close()
    assert "checkpoint 6 in" in capsys.readouterr().out


def _finite_check(state):
    from moejax.training.faults import nonfinite_leaves

    if nonfinite_leaves(state.params):
        raise ValueError("non-finite params")


# ----------------------------------------------------------------------------- mismatches

def test_resume_with_another_optimizer_says_so(run_copy):
    fns = StepFns(MODEL, opt(name="adamw").tx, make_run_mesh({"data": 1}))
    ck = Checkpointer(run_copy)
    try:
        with pytest.raises(CheckpointMismatch, match="holds the state of another optimizer") as e:
            ck.restore_intact(fns.abstract_state())
    finally:
        ck.close()
    assert len(str(e.value)) < 600 and "\n" not in str(e.value)
    assert steps(run_copy) == ["2", "4"]                               # a mismatch is not damage


def test_a_compute_dtype_change_resumes_another_model_is_named(run_copy):
    d = run_copy
    bf16 = dataclasses.replace(MODEL, dtype=jnp.bfloat16, moe=dataclasses.replace(MODEL.moe, dtype=jnp.bfloat16))
    check_model_dir(d, bf16)
    assert checkpoint.read_config(d) == bf16
    pooled = dataclasses.replace(bf16, moe=dataclasses.replace(bf16.moe, balance_loss_scope="global"))
    check_model_dir(d, pooled)                  # a loss setting, not another model
    assert checkpoint.read_config(d) == pooled
    with pytest.raises(ValueError, match=r"another model \(d_ff 128 -> 64\)"):
        check_model_dir(d, dataclasses.replace(pooled, d_ff=64))


def test_initial_checkpoint_from_merge_and_quantize(tmp_path):
    from flax import nnx

    from moejax.inference.merging import merge_experts
    from moejax.inference.quantize import quantize_model

    model = build_model(MODEL, nnx.Rngs(0))
    merged, quant = str(tmp_path / "merged"), str(tmp_path / "quant")
    checkpoint.save(merge_experts(model, 2), merged)
    checkpoint.save(quantize_model(model, 8), quant)
    cfg = dataclasses.replace(CFG, train_steps=1, initial_checkpoint=merged)
    with pytest.raises(ValueError, match=r"another model \(moe.num_experts=2 there, 4 here.*checkpoint_config"):
        train(str(tmp_path / "a"), MODEL, cfg, opt(), progress=False)
    assert not os.path.exists(tmp_path / "a" / "checkpoints" / "1")
    # the model it holds (MODEL = @moejax.checkpoint_config()): its params load as a run's initial params
    own = checkpoint.read_config(merged)
    fns2 = StepFns(own, opt().tx, make_run_mesh({"data": 1}))
    params = checkpoint.load_params(merged, fns2.abstract_state().params, expect=own)
    assert params["encoder"]["stack"]["blocks"][1]["ffn"]["experts"]["wi"][...].shape[1] == 2
    with pytest.raises(ValueError, match="quantized models are for eval / infer, not training"):
        train(str(tmp_path / "c"), checkpoint.read_config(quant), dataclasses.replace(cfg, initial_checkpoint=quant),
              opt(), progress=False)
    with pytest.raises(ValueError, match=r"INITIAL_CHECKPOINT_PATH: .* holds another model \(moe.quant_bits=8"):
        train(str(tmp_path / "d"), MODEL, dataclasses.replace(cfg, initial_checkpoint=quant), opt(), progress=False)
