"""The one place where ``MoeConfig`` strings become objects: routers and dispatch backends.

``make_router(cfg, rngs)`` / ``make_backend(cfg)`` build them; ``check_config(cfg)`` asks the
chosen classes whether they support the rest of the config (called by ``MoeConfig.validate``).
A new router or backend is a class beside the others plus one entry in a table below.
"""

from __future__ import annotations

from flax import nnx

from moejax.moe.bucket import BucketBackend
from moejax.moe.dispatch import Backend as BackendBase
from moejax.moe.dispatch import EinsumBackend, GatherBackend, RaggedBackend
from moejax.moe.options import Backend, Router, check
from moejax.moe.routing import ExpertChoiceRouter, NoisyTopKRouter, TaskRouter, TopKRouter
from moejax.moe.routing import Router as RouterBase

ROUTERS: dict[Router, type[RouterBase]] = {
    Router.TOP_K: TopKRouter,
    Router.EXPERT_CHOICE: ExpertChoiceRouter,
    Router.NOISY_TOP_K: NoisyTopKRouter,
    Router.TASK: TaskRouter,
}

BACKENDS: dict[Backend, type[BackendBase]] = {
    Backend.BUCKET: BucketBackend,
    Backend.GATHER: GatherBackend,
    Backend.EINSUM: EinsumBackend,
    Backend.RAGGED: RaggedBackend,
}


def router_class(name: str) -> type[RouterBase]:
    """The router class of ``MoeConfig.router`` ``name`` (ValueError listing the valid names)."""
    check("router", name, Router)
    return ROUTERS[Router(name)]


def resolve_backend(cfg) -> Backend:
    """``cfg.backend`` with ``"auto"`` resolved: ``"bucket"`` for a dropless layer of plain experts,
    else ``"gather"`` (ValueError listing the valid names)."""
    check("backend", cfg.backend, Backend)
    if cfg.backend == Backend.AUTO:
        return Backend.BUCKET if cfg.dropless and cfg.inner is None else Backend.GATHER
    return Backend(cfg.backend)


def backend_class(cfg) -> type[BackendBase]:
    """The backend class of ``cfg.backend`` (``"auto"`` resolved, see :func:`resolve_backend`)."""
    return BACKENDS[resolve_backend(cfg)]


def check_config(cfg) -> None:
    """Router- and backend-specific validation (each class states what it supports)."""
    router = router_class(cfg.router)
    router.check_config(cfg)
    backend = backend_class(cfg)
    backend.check_config(cfg)
    if backend.token_choice_only and router.fixed_capacity:
        raise ValueError(f"backend={cfg.backend!r} needs a token-choice router, not router={cfg.router!r}; "
                         f"use backend 'gather'")


def make_router(cfg, rngs: nnx.Rngs) -> RouterBase:
    """The router module of ``cfg`` (params drawn from ``rngs.params``)."""
    return router_class(cfg.router)(cfg, rngs=rngs)


def make_backend(cfg) -> BackendBase:
    """The dispatch backend of ``cfg`` with its activation axis rules (and, for ``bucket``, the
    capacity ladder of ``cfg``)."""
    return backend_class(cfg).from_config(cfg)
