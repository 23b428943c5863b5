"""Trainer pieces: schedules, Adafactor factoring, loss, sharded state, freezing, microbatches,
checkpoint restore onto other meshes, sparse upcycling, and bad input."""

import math
import os

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from moejax.checkpoint import Checkpointer
from moejax.data.batches import to_global
from moejax.models.registry import get_config
from moejax.moe import MoeConfig
from moejax.sharding import DEFAULT_RULES, make_mesh
from moejax.training.checkpoints import check_model_dir
from moejax.training.loss import LossConfig, cross_entropy
from moejax.training.optim import make_optimizer, make_schedule
from moejax.training.state import StepFns
from moejax.training.trainer import TrainConfig, make_run_mesh, train
from moejax.training.upcycle import upcycle_params

VOCAB = 512


def tiny(name="tiny_switch", **kw):
    return get_config(name, vocab_size=VOCAB, **kw)


def fake_batch(b=8, t=12, s=8, seed=0, enc=True):
    r = np.random.default_rng(seed)
    tgt = r.integers(3, VOCAB, (b, s)).astype(np.int32)
    tgt[:, -2:] = 0
    tgt[:, -3] = 1
    batch = {"decoder_target_tokens": tgt,
             "decoder_input_tokens": np.concatenate([np.zeros((b, 1), np.int32), tgt[:, :-1]], 1),
             "decoder_loss_weights": (tgt > 0).astype(np.int32)}
    if enc:
        batch["encoder_input_tokens"] = r.integers(3, VOCAB, (b, t)).astype(np.int32)
    return batch


def test_schedules_closed_form():
    rs = make_schedule("rsqrt", 1.0, warmup_steps=100)
    assert float(rs(1)) == pytest.approx(0.1) and float(rs(100)) == pytest.approx(0.1)
    assert float(rs(400)) == pytest.approx(0.05)
    lin = make_schedule("linear", 2.0, warmup_steps=10, total_steps=110)
    assert float(lin(5)) == pytest.approx(1.0) and float(lin(60)) == pytest.approx(1.0) and float(lin(110)) == 0.0
    cos = make_schedule("cosine", 1.0, warmup_steps=0, total_steps=100)
    assert float(cos(50)) == pytest.approx(0.5, abs=1e-6)
    with pytest.raises(ValueError, match="unknown schedule 'exp'; valid: rsqrt"):
        make_schedule("exp", 1.0)
    with pytest.raises(ValueError, match="unknown optimizer 'sgd'"):
        make_optimizer("sgd")


def test_adafactor_factors_within_each_expert():
    tx = make_optimizer("adafactor").tx
    e, d, f = 4, 64, 128
    st = tx.init({"w": jnp.zeros((2, e, d, f))})
    fac = [s for s in jax.tree.leaves(st) if getattr(s, "ndim", 0) == 3]
    assert sorted(tuple(x.shape) for x in fac) == [(2, e, d), (2, e, f)]   # per layer and expert


def test_cross_entropy_against_numpy():
    r = np.random.default_rng(0)
    logits = r.normal(size=(2, 3, 7)).astype(np.float32)
    tgt = r.integers(0, 7, (2, 3))
    w = np.array([[1, 1, 0], [1, 0, 0]], np.float32)
    a, zf = 0.1, 1e-3
    ce, z, correct, n = cross_entropy(jnp.asarray(logits), jnp.asarray(tgt), jnp.asarray(w), zf, a)
    lse = np.log(np.exp(logits).sum(-1))
    logp = logits - lse[..., None]
    soft = np.full((2, 3, 7), a / 6)                       # T5X: 1-a on the label, a/(v-1) elsewhere
    np.put_along_axis(soft, tgt[..., None], 1 - a, -1)
    ent = -((1 - a) * np.log(1 - a) + 6 * (a / 6) * np.log(a / 6))
    want = ((-(soft * logp).sum(-1) - ent) * w).sum()
    assert float(ce) == pytest.approx(want, rel=1e-5)
    assert float(z) == pytest.approx((zf * lse**2 * w).sum(), rel=1e-5)
    assert float(n) == 3 and float(correct) == ((logits.argmax(-1) == tgt) * w).sum()


