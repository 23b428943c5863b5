"""Grouped matmul for the dropless ``ragged`` backend, picked per platform.

``grouped_matmul(x, w, group_sizes)``: rows ``x [z, i]`` sorted by expert, ``group_sizes [e]``
rows per expert, ``w [e, i, o]`` -> ``[z, o]`` with row block ``i`` multiplied by ``w[i]`` (rows past
``sum(group_sizes)`` are zeros). Implementations (``MoeConfig.grouped_matmul``):

- ``"ragged_dot"``: ``jax.lax.ragged_dot`` — XLA's grouped matmul, on CPU and GPU (cuBLAS grouped
  GEMM / Triton where XLA provides it);
- ``"megablox"``: the Pallas TPU kernel ``jax.experimental.pallas.ops.tpu.megablox.gmm`` (the one
  MaxText uses), differentiable (its own VJP: ``gmm`` / ``tgmm``). On a non-TPU backend it runs
  in Pallas interpret mode, which is how the tests check it against ``ragged_dot`` on CPU;
- ``"auto"`` (default): ``megablox`` on TPU when the module imports, else ``ragged_dot``.

The Megablox kernel needs the row count to be a multiple of its row tile (rows are zero-padded to
it and cut off after) and leaves rows past ``sum(group_sizes)`` unwritten (they are masked to zero,
and so is their input gradient).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from moejax.moe.options import GroupedMatmul, check


def megablox_available() -> bool:
    """Does this JAX ship the Megablox kernel?"""
    import importlib

    try:
        importlib.import_module("jax.experimental.pallas.ops.tpu.megablox.ops")
    except Exception:          # ImportError, or a Pallas/Mosaic import failure on this platform
        return False
    return True


def resolve(impl: str, platform: str | None = None) -> str:
    """The implementation ``impl`` means on ``platform`` (default: JAX's default backend)."""
    check("grouped_matmul", impl, GroupedMatmul)
    if impl != GroupedMatmul.AUTO:
        return GroupedMatmul(impl).value
    platform = platform or jax.default_backend()
    on_tpu = platform == "tpu" and megablox_available()
    return (GroupedMatmul.MEGABLOX if on_tpu else GroupedMatmul.RAGGED_DOT).value


def _round_up(x: int, m: int) -> int:
    return -(-x // m) * m


def grouped_matmul(x: jax.Array, w: jax.Array, group_sizes: jax.Array, impl: str = "auto") -> jax.Array:
    """``x [z, i]`` (sorted by group), ``w [e, i, o]``, ``group_sizes [e]`` int -> ``[z, o]`` in
    ``x.dtype`` (float32 accumulation)."""
    impl = resolve(impl)
    if impl == GroupedMatmul.RAGGED_DOT:
        return jax.lax.ragged_dot(x, w, group_sizes)
    from jax.experimental.pallas.ops.tpu.megablox import ops

    m, k = x.shape
    n = w.shape[-1]
    tm = min(128, _round_up(m, 8))
    rows = _round_up(m, tm)
    # the kernel leaves rows past sum(group_sizes) unwritten (forward and input gradient): mask both
    valid = (jnp.arange(rows) < jnp.sum(group_sizes))[:, None]
    xp = jnp.pad(x, ((0, rows - m), (0, 0))) if rows != m else x
    xp = jnp.where(valid, xp, jnp.zeros((), x.dtype))
    y = ops.gmm(xp, w.astype(x.dtype), group_sizes.astype(jnp.int32), preferred_element_type=x.dtype,
                tiling=(tm, min(128, k), min(128, n)), interpret=jax.default_backend() != "tpu")
    return jnp.where(valid, y, jnp.zeros((), y.dtype))[:m]
