"""The one checkpoint format and ``moejax.load``: save / load (also onto a mesh), wrong model,
trainer MODEL_DIRs, and directories written before the formats were unified."""

import json
import os
import shutil

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

import moejax
from moejax import checkpoint
from moejax.models import build_model
from moejax.models.registry import get_config
from moejax.sharding import make_mesh

FIXTURES = os.path.join(os.path.dirname(__file__), "fixtures")


def _params(model):
    return jax.tree.leaves(nnx.state(model, nnx.Param))


@pytest.mark.parametrize("name", ["tiny_mixtral", "tiny_switch"])
def test_roundtrip(tmp_path, name, devices):
    cfg = get_config(name)
    model = build_model(cfg, nnx.Rngs(3))
    checkpoint.save(model, str(tmp_path / "ckpt"))
    assert sorted(os.listdir(tmp_path / "ckpt")) == ["checkpoints", "model_config.json"]
    back = moejax.load(str(tmp_path / "ckpt"), expect=cfg)
    assert back.cfg == cfg
    for x, y in zip(_params(model), _params(back), strict=True):
        np.testing.assert_array_equal(x, y)
    mesh = make_mesh({"data": 2, "expert": 2, "model": 2}, devices)
    sharded = moejax.load(str(tmp_path / "ckpt"), mesh=mesh)
    for x, y in zip(_params(model), _params(sharded), strict=True):
        assert isinstance(y.sharding, jax.sharding.NamedSharding)
        np.testing.assert_array_equal(x, np.asarray(y))
    experts = sharded.stack.blocks[0].ffn.experts if name == "tiny_mixtral" else None
    if experts is not None:       # born sharded: experts split over the expert axis
        assert experts.wo[...].sharding.spec[1] == "expert"


def test_a_sharded_model_saves_with_bounded_host_copies(tmp_path, devices):
    """checkpoint.save of a model living on a mesh (replicated and expert-sharded params) writes one
    replica at a time with at most 1 GB copied to the host in flight, and reads back exactly."""
    cfg = get_config("tiny_mixtral")
    model = build_model(cfg, nnx.Rngs(5))
    checkpoint.save(model, str(tmp_path / "a"))
    sharded = moejax.load(str(tmp_path / "a"), mesh=make_mesh({"data": 2, "expert": 4}, devices))
    checkpoint.save(sharded, str(tmp_path / "b"))
    back = moejax.load(str(tmp_path / "b"), expect=cfg)
    for x, y in zip(_params(model), _params(back), strict=True):
        np.testing.assert_array_equal(x, y)
    impl = checkpoint._low_memory_handler()._impl          # the bounds took (not the fallback)
    assert impl._save_device_host_concurrent_bytes == 10**9
    assert impl._type_handler_registry.get(jax.Array)._use_replica_parallel is False


def test_wrong_model_and_existing(tmp_path):
    model = build_model(get_config("tiny_llama"), nnx.Rngs(0))
    checkpoint.save(model, str(tmp_path / "c"))
    with pytest.raises(ValueError, match="already exists"):
        checkpoint.save(model, str(tmp_path / "c"))
    with pytest.raises(ValueError, match="not the expected"):
        moejax.load(str(tmp_path / "c"), expect=get_config("tiny_mixtral"))
    with pytest.raises(ValueError, match="not a moejax checkpoint"):
        moejax.load(str(tmp_path))
    with pytest.raises(ValueError, match="holds another model"):
        abstract = nnx.state(nnx.eval_shape(lambda: build_model(get_config("tiny_mixtral"))), nnx.Param)
        checkpoint.load_params(str(tmp_path / "c"), abstract, expect=get_config("tiny_mixtral"))


def test_hf_directory_is_refused_clearly(tmp_path):
    (tmp_path / "config.json").write_text(json.dumps({"model_type": "mixtral", "hidden_size": 64}))
    with pytest.raises(ValueError, match="not a moejax checkpoint .*moejax convert"):
        moejax.load(str(tmp_path))


def test_unknown_config_field_is_refused(tmp_path):
    model = build_model(get_config("tiny_llama"), nnx.Rngs(0))
    checkpoint.save(model, str(tmp_path / "c"))
    path = tmp_path / "c" / "model_config.json"
    d = json.loads(path.read_text())
    d["mystery_knob"] = 3
    path.write_text(json.dumps(d))
    with pytest.raises(ValueError, match=r"fields this moejax does not know: \['mystery_knob'\]"):
        moejax.load(str(tmp_path / "c"))


def test_legacy_converted_directory_still_loads(tmp_path, devices):
    """A `moejax convert` output written by the code before the formats were unified (config.json +
    an orbax pytree of nnx.to_pure_dict params), kept in tests/fixtures with its logits."""
    src = os.path.join(FIXTURES, "legacy_convert_tiny_mixtral")
    ref = np.load(os.path.join(FIXTURES, "legacy_convert_tiny_mixtral_logits.npz"))
    d = str(tmp_path / "legacy")
    shutil.copytree(src, d)                     # orbax may write metadata next to what it reads
    model = moejax.load(d)
    # saved when "gather" was the default backend and the per-group balance loss the Mixtral default:
    # kept as written (dropless gather = the same numbers)
    assert model.cfg == get_config("tiny_mixtral", num_layers=1, vocab_size=64,
                                   **{"moe.backend": "gather", "moe.balance_loss_scope": "group"})
    logits, _ = model(jnp.asarray(ref["ids"]))
    np.testing.assert_allclose(np.asarray(logits), ref["logits"], rtol=1e-5, atol=1e-5)
    mesh = make_mesh({"data": 2, "expert": 4}, devices)
    sharded = moejax.load(d, mesh)
    with jax.set_mesh(mesh):
        logits2, _ = jax.jit(lambda ids: sharded(ids))(jnp.asarray(ref["ids"]))
    np.testing.assert_allclose(np.asarray(logits2), ref["logits"], rtol=1e-5, atol=1e-5)
    # and it can be re-saved in the one format
    checkpoint.save(model, str(tmp_path / "new"))
    again = moejax.load(str(tmp_path / "new"))
    for x, y in zip(_params(model), _params(again), strict=True):
        np.testing.assert_array_equal(x, y)
