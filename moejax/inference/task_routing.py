"""Task-level routing: extract the sub-network one task uses into a standalone, smaller model.

A model whose MoE layers use ``MoeConfig(router='task')`` sends every token of a task-``i``
example to the top-k experts of row ``i`` of each layer's learned task table. The experts a task
uses are therefore known without running it; :func:`extract_task_model` keeps only those (``k``
per layer instead of ``E``) with a one-row table, so the extracted model computes exactly what the
full model computes for that task (same experts, same renormalised gates, dropless), and is
called without task ids.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from moejax.inference.merging import copy_non_moe_params, moe_layer_paths
from moejax.models.build import build_model
from moejax.tree import get_path


def experts_of_task(model: nnx.Module, task_id: int) -> dict:
    """``{layer path: [l, k] expert indices}`` the task is routed to, in gate order."""
    moe = model.cfg.moe
    out = {}
    params = nnx.to_pure_dict(nnx.state(model, nnx.Param))
    for path in moe_layer_paths(model):
        table = jnp.asarray(get_path(params, path)["router"]["table"])            # [l, tasks, e]
        out[path] = np.asarray(jax.lax.top_k(table[:, task_id], moe.top_k)[1])
    return out


def extract_task_model(model: nnx.Module, task_id: int) -> nnx.Module:
    """The standalone model serving task ``task_id`` (see the module docstring)."""
    cfg = model.cfg
    moe = cfg.moe
    if moe is None or not moe.uses_task_ids:
        raise ValueError("extracting a task's sub-network needs a model with MoeConfig(router='task')")
    if not 0 <= int(task_id) < moe.num_tasks:
        raise ValueError(f"task {task_id} is unknown to the router, which knows tasks 0..{moe.num_tasks - 1}")
    if moe.expert_map is not None or moe.quant_bits is not None:
        raise ValueError("extract from the original model (before merging or quantization)")
    k = moe.top_k
    new_model = build_model(cfg.replace(moe=moe.replace(num_experts=k, num_tasks=1)), nnx.Rngs(0))
    old = nnx.to_pure_dict(nnx.state(model, nnx.Param))
    new = nnx.to_pure_dict(nnx.state(new_model, nnx.Param))
    chosen = experts_of_task(model, task_id)
    paths = moe_layer_paths(model)
    for path in paths:
        src, dst = get_path(old, path), get_path(new, path)
        sel = chosen[path]                                                      # [l, k]
        def take(a, sel=sel):
            return np.take_along_axis(np.asarray(a), sel.reshape(sel.shape + (1,) * (np.ndim(a) - 2)), axis=1)

        dst["experts"] = {n: jnp.asarray(take(v)) for n, v in src["experts"].items()}
        table = np.asarray(src["router"]["table"])[:, task_id]                 # [l, e]
        dst["router"] = {"table": jnp.asarray(np.take_along_axis(table, sel, axis=1)[:, None, :])}
        for extra in ("shared",):
            if extra in src:
                dst[extra] = src[extra]
    state = nnx.state(new_model, nnx.Param)
    nnx.replace_by_pure_dict(state, copy_non_moe_params(old, new, paths))
    nnx.update(new_model, state)
    return new_model
