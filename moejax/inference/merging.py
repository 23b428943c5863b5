"""Expert merging: fewer physical experts (down to 1 = a dense FFN) behind the same router.

``merge_experts(model, num_experts, method)`` returns a new model whose MoE layers hold
``num_experts`` experts. The E experts of each layer are split into ``num_experts`` equal groups;
each group becomes one expert whose weights are the group's average — ``uniform``, or
``frequency``-weighted by how often the router selects each expert on a calibration set. With
``group_by='weights'`` / ``'router'`` the groups are chosen per layer by cosine similarity of the
experts' weights / router columns (greedy balanced clustering) instead of by index; the experts and
router columns are permuted so every layer shares one ``MoeConfig.expert_map``. The router keeps
its E outputs: output ``i`` is served by merged expert ``expert_map[i]`` (its "row is re-mapped"),
so a token's combine weights are unchanged and, when a group's experts are identical, the layer's
output is unchanged. Capacity is recomputed for the merged expert count.
"""

from __future__ import annotations

import jax.numpy as jnp
import numpy as np
from flax import nnx

from moejax.models.build import build_model
from moejax.models.forward import apply
from moejax.moe.layer import MoeLayer
from moejax.tree import get_path

METHODS = ("uniform", "frequency")
GROUPINGS = ("index", "weights", "router")


def moe_layer_paths(model: nnx.Module) -> list[tuple]:
    """Graph paths of the model's MoE layers (each holds params stacked over ``[l]`` periods)."""
    return [tuple(p) for p, node in nnx.iter_graph(model) if isinstance(node, MoeLayer)]


def _stats_for(aux, path):
    """The MoeStats of the MoE layer at ``path`` in a model's aux output (one MoE stack per model
    part: the decoder-only stack, or the encoder / decoder of an encoder-decoder)."""
    stacks = aux.moe_stats()
    if len(stacks) == 1:
        return stacks[0]
    return aux.encoder if path[0] == "encoder" else aux.decoder


def expert_usage(model: nnx.Module, batches) -> dict:
    """Selection frequency of every router output on calibration ``batches`` (dicts of seqio
    features): ``{layer path: [l, E]}`` (fractions of top-k selections per non-padding token)."""
    paths = moe_layer_paths(model)
    sums, n = {p: 0.0 for p in paths}, 0
    for batch in batches:
        _, aux = apply(model, {k: jnp.asarray(v) for k, v in batch.items()}, deterministic=True)
        for p in paths:
            sums[p] = sums[p] + np.asarray(_stats_for(aux, p).selection_fraction)
        n += 1
    if n == 0:
        raise ValueError("expert_usage needs at least one calibration batch")
    return {p: s / n for p, s in sums.items()}


def _flat_expert(experts: dict, i, e):
    return np.concatenate([np.asarray(v)[i, e].reshape(-1) for _, v in sorted(experts.items())])


def _groups(vectors: np.ndarray, size: int) -> list[list[int]]:
    """Greedy balanced clustering of ``vectors [E, n]`` into groups of ``size`` by cosine similarity."""
    v = vectors / np.maximum(np.linalg.norm(vectors, axis=1, keepdims=True), 1e-12)
    sim = v @ v.T
    left = list(range(len(v)))
    out = []
    while left:
        seed = left[0]
        members = sorted(left, key=lambda j: -sim[seed, j])[:size]
        if seed not in members:
            members = [seed] + members[:-1]
        out.append(sorted(members))
        left = [j for j in left if j not in members]
    return out