def test_state_born_sharded_and_opt_state_follows(make_test_mesh):
    mesh = make_test_mesh({"data": 2, "expert": 4})
    fns = StepFns(tiny(), make_optimizer("adamw", 1e-3, schedule="constant").tx, mesh)
    state = fns.init()
    wi = state.params["encoder"]["stack"]["blocks"][1]["ffn"]["experts"]["wi"][...]
    assert wi.sharding.spec[1] == "expert" and len(wi.addressable_shards[0].data.shape) == 4
    assert wi.addressable_shards[0].data.shape[1] == 1                      # 4 experts / 4 shards
    mu = state.opt_state[0].mu["encoder"]["stack"]["blocks"][1]["ffn"]["experts"]["wi"][...]
    assert mu.sharding.spec == wi.sharding.spec


@pytest.mark.parametrize("freeze,frozen,trained", [
    (("experts",), ["experts"], ["router", "attn"]),
    (("non_expert",), ["attn", "embed"], ["experts", "router"]),
    (("router",), ["router"], ["experts", "attn"]),
])
def test_freeze_by_role(make_test_mesh, freeze, frozen, trained):
    mesh = make_test_mesh({"data": 8})
    fns = StepFns(tiny(), make_optimizer("adamw", 1e-2, schedule="constant").tx, mesh, freeze=freeze)
    state = fns.init()
    block = lambda p: p["encoder"]["stack"]["blocks"][1]
    pick = {"experts": lambda p: block(p)["ffn"]["experts"]["wi"][...],
            "router": lambda p: block(p)["ffn"]["router"]["kernel"][...],
            "attn": lambda p: block(p)["self_attn"]["q"][...],
            "embed": lambda p: p["embed"]["embedding"][...]}
    before = {k: np.asarray(f(state.params)) for k, f in pick.items()}
    with jax.set_mesh(mesh):
        state, metrics = fns.train_step(state, to_global(fake_batch(), mesh))
    for k in frozen:
        np.testing.assert_array_equal(np.asarray(pick[k](state.params)), before[k], err_msg=k)
    for k in trained:
        assert not np.array_equal(np.asarray(pick[k](state.params)), before[k]), k
    with pytest.raises(ValueError, match=r"unknown parameter roles \['attention'\]"):
        StepFns(tiny(), optax.sgd(1.0), mesh, freeze=("attention",))


def test_microbatches_match_one_batch(make_test_mesh):
    mesh = make_run_mesh({"data": 2})
    batch = fake_batch(b=8)
    out = []
    for m in (1, 2, 4):
        fns = StepFns(tiny("tiny_t5"), optax.sgd(1.0), mesh, microbatches=m,
                      loss=LossConfig(z_loss=0.0))
        state = fns.init()
        p0 = jax.tree.map(np.asarray, state.params)
        with jax.set_mesh(mesh):
            state, met = fns.train_step(state, to_global(batch, mesh))
        out.append((jax.tree.map(lambda a, b: np.asarray(b) - a, p0, state.params), float(met["loss"])))
    for grads, loss in out[1:]:
        # equal-size microbatches with equal token counts: the mean gradient is the full-batch one
        jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, atol=2e-6, rtol=1e-4), out[0][0], grads)
        assert loss == pytest.approx(out[0][1], rel=1e-5)


@pytest.fixture(scope="module")
def trained_dir(tmp_path_factory):
    """Two training steps of tiny_switch on a (2 data x 4 expert) mesh, checkpointed."""
    d = str(tmp_path_factory.mktemp("run"))
    cfg = TrainConfig(mixture_or_task="corpus_span_corruption", batch_size=8, train_steps=2, log_every=1,
                      mesh_shape={"data": 2, "expert": 4}, eval_batches=1, infer_examples=4)
    state = train(d, tiny(), cfg, make_optimizer("adafactor", 0.01, schedule="constant"), progress=False)
    return d, jax.tree.map(np.asarray, state.params)


@pytest.mark.parametrize("shape", [{"data": 8}, {"data": 1}, {"data": 2, "expert": 2, "model": 2}])
def test_restore_onto_other_meshes(trained_dir, shape):
    d, params = trained_dir
    mesh = make_run_mesh(shape)
    fns = StepFns(tiny(), make_optimizer("adafactor", 0.01, schedule="constant").tx, mesh)
    ck = Checkpointer(d)
    assert ck.latest_step() == 2
    state = ck.restore(fns.abstract_state())
    ck.close()
    jax.tree.map(lambda a, b: np.testing.assert_array_equal(np.asarray(b), a), params, state.params)
    wi = state.params["encoder"]["stack"]["blocks"][1]["ffn"]["experts"]["wi"][...]
    assert len(wi.sharding.device_set) == math.prod(shape.values())
    assert int(state.step) == 2


