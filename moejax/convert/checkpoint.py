"""Save / restore a model's params as an orbax checkpoint next to its config (JSON).

Layout: ``<dir>/config.json`` (the dataclass config, with its class) and ``<dir>/params``
(an orbax ``StandardCheckpointer`` pytree of plain arrays). Restoring rebuilds the model
abstractly and reads the arrays straight into it, optionally into shardings on a mesh.
"""

from __future__ import annotations

import dataclasses
import json
import os

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from moejax.models.config import DecoderConfig
from moejax.models.encdec import EncDecConfig
from moejax.moe import MoeConfig

_CLASSES = {"DecoderConfig": DecoderConfig, "EncDecConfig": EncDecConfig}


def config_to_json(cfg) -> dict:
    """A JSON-able dict of a model config (dtypes by name, nested MoeConfigs inline)."""

    def enc(v):
        if dataclasses.is_dataclass(v):
            return {"__class__": type(v).__name__, **{f.name: enc(getattr(v, f.name)) for f in dataclasses.fields(v)}}
        if isinstance(v, (tuple, list)):
            return [enc(x) for x in v]
        if isinstance(v, (str, int, float, bool)) or v is None:
            return v
        return {"__dtype__": np.dtype(v).name}

    return enc(cfg)


def config_from_json(d: dict):
    """Inverse of :func:`config_to_json`."""

    def dec(v, field=None):
        if isinstance(v, dict) and "__dtype__" in v:
            return jnp.dtype(v["__dtype__"])
        if isinstance(v, dict) and "__class__" in v:
            cls = {"MoeConfig": MoeConfig, **_CLASSES}.get(v["__class__"])
            if cls is None:
                raise ValueError(f"unknown config class {v['__class__']!r} in checkpoint config")
            return cls(**{k: dec(x, k) for k, x in v.items() if k != "__class__"})
        if isinstance(v, list):
            return tuple(dec(x) for x in v)
        return v

    return dec(d)


def save(model: nnx.Module, path: str) -> None:
    """Write ``model.cfg`` and the params of ``model`` to ``path`` (must not exist yet)."""
    import orbax.checkpoint as ocp

    path = os.path.abspath(path)
    if os.path.exists(os.path.join(path, "params")):
        raise ValueError(f"checkpoint {path!r} already exists; choose a new directory")
    os.makedirs(path, exist_ok=True)
    with open(os.path.join(path, "config.json"), "w") as f:
        json.dump(config_to_json(model.cfg), f, indent=2)
    ckptr = ocp.StandardCheckpointer()
    ckptr.save(os.path.join(path, "params"), nnx.to_pure_dict(nnx.state(model, nnx.Param)))
    ckptr.wait_until_finished()


def restore(path: str, *, mesh: jax.sharding.Mesh | None = None, expect=None) -> nnx.Module:
    """Rebuild the model saved at ``path`` and read its params (sharded on ``mesh`` if given).

    ``expect``: an optional config class or config; a checkpoint of another model is a ValueError.
    """
    import orbax.checkpoint as ocp

    from moejax.models.params import build_model
    from moejax.sharding import state_shardings

    path = os.path.abspath(path)
    cfg_file = os.path.join(path, "config.json")
    if not os.path.exists(cfg_file):
        raise ValueError(f"{path!r} is not a moejax checkpoint (no config.json)")
    with open(cfg_file) as f:
        cfg = config_from_json(json.load(f))
    if expect is not None:
        want = expect if isinstance(expect, type) else type(expect)
        if not isinstance(cfg, want) or (not isinstance(expect, type) and cfg != expect):
            raise ValueError(f"checkpoint {path!r} holds {type(cfg).__name__} {cfg}, not the expected {expect}")
    abstract = nnx.eval_shape(lambda: build_model(cfg, nnx.Rngs(0)))
    graphdef, params, rest = nnx.split(abstract, nnx.Param, ...)
    target = nnx.to_pure_dict(params)
    if mesh is not None:
        shard = nnx.to_pure_dict(state_shardings(params, mesh))
        target = jax.tree.map(lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s), target, shard)
    restored = ocp.StandardCheckpointer().restore(os.path.join(path, "params"), target)
    model = build_model(cfg, nnx.Rngs(0)) if mesh is None else None
    if model is None:
        from moejax.sharding import create_sharded

        model = create_sharded(lambda: build_model(cfg, nnx.Rngs(0)), mesh)
    state = nnx.state(model, nnx.Param)
    nnx.replace_by_pure_dict(state, restored)
    nnx.update(model, state)
    return model
