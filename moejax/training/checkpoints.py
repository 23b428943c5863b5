"""Train-state checkpoints with orbax ``CheckpointManager``: periodic saves, keep N, resume from
the latest, restore onto any mesh, params-only init for finetuning, sparse upcycling.

Layout of ``MODEL_DIR``: ``model_config.json`` (which model the checkpoints belong to),
``checkpoints/<step>/{params,opt_state,step}`` (orbax composite items, each a flat
``{path: array}`` dict, written to a temporary directory and renamed, so a killed run never leaves
a corrupt checkpoint behind; finetuning reads the ``params`` item alone).
"""

from __future__ import annotations

import json
import os

import jax
import numpy as np
import orbax.checkpoint as ocp
from flax import nnx

from moejax.convert.checkpoint import config_from_json, config_to_json


def _key(path) -> str:
    return "/".join(str(getattr(k, "key", getattr(k, "idx", getattr(k, "name", k)))) for k in path)


def _flatten(tree) -> dict:
    """``{'params/decoder/final_norm/scale/value': leaf, ...}``: a plain dict orbax stores as is."""
    leaves, _ = jax.tree_util.tree_flatten_with_path(tree)
    return {_key(p): v for p, v in leaves}


def _unflatten(like, flat: dict):
    leaves, treedef = jax.tree_util.tree_flatten_with_path(like)
    return jax.tree_util.tree_unflatten(treedef, [flat[_key(p)] for p, _ in leaves])


def check_model_dir(model_dir: str, model_cfg) -> None:
    """Record ``model_cfg`` in ``model_dir``; refuse a directory holding another model's checkpoints.
    In a multi-process run process 0 writes the record and the others wait for it."""
    from moejax.distributed import barrier, is_primary

    os.makedirs(model_dir, exist_ok=True)
    path = os.path.join(model_dir, "model_config.json")
    if os.path.exists(path):          # (or just written by process 0 of this run: then it is equal)
        with open(path) as f:
            saved = config_from_json(json.load(f))
        if saved != model_cfg:
            raise ValueError(f"MODEL_DIR {model_dir!r} holds checkpoints of another model ({type(saved).__name__} "
                             f"d_model={getattr(saved, 'd_model', '?')}, vocab={getattr(saved, 'vocab_size', '?')}); "
                             "use a new MODEL_DIR, or INITIAL_CHECKPOINT_PATH to start from it")
    elif is_primary():
        tmp = path + ".tmp"
        with open(tmp, "w") as f:
            json.dump(config_to_json(model_cfg), f, indent=2)
        os.replace(tmp, path)
    barrier("moejax_check_model_dir")             # every process, whichever branch it took


class Checkpointer:
    """Saves / restores :class:`moejax.training.state.TrainState` under ``<model_dir>/checkpoints``."""

    def __init__(self, model_dir: str, keep: int = 3):
        self.directory = os.path.join(os.path.abspath(model_dir), "checkpoints")
        self.manager = ocp.CheckpointManager(
            self.directory, options=ocp.CheckpointManagerOptions(max_to_keep=keep, create=True))

    def latest_step(self) -> int | None:
        return self.manager.latest_step()

    def all_steps(self) -> list[int]:
        return sorted(self.manager.all_steps() or [])

    def save(self, state, force: bool = True) -> None:
        step = int(state.step)
        if step in (self.manager.all_steps() or []):
            return
        items = {k: ocp.args.StandardSave(_flatten(getattr(state, k))) for k in ("params", "opt_state")}
        items["step"] = ocp.args.StandardSave({"step": state.step})
        self.manager.save(step, args=ocp.args.Composite(**items), force=force)

    def wait(self) -> None:
        self.manager.wait_until_finished()

    def restore(self, abstract_state, step: int | None = None):
        """Read ``step`` (default latest) into the shardings of ``abstract_state``."""
        step = self.latest_step() if step is None else step
        items = {k: ocp.args.StandardRestore(_flatten(getattr(abstract_state, k))) for k in ("params", "opt_state")}
        items["step"] = ocp.args.StandardRestore({"step": abstract_state.step})
        got = self.manager.restore(step, args=ocp.args.Composite(**items))
        return type(abstract_state)(params=_unflatten(abstract_state.params, got["params"]),
                                    opt_state=_unflatten(abstract_state.opt_state, got["opt_state"]),
                                    step=got["step"]["step"])

    def restore_params(self, abstract_params, step: int | None = None):
        """Only the ``params`` item (finetuning, eval)."""
        step = self.latest_step() if step is None else step
        got = self.manager.restore(step, args=ocp.args.Composite(
            params=ocp.args.StandardRestore(_flatten(abstract_params))))
        return _unflatten(abstract_params, got["params"])

    def close(self) -> None:
        self.manager.wait_until_finished()
        self.manager.close()