def merge_experts(model: nnx.Module, num_experts: int, method: str = "uniform", group_by: str = "index",
                  usage: dict | None = None) -> nnx.Module:
    """A new model with ``num_experts`` experts per MoE layer (see the module docstring).
    ``usage`` (from :func:`expert_usage`) is required for ``method='frequency'``."""
    cfg = model.cfg
    moe = cfg.moe
    if moe is None:
        raise ValueError("the model has no MoE layers to merge")
    if moe.expert_map is not None:
        raise ValueError("the model's experts are already merged; merge the original model instead")
    e = moe.num_experts
    if not 1 <= num_experts <= e:
        raise ValueError(f"cannot merge {e} experts into {num_experts}; choose 1 <= num_experts <= {e}")
    if e % num_experts:
        raise ValueError(f"num_experts={num_experts} must divide the {e} experts (equal-size groups)")
    if method not in METHODS:
        raise ValueError(f"unknown merge method {method!r}; valid: {', '.join(METHODS)}")
    if group_by not in GROUPINGS:
        raise ValueError(f"unknown grouping {group_by!r}; valid: {', '.join(GROUPINGS)}")
    if method == "frequency" and usage is None:
        raise ValueError("method='frequency' needs usage=expert_usage(model, calibration_batches)")
    if moe.top_k > e:
        raise ValueError(f"top_k={moe.top_k} exceeds the router's {e} outputs")
    size = e // num_experts
    expert_map = tuple(i // size for i in range(e))
    new_cfg = cfg.replace(moe=moe.replace(num_experts=num_experts, expert_map=expert_map))
    new_model = build_model(new_cfg, nnx.Rngs(0))
    old = nnx.to_pure_dict(nnx.state(model, nnx.Param))
    new = nnx.to_pure_dict(nnx.state(new_model, nnx.Param))
    moe_paths = moe_layer_paths(model)
    for path in moe_paths:
        src, dst = get_path(old, path), get_path(new, path)
        experts = {k: np.asarray(v) for k, v in src["experts"].items()}
        router = {k: np.asarray(v) for k, v in src["router"].items()}
        n_l = next(iter(experts.values())).shape[0]
        freq = np.ones((n_l, e)) if method == "uniform" else np.asarray(usage[path]).reshape(n_l, e)
        merged = {k: np.zeros_like(np.asarray(v)) for k, v in dst["experts"].items()}
        new_router = {k: np.array(v) for k, v in router.items()}
        for i in range(n_l):
            if group_by == "index":
                groups = [list(range(j * size, (j + 1) * size)) for j in range(num_experts)]
            else:
                vec = (np.stack([_flat_expert(experts, i, x) for x in range(e)]) if group_by == "weights"
                       else router["kernel"][i].T)
                groups = _groups(vec, size)
            order = [x for gr in groups for x in gr]              # router output r <- original expert order[r]
            for k, v in router.items():
                new_router[k][i] = v[i][..., order]
            for j, gr in enumerate(groups):
                w = np.maximum(freq[i, gr], 0.0)
                w = np.full(len(gr), 1.0 / len(gr)) if w.sum() <= 0 else w / w.sum()
                for k in merged:
                    merged[k][i, j] = np.tensordot(w, experts[k][i, gr], axes=1)
        dst["experts"] = {k: jnp.asarray(v) for k, v in merged.items()}
        dst["router"] = {k: jnp.asarray(v) for k, v in new_router.items()}
    flat_new = nnx.state(new_model, nnx.Param)
    copied = copy_non_moe_params(old, new, moe_paths)
    nnx.replace_by_pure_dict(flat_new, copied)
    nnx.update(new_model, flat_new)
    return new_model


def copy_non_moe_params(old: dict, new: dict, moe_paths) -> dict:
    """``new`` with every non-MoE param taken from ``old`` (MoE layers already filled in)."""
    def walk(o, n, path):
        if isinstance(n, dict):
            if path in moe_paths:
                return n
            return {k: walk(o[k], n[k], path + (k,)) for k in n}
        return jnp.asarray(o)

    return walk(old, new, ())


def param_counts(model: nnx.Module) -> tuple[int, float]:
    """``(total, active per token)`` parameters, by :func:`moejax.models.params.count`."""
    from moejax.models.params import count

    rep = count(model)
    return rep.total, rep.active

