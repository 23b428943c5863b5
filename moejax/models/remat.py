"""Rematerialisation policies for the scanned blocks (``DecoderConfig.remat`` / ``EncDecConfig.remat``).

Each scanned period runs under ``jax.checkpoint`` with the chosen policy, so the backward pass
recomputes what the policy does not save instead of keeping every activation of every layer:

* ``none``: no rematerialisation (every intermediate kept: fastest, most memory);
* ``full``: nothing saved but each period's input (``nothing_saveable``): least memory, one extra
  forward;
* ``dots_saveable``: keep every matmul output, recompute the elementwise work between them;
* ``dots_with_no_batch_dims_saveable``: keep the weight matmuls (projections, FFNs), recompute the
  attention score / context products (MaxText's "minimal");
* ``offload_dots``: like the previous, but the saved matmul outputs go to host memory
  (``offload_dot_with_no_batch_dims('device', 'pinned_host')``; refused where the device has no
  ``pinned_host`` memory).

Gradients are the same under every policy (tested); ``compiled.memory_analysis()`` shows the
temporary memory each one needs.
"""

from __future__ import annotations

import enum
from collections.abc import Callable

import jax


class Remat(enum.StrEnum):
    NONE = "none"
    FULL = "full"
    DOTS_SAVEABLE = "dots_saveable"
    DOTS_WITH_NO_BATCH_DIMS_SAVEABLE = "dots_with_no_batch_dims_saveable"
    OFFLOAD_DOTS = "offload_dots"


def check_remat(name: str) -> None:
    """ValueError naming ``name`` and the valid policies."""
    if name not in set(Remat):
        raise ValueError(f"unknown remat policy {name!r}; valid: {', '.join(r.value for r in Remat)}")


def _has_pinned_host() -> bool:
    try:
        return any(m.kind == "pinned_host" for m in jax.devices()[0].addressable_memories())
    except Exception:  # noqa: BLE001 - a backend without memory kinds has no host offload
        return False


def policy(name: str):
    """The ``jax.checkpoint`` policy of ``name`` (None for ``full``: save nothing)."""
    check_remat(name)
    cp = jax.checkpoint_policies
    if name == Remat.OFFLOAD_DOTS:
        if not _has_pinned_host():
            raise ValueError(f"remat={name!r} offloads to host memory, which {jax.devices()[0].platform} devices do "
                             "not have; use 'dots_with_no_batch_dims_saveable' or 'full'")
        return cp.offload_dot_with_no_batch_dims("device", "pinned_host")
    return {Remat.FULL: cp.nothing_saveable, Remat.DOTS_SAVEABLE: cp.dots_saveable,
            Remat.DOTS_WITH_NO_BATCH_DIMS_SAVEABLE: cp.dots_with_no_batch_dims_saveable}[Remat(name)]


def rematerialise(fn: Callable, name: str) -> Callable:
    """``fn`` under ``jax.checkpoint`` with policy ``name`` (``fn`` itself for ``none``)."""
    check_remat(name)
    if name == Remat.NONE:
        return fn
    return jax.checkpoint(fn, policy=policy(name), prevent_cse=False)