def restore_params(path: str, abstract_params, model_cfg=None):
    """Params (only) for finetuning from ``path``: a trainer ``MODEL_DIR`` (its latest checkpoint)
    or a :func:`moejax.convert.checkpoint.save` directory. Raises on a checkpoint of another model."""
    path = os.path.abspath(path)
    cfg_file = os.path.join(path, "model_config.json")
    if os.path.exists(cfg_file):
        with open(cfg_file) as f:
            saved = config_from_json(json.load(f))
        if model_cfg is not None and _arch(saved) != _arch(model_cfg):
            raise ValueError(f"INITIAL_CHECKPOINT_PATH {path!r} holds another model ({_arch(saved)}), "
                             f"not {_arch(model_cfg)}")
        ckpt = Checkpointer(path)
        if ckpt.latest_step() is None:
            raise ValueError(f"INITIAL_CHECKPOINT_PATH {path!r} has no checkpoints")
        try:
            return ckpt.restore_params(abstract_params)
        except (ValueError, KeyError) as e:
            raise ValueError(f"INITIAL_CHECKPOINT_PATH {path!r} does not hold this model's params: {e}") from None
        finally:
            ckpt.close()
    if os.path.exists(os.path.join(path, "config.json")):
        from moejax.convert.checkpoint import restore as restore_model

        model = restore_model(path, expect=type(model_cfg) if model_cfg is not None else None)
        if model_cfg is not None and _arch(model.cfg) != _arch(model_cfg):
            raise ValueError(f"INITIAL_CHECKPOINT_PATH {path!r} holds another model ({_arch(model.cfg)})")
        params = nnx.state(model, nnx.Param)
        return jax.tree.map(lambda a, t: jax.device_put(np.asarray(a), t.sharding), params, abstract_params)
    raise ValueError(f"INITIAL_CHECKPOINT_PATH {path!r} is neither a moejax MODEL_DIR nor a model checkpoint")


def _arch(cfg) -> tuple:
    """What must match for params to load: class and every shape-determining field."""
    keys = ("vocab_size", "d_model", "num_layers", "num_encoder_layers", "num_decoder_layers", "num_heads",
            "head_dim", "d_ff")
    return (type(cfg).__name__,) + tuple(getattr(cfg, k, None) for k in keys)


def load_model(path: str):
    """The model stored at ``path`` (a trainer ``MODEL_DIR``'s latest checkpoint, or a
    :func:`moejax.convert.checkpoint.save` directory), unsharded, for inference tools."""
    from moejax.models.params import build_model

    path = os.path.abspath(path)
    cfg_file = os.path.join(path, "model_config.json")
    if os.path.exists(cfg_file):
        with open(cfg_file) as f:
            cfg = config_from_json(json.load(f))
        abstract = nnx.eval_shape(lambda: build_model(cfg, nnx.Rngs(0)))
        dev = jax.sharding.SingleDeviceSharding(jax.devices()[0])
        target = jax.tree.map(lambda a: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=dev),
                              nnx.state(abstract, nnx.Param))
        params = restore_params(path, target, cfg)
        model = build_model(cfg, nnx.Rngs(0))
        nnx.update(model, params)
        return model
    if os.path.exists(os.path.join(path, "config.json")):
        from moejax.convert.checkpoint import restore as restore_model

        return restore_model(path)
    raise ValueError(f"{path!r} is neither a moejax MODEL_DIR nor a model checkpoint")
