"""Streaming, sharded, bf16 import and export: the memory-mapped reader, ``from_hf(mesh=...)`` onto
the (2 data x 4 expert) mesh against the in-memory import, shardings as the rules say, the
checkpoint's dtype kept, sharded safetensors export with an index file that transformers loads."""

import json
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")

from moejax.convert import from_hf  # noqa: E402
from moejax.convert.hf_mixtral import config_from_hf, hf_to_state, to_hf  # noqa: E402
from moejax.convert.mapping import load_into  # noqa: E402
from moejax.convert.safetensors_io import INDEX_FILE, LazyWeights, ShardedWriter, load_hf_dir  # noqa: E402
from moejax.models import Decoder  # noqa: E402
from moejax.sharding import state_shardings  # noqa: E402

IDS = np.random.default_rng(0).integers(0, 96, (2, 12))


def tiny_mixtral_dir(path, dtype=torch.float32, shard="30KB"):
    cfg = transformers.MixtralConfig(vocab_size=96, hidden_size=32, intermediate_size=48, num_hidden_layers=2,
                                     num_attention_heads=4, num_key_value_heads=2, num_local_experts=4,
                                     num_experts_per_tok=2, max_position_embeddings=64, attn_implementation="eager")
    torch.manual_seed(0)
    model = transformers.MixtralForCausalLM(cfg).eval()
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "norm" in name:
                p.add_(0.1 * torch.randn_like(p))
    model.to(dtype).save_pretrained(path, safe_serialization=True, max_shard_size=shard)
    return model


def in_memory(path, **overrides):
    """The pre-streaming import: every weight read whole into a dict, a concrete model filled."""
    hf, weights = load_hf_dir(path)
    cfg = config_from_hf(hf, **overrides)
    return load_into(Decoder(cfg, rngs=nnx.Rngs(0)), hf_to_state(cfg, weights)), cfg


def test_lazy_reader_matches_safetensors(tmp_path):
    from safetensors.torch import load_file

    tiny_mixtral_dir(tmp_path, torch.bfloat16)
    assert os.path.exists(tmp_path / INDEX_FILE)                 # several shards
    lazy = LazyWeights(str(tmp_path))
    ref = {}
    for f in sorted(set(json.loads((tmp_path / INDEX_FILE).read_text())["weight_map"].values())):
        ref.update(load_file(str(tmp_path / f)))
    assert set(lazy) == set(ref) and len(lazy) == len(ref)
    for name, t in ref.items():
        got = lazy[name]
        assert isinstance(got, np.memmap) and str(got.dtype) == "bfloat16" and lazy.shape(name) == tuple(t.shape)
        np.testing.assert_array_equal(np.asarray(got, np.float32), t.float().numpy())


def test_streamed_sharded_import_equals_in_memory(tmp_path, make_test_mesh):
    tiny_mixtral_dir(tmp_path)
    mesh = make_test_mesh({"data": 2, "expert": 4})
    model, cfg = from_hf(str(tmp_path), mesh=mesh)
    ref, ref_cfg = in_memory(str(tmp_path))
    assert cfg == ref_cfg
    params, ref_params = nnx.state(model, nnx.Param), nnx.state(ref, nnx.Param)
    want = jax.tree.leaves(state_shardings(params, mesh), is_leaf=lambda x: isinstance(x, jax.sharding.Sharding))
    got = jax.tree.leaves(params)
    assert len(got) == len(want) > 10
    expert_sharded = 0
    for a, b, s in zip(got, jax.tree.leaves(ref_params), want, strict=True):
        assert a.sharding.is_equivalent_to(s, a.ndim), (a.sharding, s)
        expert_sharded += "expert" in str(s.spec)
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
    assert expert_sharded == 3                                     # wi_0, wi_1, wo of the stacked experts
    with jax.set_mesh(mesh):
        logits = model(jnp.asarray(IDS))[0]
    np.testing.assert_allclose(np.asarray(logits), np.asarray(ref(jnp.asarray(IDS))[0]), atol=1e-5, rtol=1e-5)


def test_checkpoint_dtype_is_kept_unless_asked(tmp_path):
    hf = tiny_mixtral_dir(tmp_path, torch.bfloat16)
    model, cfg = from_hf(str(tmp_path))
    assert jnp.dtype(cfg.param_dtype) == jnp.bfloat16 and jnp.dtype(cfg.moe.param_dtype) == jnp.bfloat16
    assert {str(x.dtype) for x in jax.tree.leaves(nnx.state(model, nnx.Param))} == {"bfloat16"}
    up, cfg32 = from_hf(str(tmp_path), dtype=jnp.float32)
    assert jnp.dtype(cfg32.param_dtype) == jnp.float32
    for a, b in zip(jax.tree.leaves(nnx.state(up, nnx.Param)), jax.tree.leaves(nnx.state(model, nnx.Param)),
                    strict=True):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b, np.float32))
    # the f32-upcast bf16 weights give HF's f32 logits of the same (rounded) weights
    with torch.no_grad():
        ref = hf.float()(input_ids=torch.tensor(IDS)).logits.numpy()
    np.testing.assert_allclose(np.asarray(up(jnp.asarray(IDS))[0]), ref, atol=1e-4, rtol=1e-4)