def test_run_dir_contents(trained_dir):
    d, _ = trained_dir
    for f in ("model_config.json", "train_metrics.jsonl", "eval_metrics.jsonl", "checkpoints/2"):
        assert os.path.exists(os.path.join(d, f)), f
    assert any(n.startswith("events.out.tfevents") for n in os.listdir(os.path.join(d, "train")))
    from moejax.training.writers import read_jsonl

    rec = read_jsonl(os.path.join(d, "train_metrics.jsonl"))[-1]       # MFU next to tokens/s
    assert 0 < rec["mfu"] < 1 and rec["model_tflops_per_sec_per_device"] > 0 and rec["tokens_per_sec"] > 0


def test_checkpoint_of_another_model_is_refused_and_kept(trained_dir):
    d, _ = trained_dir
    before = sorted(os.listdir(os.path.join(d, "checkpoints")))
    cfg_bytes = open(os.path.join(d, "model_config.json")).read()
    with pytest.raises(ValueError, match="holds checkpoints of another model"):
        check_model_dir(d, tiny(d_model=32, num_heads=2, moe=MoeConfig(num_experts=4, d_model=32, d_ff=128)))
    assert sorted(os.listdir(os.path.join(d, "checkpoints"))) == before
    assert open(os.path.join(d, "model_config.json")).read() == cfg_bytes


def test_sparse_upcycling_copies_the_dense_ffn(make_test_mesh):
    mesh = make_test_mesh({"data": 2, "expert": 4})
    dense = StepFns(tiny("tiny_t5"), optax.sgd(1.0), mesh).init().params
    moe_fns = StepFns(tiny(), optax.sgd(1.0), mesh)
    fresh = moe_fns.init().params
    up = upcycle_params(dense, fresh, tiny())
    d_ffn = np.asarray(dense["encoder"]["stack"]["blocks"][0]["ffn"]["wi"][...])     # [2 layers, d, f]
    experts = np.asarray(up["encoder"]["stack"]["blocks"][1]["ffn"]["experts"]["wi"][...])  # [1 period, e, d, f]
    for e in range(4):
        np.testing.assert_array_equal(experts[0, e], d_ffn[1])                     # layer 1 is the sparse one
    np.testing.assert_array_equal(np.asarray(up["encoder"]["stack"]["blocks"][0]["ffn"]["wi"][...])[0], d_ffn[0])
    np.testing.assert_array_equal(np.asarray(up["embed"]["embedding"][...]),
                                  np.asarray(dense["embed"]["embedding"][...]))
    np.testing.assert_array_equal(np.asarray(up["encoder"]["stack"]["blocks"][1]["ffn"]["router"]["kernel"][...]),
                                  np.asarray(fresh["encoder"]["stack"]["blocks"][1]["ffn"]["router"]["kernel"][...]))
    assert up["encoder"]["stack"]["blocks"][1]["ffn"]["experts"]["wi"][...].sharding.spec[1] == "expert"
    # at init, top-1 with all experts equal = the dense FFN times the router probability
    with pytest.raises(ValueError, match="params do not line up"):
        upcycle_params(dense, StepFns(tiny(d_model=32, num_heads=2, moe=MoeConfig(num_experts=4, d_model=32, d_ff=128)),
                                      optax.sgd(1.0), mesh).init().params, tiny())


def test_mesh_and_batch_errors(devices):
    with pytest.raises(ValueError, match=r"mesh \{'data': 3\} needs 3 devices, which does not divide the 8"):
        make_run_mesh({"data": 3})
    mesh = make_mesh({"data": 8})
    with pytest.raises(ValueError, match="global batch size 6 is not divisible by the 8 batch shards"):
        to_global(fake_batch(b=6), mesh)


