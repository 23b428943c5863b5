"""Orbax checkpoints of converted / built models: save, restore (also onto a mesh), wrong model."""

import jax
import numpy as np
import pytest
from flax import nnx

from moejax.convert import checkpoint
from moejax.models.params import build_model
from moejax.models.registry import get_config
from moejax.sharding import make_mesh


@pytest.mark.parametrize("name", ["tiny_mixtral", "tiny_switch"])
def test_roundtrip(tmp_path, name, devices):
    cfg = get_config(name)
    model = build_model(cfg, nnx.Rngs(3))
    checkpoint.save(model, str(tmp_path / "ckpt"))
    back = checkpoint.restore(str(tmp_path / "ckpt"), expect=cfg)
    assert back.cfg == cfg
    a = jax.tree.leaves(nnx.state(model, nnx.Param))
    b = jax.tree.leaves(nnx.state(back, nnx.Param))
    for x, y in zip(a, b):
        np.testing.assert_array_equal(x, y)
    mesh = make_mesh({"data": 2, "expert": 2, "model": 2}, devices)
    sharded = checkpoint.restore(str(tmp_path / "ckpt"), mesh=mesh)
    leaf = jax.tree.leaves(nnx.state(sharded, nnx.Param))[0]
    assert isinstance(leaf.sharding, jax.sharding.NamedSharding)


def test_wrong_model_and_existing(tmp_path):
    model = build_model(get_config("tiny_llama"), nnx.Rngs(0))
    checkpoint.save(model, str(tmp_path / "c"))
    with pytest.raises(ValueError, match="already exists"):
        checkpoint.save(model, str(tmp_path / "c"))
    with pytest.raises(ValueError, match="not the expected"):
        checkpoint.restore(str(tmp_path / "c"), expect=get_config("tiny_mixtral"))
    with pytest.raises(ValueError, match="not a moejax checkpoint"):
        checkpoint.restore(str(tmp_path))