def test_sharded_export_with_index_loads_in_transformers(tmp_path, make_test_mesh):
    hf = tiny_mixtral_dir(tmp_path / "hf")
    model, _ = from_hf(str(tmp_path / "hf"), mesh=make_test_mesh({"data": 2, "expert": 4}))
    to_hf(model, str(tmp_path / "out"), max_shard_bytes=40_000)
    index = json.loads((tmp_path / "out" / INDEX_FILE).read_text())
    assert len(set(index["weight_map"].values())) > 2
    back = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "out", attn_implementation="eager").eval()
    with torch.no_grad():
        np.testing.assert_allclose(back(input_ids=torch.tensor(IDS)).logits.numpy(),
                                   hf(input_ids=torch.tensor(IDS)).logits.numpy(), atol=1e-6, rtol=1e-6)
    to_hf(model, str(tmp_path / "bf16"), dtype=jnp.bfloat16)
    assert json.loads((tmp_path / "bf16" / "config.json").read_text())["dtype"] == "bfloat16"
    assert {str(LazyWeights(str(tmp_path / "bf16")).dtype(n)) for n in LazyWeights(str(tmp_path / "bf16"))} == \
        {"bfloat16"}


def test_convert_cli_onto_a_mesh_in_bf16(tmp_path):
    from moejax import checkpoint
    from moejax.main import main

    hf = tiny_mixtral_dir(tmp_path / "hf")
    assert main(["convert", "--hf_dir", str(tmp_path / "hf"), "--out", str(tmp_path / "ck"),
                 "--mesh", "data=2,expert=4", "--dtype", "bfloat16"]) == 0
    model = checkpoint.load(str(tmp_path / "ck"))
    assert jnp.dtype(model.cfg.param_dtype) == jnp.bfloat16
    with torch.no_grad():
        ref = hf(input_ids=torch.tensor(IDS)).logits.numpy()
    np.testing.assert_allclose(np.asarray(model(jnp.asarray(IDS))[0]), ref, atol=0.1)   # bf16 weights
    assert main(["convert", "--hf_dir", str(tmp_path / "hf"), "--out", str(tmp_path / "x"), "--dtype", "int8"]) == 2


def test_writer_refuses_out_of_plan_tensors(tmp_path):
    w = ShardedWriter(str(tmp_path), [("a", (2,), np.dtype(np.float32)), ("b", (3,), np.dtype(np.float32))])
    with pytest.raises(ValueError, match="expected tensor 'a' next, got 'b'"):
        w.write("b", np.zeros(3, np.float32))
    with pytest.raises(ValueError, match=r"a: got float64\[2\], planned float32\[2\]"):
        w.write("a", np.zeros(2))
    w.write("a", np.zeros(2, np.float32))
    with pytest.raises(ValueError, match="after 1 of 2 planned tensors"):
        w.close()


def test_truncated_file_is_refused(tmp_path):
    tiny_mixtral_dir(tmp_path, shard="10GB")
    raw = (tmp_path / "model.safetensors").read_bytes()
    (tmp_path / "model.safetensors").write_bytes(raw[:-100])
    with pytest.raises(ValueError, match="is truncated or corrupt: tensor"):
        from_hf(str(tmp_path))
    (tmp_path / "model.safetensors").write_bytes(raw[:4])
    with pytest.raises(ValueError, match="is not a safetensors file"):
        from_hf(str(tmp_path))


def test_writer_round_trips_scalars_empty_and_int_tensors_through_safetensors(tmp_path):
    from safetensors.numpy import load_file

    plan = [("s", (), np.dtype(np.float32)), ("e", (0, 3), np.dtype(np.float16)), ("v", (3,), np.dtype(np.int64))]
    w = ShardedWriter(str(tmp_path), plan)
    w.write("s", np.float32(2.5))
    w.write("e", np.zeros((0, 3), np.float16))
    w.write("v", np.arange(3))
    w.close()
    ref, lazy = load_file(str(tmp_path / "model.safetensors")), LazyWeights(str(tmp_path))
    for name in ("s", "e", "v"):
        assert lazy.shape(name) == ref[name].shape and lazy.dtype(name) == ref[name].dtype
        np.testing.assert_array_equal(np.asarray(lazy[name]), ref[name])
