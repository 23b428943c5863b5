"""Auxiliary-loss-free load balancing (DeepSeek-V3, Wang et al. 2024): the routers'
:class:`~moejax.moe.routing.SelectionBias` params are not trained by the optimizer. Their gradient
slot carries each expert's selection share minus the mean share (positive = overloaded, summed over
micro-batches and data-parallel devices, so over the global batch), and after each step
``b_e -= rate * sign(share_e - k / E)``, i.e. ``b_e += gamma * sign(mean load - load_e)``.
The biases are params, so they are part of the train state, its shardings and its checkpoints.
"""

from __future__ import annotations

import jax
import optax
from flax import nnx

from moejax.moe.routing import SelectionBias
from moejax.tree import path_key


def sign_update(rate: float) -> optax.GradientTransformation:
    """``update = -rate * sign(g)`` (no state, no weight decay, no clipping)."""
    return optax.chain(optax.scale_by_sign(), optax.scale(-float(rate)))


def bias_paths(abstract_model: nnx.Module) -> set[tuple[str, ...]]:
    """Path keys (as :func:`moejax.tree.path_key` spells them, without the trailing ``value``) of
    every :class:`SelectionBias` of a model."""
    return {tuple(str(k) for k in path) for path, _ in nnx.to_flat_state(nnx.state(abstract_model, SelectionBias))}


def with_balance_labels(labels, abstract_params, paths: set) -> object:
    """A label tree over ``abstract_params``: ``'balance'`` at the selection biases whose label in
    ``labels`` (a callable ``path -> label``) is ``'train'`` (a frozen router keeps its bias), the
    given label elsewhere."""
    def label(path, _):
        key = path_key(path)[:-1]
        base = labels(key)
        return "balance" if base == "train" and key in paths else base

    return jax.tree_util.tree_map_with_path(label, abstract_params)