@pytest.mark.parametrize("model,task,lengths", [
    ("tiny_mixtral", "corpus_lm", {"targets": 48}),
    ("tiny_qwen2_moe", "corpus_lm", {"targets": 48}),       # gated shared expert, q/k/v biases
    ("tiny_qwen3_moe", "corpus_lm", {"targets": 48}),       # per-head QK-norm, head_dim 32 on d_model 64
    ("tiny_olmoe", "corpus_lm", {"targets": 48}),           # QK-norm over the whole projection
    ("tiny_deepseek_v3", "corpus_lm", {"targets": 48}),     # MLA, a dense first layer, sigmoid + bias routing
    ("tiny_gpt_oss", "corpus_lm", {"targets": 48}),         # sinks, alternating windows, clamped SwiGLU
    ("tiny_openmoe", "synth_sort", {"inputs": 24, "targets": 16}),      # PrefixLM sequences
])
def test_decoder_only_training_and_eval(tmp_path, model, task, lengths):
    cfg = TrainConfig(mixture_or_task=task, task_feature_lengths=lengths, batch_size=8, train_steps=12, log_every=4,
                      mesh_shape={"data": 2, "expert": 4}, eval_batches=1, infer_examples=4)
    train(str(tmp_path), tiny(model), cfg, make_optimizer("adamw", 3e-3, schedule="constant"), progress=False)
    from moejax.training.writers import read_jsonl
    recs = read_jsonl(str(tmp_path / "train_metrics.jsonl"))
    assert recs[-1]["loss"] < recs[0]["loss"]
    ev = read_jsonl(str(tmp_path / "eval_metrics.jsonl"))[-1]
    assert "eval/loss" in ev
    if task == "synth_sort":
        assert "synth_sort/accuracy" in ev                 # decoded with the KV-cache generate path


def test_bf16_compute_keeps_f32_params(make_test_mesh):
    import jax.numpy as jnp

    mesh = make_test_mesh({"data": 8})
    cfg = tiny()
    cfg = cfg.replace(dtype=jnp.bfloat16, moe=cfg.moe.replace(dtype=jnp.bfloat16))
    fns = StepFns(cfg, make_optimizer("adamw", 1e-3, schedule="constant").tx, mesh)
    state = fns.init()
    with jax.set_mesh(mesh):
        state, met = fns.train_step(state, to_global(fake_batch(), mesh))
    assert all(x.dtype == jnp.float32 for x in jax.tree.leaves(state.params))
    assert np.isfinite(float(met["loss"])) and float(met["loss"]) > 0


def _train_step_collectives(mesh, layer_rules=None):
    """``(all-to-all count, expert-kernel shapes that are all-gathered)`` of the compiled train step
    of a tiny expert-parallel Switch; ``layer_rules`` overrides the MoE layer's activation rules."""
    moe = MoeConfig(num_experts=8, d_model=64, d_ff=128, top_k=1, max_group_size=256, group_multiple=8,
                    axis_rules=layer_rules or DEFAULT_RULES)
    fns = StepFns(tiny(moe=moe), make_optimizer("adamw", 1e-3, schedule="constant").tx, mesh)
    batch = to_global(fake_batch(b=8), mesh)
    with jax.set_mesh(mesh):
        hlo = jax.jit(fns._train_step).lower(fns.abstract_state(), batch, None).compile().as_text()
    gathers = " ".join(line for line in hlo.splitlines() if "all-gather(" in line)
    shapes = ("[1,8,64,128]", "[1,8,128,64]", "[8,64,128]", "[8,128,64]")
    kernels = [shape for shape in shapes if f"f32{shape}" in gathers]
    return hlo.count("all-to-all("), kernels


def test_train_step_hlo_all_to_all_and_no_expert_weight_gather(make_test_mesh):
    """Golden check on a full expert-parallel train step: the compiled program dispatches with
    all-to-alls and never all-gathers an expert kernel. The negative control is the MaxText
    Mixtral regression class: activation rules that keep the dispatched buffers batch-sharded make
    XLA gather the expert kernels instead, and the same check catches it."""
    mesh = make_test_mesh({"data": 2, "expert": 4})
    a2a, gathered = _train_step_collectives(mesh)
    assert a2a >= 4 and gathered == []          # dispatch + combine, forward and backward, per sparse layer
    swapped = tuple((k, {"expert": None, "expert_group": ("data", "expert")}.get(k, v)) for k, v in DEFAULT_RULES)
    a2a_bad, gathered_bad = _train_step_collectives(mesh, swapped)
    assert gathered_bad, (a2a_bad, gathered_bad)          # caught: the expert kernels are all-gathered
