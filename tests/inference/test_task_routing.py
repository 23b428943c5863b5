"""Task-level routing: routing by task id, training on the multi-task mixture, and extraction of
a task's sub-network into a standalone model with identical outputs."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from moejax.inference.merging import param_counts
from moejax.inference.task_routing import experts_of_task, extract_task_model
from moejax.models import build_model
from moejax.models.registry import get_config

ENC = jax.random.randint(jax.random.key(1), (3, 10), 2, 256)
DEC = jax.random.randint(jax.random.key(2), (3, 6), 2, 256)


def task_model(seed=0, top_k=1):
    cfg = get_config("tiny_switch_task")
    m = build_model(cfg.replace(moe=cfg.moe.replace(top_k=top_k)), nnx.Rngs(seed))
    from moejax.moe.routing import TaskRouter

    for _, node in nnx.iter_graph(m):                  # decisive, distinct task tables
        if isinstance(node, TaskRouter):
            node.table[...] = jax.random.normal(jax.random.key(7), node.table[...].shape) * 3
    return m


def test_every_token_of_a_task_goes_to_the_same_experts():
    m = task_model()
    _, aux = m(ENC, DEC, task_ids=jnp.array([0, 0, 0]))
    load = np.asarray(aux.encoder.expert_load)[0]            # [e]: top-1, one expert takes everything
    assert np.isclose(load.max(), 1.0)
    chosen = experts_of_task(m, 0)
    enc_path = [p for p in chosen if p[0] == "encoder"][0]
    assert int(np.argmax(load)) == int(chosen[enc_path][0, 0])
    with pytest.raises(ValueError, match="needs task_ids"):
        m(ENC, DEC)


@pytest.mark.parametrize("top_k", [1, 2])
def test_extracted_model_equals_full_model_on_its_task(top_k):
    m = task_model(top_k=top_k)
    for task in (0, 3, 5):
        small = extract_task_model(m, task)
        full = m(ENC, DEC, task_ids=jnp.full((3,), task))[0]
        np.testing.assert_allclose(small(ENC, DEC)[0], full, atol=1e-5)
        assert small.cfg.moe.num_experts == top_k
    assert param_counts(small)[0] < param_counts(m)[0]


def test_extract_errors():
    with pytest.raises(ValueError, match=r"task 6 is unknown to the router, which knows tasks 0..5"):
        extract_task_model(task_model(), 6)
    with pytest.raises(ValueError, match="router='task'"):
        extract_task_model(build_model(get_config("tiny_switch"), nnx.Rngs(0)), 0)
    with pytest.raises(ValueError, match="num_tasks >= 1"):
        get_config("tiny_switch_task").moe.replace(num_tasks=0).validate()


def test_train_task_routed_model_on_the_multitask_mixture(tmp_path):
    from moejax.data.batches import task_names
    from moejax.training.optim import make_optimizer
    from moejax.training.trainer import TrainConfig, train
    from moejax.training.writers import read_jsonl

    assert task_names("synth_multitask") == sorted(f"synth_{t}" for t in
                                                  ("add", "classify", "copy", "reverse", "sort", "translate"))
    cfg = TrainConfig(mixture_or_task="synth_multitask", batch_size=16, train_steps=30, log_every=10,
                      mesh_shape={"data": 2, "expert": 4}, eval_batches=1, infer_examples=4)
    train(str(tmp_path), get_config("tiny_switch_task", vocab_size=512), cfg,
          make_optimizer("adafactor", 0.05, schedule="constant"), progress=False)
    recs = read_jsonl(str(tmp_path / "train_metrics.jsonl"))
    assert recs[-1]["loss"] < recs[0]["loss"]
    ev = read_jsonl(str(tmp_path / "eval_metrics.jsonl"))[-1]
    assert "synth_sort/accuracy" in ev and "synth_translate/bleu" in ev


def test_extract_task_cli(tmp_path, capsys):
    from moejax.checkpoint import load as restore
    from moejax.checkpoint import save
    from moejax.main import main

    save(task_model(), str(tmp_path / "full"))
    assert main(["extract-task", "--checkpoint", str(tmp_path / "full"), "--task", "synth_sort",
                 "--out", str(tmp_path / "sort")]) == 0
    small = restore(str(tmp_path / "sort"))
    np.testing.assert_allclose(small(ENC, DEC)[0], task_model()(ENC, DEC, task_ids=jnp.full((3,), 4))[0], atol=1e-5)
    assert main(["extract-task", "--checkpoint", str(tmp_path / "full"), "--task", "synth_srot",
                 "--out", str(tmp_path / "x")]) == 2
    assert "is not in mixture 'synth_multitask'" in capsys.readouterr().err
