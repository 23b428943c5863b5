"""Sparse upcycling (Komatsuzaki et al. 2022): start an MoE model from a dense checkpoint.

Every parameter the two models share is copied; each sparse block's experts all start as copies
of that layer's dense FFN (``[l, d, f] -> [l, e, d, f]``); routers keep their fresh initialisation.
Works for any dense / MoE pair of the same family whose non-FFN shapes agree (e.g. ``t5_base`` ->
``switch_base_8``, ``tiny_t5`` -> ``tiny_switch``, ``llama`` -> ``mixtral``-shaped configs): the
dense stack is scanned one layer per period, the MoE stack ``period`` layers per period, and layer
``i = p * period + j`` of the dense model feeds block ``j`` of period ``p``.
"""

from __future__ import annotations

import jax
import numpy as np
from flax import nnx

from moejax.models.params import build_model


def _key(path) -> tuple:
    return tuple(str(getattr(k, "key", getattr(k, "idx", getattr(k, "name", k)))) for k in path)


def _flat(tree) -> dict:
    return {_key(p): v for p, v in jax.tree_util.tree_flatten_with_path(tree)[0]}


def upcycle_params(dense_params, moe_params, moe_cfg) -> dict:
    """``dense_params`` (an ``nnx.State`` of a dense model) -> a copy of ``moe_params`` (the MoE
    model's fresh params, any shardings) with every transferable value replaced. Raises
    ValueError naming the params whose shapes or names do not line up."""
    dense = _flat(dense_params)
    moe_keys = list(_flat(moe_params))
    leaves, treedef = jax.tree_util.tree_flatten_with_path(moe_params)
    out, problems, copied = [], [], 0
    for path, fresh in leaves:
        key = _key(path)
        value = None
        if "blocks" in key:
            i = key.index("blocks")
            j, rest = int(key[i + 1]), key[i + 2:]
            period = 1 + max(int(k[i + 1]) for k in moe_keys if k[:i + 1] == key[:i + 1])
            if rest[:2] == ("ffn", "router"):
                out.append(fresh)
                continue
            if rest[:2] == ("ffn", "experts"):
                src = key[:i + 1] + ("0", "ffn") + rest[2:]
                if src in dense:
                    layers = np.asarray(dense[src])[j::period]
                    value = np.broadcast_to(layers[:, None], fresh.shape[:1] + (fresh.shape[1],) + layers.shape[1:])
            else:
                src = key[:i + 1] + ("0",) + rest
                if src in dense:
                    value = np.asarray(dense[src])[j::period]
        elif key in dense:
            value = np.asarray(dense[key])
        if value is None or tuple(value.shape) != tuple(fresh.shape):
            problems.append(f"{'/'.join(key)} {tuple(fresh.shape)} <- "
                            f"{'missing' if value is None else tuple(value.shape)}")
            out.append(fresh)
            continue
        copied += 1
        out.append(jax.device_put(value.astype(fresh.dtype), getattr(fresh, "sharding", None)))
    if problems:
        raise ValueError("cannot upcycle the dense checkpoint into "
                         f"{type(moe_cfg).__name__}: {len(problems)} params do not line up: {problems[:6]}")
    return jax.tree_util.tree_unflatten(treedef, out)


def load_dense_params(path: str):
    """The params of the dense model saved in trainer ``MODEL_DIR`` ``path`` (host arrays)."""
    import json
    import os

    from moejax.convert.checkpoint import config_from_json
    from moejax.training.checkpoints import restore_params

    cfg_file = os.path.join(path, "model_config.json")
    if not os.path.exists(cfg_file):
        raise ValueError(f"{path!r} is not a moejax MODEL_DIR (no model_config.json) to upcycle from")
    with open(cfg_file) as f:
        dense_cfg = config_from_json(json.load(f))
    if dense_cfg.moe is not None:
        raise ValueError(f"{path!r} holds an MoE model; sparse upcycling starts from a dense one")
    abstract = nnx.eval_shape(lambda: build_model(dense_cfg, nnx.Rngs(0)))
    params = nnx.state(abstract, nnx.Param)
    target = jax.tree.map(lambda a: jax.ShapeDtypeStruct(a.shape, a.dtype,
                                                         sharding=jax.sharding.SingleDeviceSharding(jax.devices()[0])),
                          params)
    return restore_params(path, target, dense_cfg), dense_cfg
