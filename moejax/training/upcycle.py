"""Sparse upcycling (Komatsuzaki et al. 2022): start an MoE model from a dense checkpoint.

Every parameter the two models share is copied; each sparse block's experts all start as copies
of that layer's dense FFN (``[l, d, f] -> [l, e, d, f]``); routers keep their fresh initialisation.
Works for any dense / MoE pair of the same family whose non-FFN shapes agree (e.g. ``t5_base`` ->
``switch_base_8``, ``tiny_t5`` -> ``tiny_switch``, ``llama`` -> ``mixtral``-shaped configs): the
dense stack is scanned one layer per period, the MoE stack ``period`` layers per period, and layer
``i = p * period + j`` of the dense model feeds block ``j`` of period ``p``. The trainer loads the
dense model with :func:`moejax.load` (``TrainConfig.upcycle``).
"""

from __future__ import annotations

import jax
import numpy as np

from moejax.tree import flatten, path_key


def upcycle_params(dense_params, moe_params, moe_cfg) -> dict:
    """``dense_params`` (an ``nnx.State`` of a dense model) -> a copy of ``moe_params`` (the MoE
    model's fresh params, any shardings) with every transferable value replaced. Raises
    ValueError naming the params whose shapes or names do not line up."""
    dense = flatten(dense_params)
    moe_keys = list(flatten(moe_params))
    leaves, treedef = jax.tree_util.tree_flatten_with_path(moe_params)
    out, problems, copied = [], [], 0
    for path, fresh in leaves:
        key = path_key(path)
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
