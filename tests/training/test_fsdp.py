"""FSDP (ZeRO-3) through an ``fsdp`` mesh axis: a train step on FSDP meshes (alone and composed
with expert parallelism) equals the single-device step for a decoder and an encoder-decoder, and
the per-device parameter + optimizer bytes, measured on the real arrays, fall by the fsdp size."""

import jax
import numpy as np
import optax
import pytest

from moejax.data.batches import to_global
from moejax.models.registry import get_config
from moejax.sharding import make_mesh
from moejax.training.loss import LossConfig
from moejax.training.state import StepFns

VOCAB = 512


def _batch(encdec, b=8, t=12, s=8):
    r = np.random.default_rng(0)
    tgt = r.integers(3, VOCAB, (b, s)).astype(np.int32)
    tgt[:, -1] = 0
    if not encdec:
        return {"decoder_target_tokens": tgt, "decoder_input_tokens": np.concatenate(
                    [np.zeros((b, 1), np.int32), tgt[:, :-1]], 1), "decoder_loss_weights": (tgt > 0).astype(np.int32)}
    return {"decoder_target_tokens": tgt, "decoder_input_tokens": np.concatenate([np.zeros((b, 1), np.int32),
                                                                                   tgt[:, :-1]], 1),
            "decoder_loss_weights": (tgt > 0).astype(np.int32),
            "encoder_input_tokens": r.integers(3, VOCAB, (b, t)).astype(np.int32)}


def _step(cfg, mesh, tx):
    fns = StepFns(cfg, tx, mesh, loss=LossConfig(z_loss=0.0))
    state = fns.init()
    p0 = jax.tree.map(np.asarray, state.params)          # the step donates its input state
    with jax.set_mesh(mesh):
        new, met = fns.train_step(state, to_global(_batch("num_encoder_layers" in vars(cfg)), mesh))
    return fns, p0, new, met


def _device_bytes(tree) -> int:
    """Bytes of ``tree``'s arrays held by the first device (measured on the shards)."""
    dev = jax.devices()[0]
    return sum(s.data.nbytes for x in jax.tree.leaves(tree) for s in x.addressable_shards if s.device == dev)


@pytest.mark.parametrize("name,shape", [("tiny_mixtral", {"fsdp": 8}),
                                        ("tiny_switch", {"data": 2, "fsdp": 2, "expert": 2}),
                                        ("tiny_qwen2_moe", {"data": 2, "fsdp": 2, "model": 2}),
                                        ("tiny_olmoe", {"fsdp": 2, "expert": 2, "model": 2})],
                         ids=["decoder-fsdp8", "encdec-data2xfsdp2xexpert2", "qwen2moe-data2xfsdp2xmodel2",
                              "olmoe-fsdp2xexpert2xmodel2"])
def test_fsdp_train_step_equals_single_device(name, shape, devices):
    cfg = get_config(name, vocab_size=VOCAB)
    tx = optax.sgd(1.0)                               # the update is minus the gradient
    _, s0, ref, ref_met = _step(cfg, make_mesh({"data": 1}, devices[:1]), tx)
    ref_delta = jax.tree.map(lambda a, b: np.asarray(b) - a, s0, ref.params)
    fns, s0, new, met = _step(cfg, make_mesh(shape, devices), tx)
    # parameters really are sharded over fsdp (their d_model dimension)
    embed = fns.param_shardings["embed"]["embedding"]
    assert "fsdp" in str(getattr(embed, "value", embed).spec), (shape, embed)
    np.testing.assert_allclose(float(met["loss"]), float(ref_met["loss"]), rtol=1e-5, err_msg=str(shape))
    delta = jax.tree.map(lambda a, b: np.asarray(b) - a, s0, new.params)
    for a, b in zip(jax.tree.leaves(delta), jax.tree.leaves(ref_delta), strict=True):
        assert np.max(np.abs(a - b)) <= 1e-4 * max(np.max(np.abs(b)), 1e-6), (shape, np.max(np.abs(a - b)))

def test_fsdp_divides_per_device_param_and_optimizer_bytes(devices):
    cfg = get_config("tiny_mixtral", vocab_size=VOCAB)
    tx = optax.adamw(1e-3)
    sizes = {}
    for shape in ({"data": 8}, {"fsdp": 8}, {"fsdp": 2, "expert": 4}, {"data": 2, "expert": 4}):
        fns = StepFns(cfg, tx, make_mesh(shape, devices))
        state = fns.init()
        sizes[tuple(shape.items())] = _device_bytes(state.params) + _device_bytes(state.opt_state)
    data8, fsdp8 = sizes[(("data", 8),)], sizes[(("fsdp", 8),)]
    # every parameter of tiny_mixtral has a d_model (embed) dimension except the norms' scales
    assert fsdp8 <= data8 / 8 * 1.05, sizes
    # composed with expert parallelism: the non-expert half of each device's bytes halves again
    assert sizes[(("fsdp", 2), ("expert", 4))] <= sizes[(("data", 2), ("expert", 4))] / 2 * 1.05, sizes


def test_fsdp_gin_mesh_files_parse():
    import os

    from moejax.entry import shipped_gin_dir

    for name in ("fsdp8.gin", "fsdp2_expert4.gin"):
        text = open(os.path.join(shipped_gin_dir(), "mesh", name)).read()
        assert "fsdp" in text and "MESH_SHAPE" in text
