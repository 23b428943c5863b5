"""Topology-aware device meshes with named axes, on one slice or across slices.

``create_mesh({'data': 4, 'expert': 16, 'model': 4})`` arranges the devices with JAX's own
``mesh_utils.create_device_mesh``: on TPU it follows the physical torus (the last, most
communication-heavy axis gets the nearest neighbours), on GPU the global device numbering, on CPU the
given order. ``create_mesh(ici, dcn={'data': 2})`` builds a hybrid mesh with
``create_hybrid_device_mesh``: ``ici`` is the mesh inside one slice (ICI / NVLink) and ``dcn`` how many
slices (TPU ``slice_index``; on GPU and CPU one process = one granule) each axis spans over the data
centre network, so only the axes named in ``dcn`` (usually ``data``) talk across slices.

The global size of axis ``a`` is ``ici[a] * dcn.get(a, 1)``. Axis order is outermost first; keep
the standard ``(data, expert, model)`` order so ``model`` (most traffic) is innermost.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

import numpy as np
from jax.sharding import Mesh


def _shape(shape: dict[str, int], what: str) -> dict[str, int]:
    out = {}
    for name, size in dict(shape).items():
        if int(size) < 1:
            raise ValueError(f"{what} axis {name!r} has size {size}; sizes must be >= 1")
        out[str(name)] = int(size)
    return out


def device_grid(shape: dict[str, int], dcn_shape: dict[str, int] | None = None,
                devices: Sequence[Any] | None = None, *, allow_split_physical_axes: bool = True) -> np.ndarray:
    """The ``[*global axis sizes]`` array of devices :func:`create_mesh` uses (any device-like
    objects, e.g. fake TPU devices with ``coords`` in tests)."""
    import jax
    from jax.experimental import mesh_utils

    ici = _shape(shape, "mesh")
    dcn = _shape(dcn_shape or {}, "dcn mesh")
    unknown = sorted(set(dcn) - set(ici))
    if unknown:
        raise ValueError(f"dcn mesh axes {unknown} are not axes of the mesh {ici}; list every axis in the mesh "
                         "shape (size 1 inside a slice is fine)")
    devices = list(jax.devices() if devices is None else devices)
    total = math.prod(ici.values()) * math.prod(dcn.values())
    if total != len(devices):
        raise ValueError(f"mesh {ici} x dcn {dcn} needs {total} devices but {len(devices)} are given")
    ici_sizes = list(ici.values())
    if math.prod(dcn.values()) == 1:
        return mesh_utils.create_device_mesh(ici_sizes, devices, allow_split_physical_axes=allow_split_physical_axes)
    dcn_sizes = [dcn.get(n, 1) for n in ici]
    by_process = devices[0].platform != "tpu" or not hasattr(devices[0], "slice_index")
    granules = len({d.process_index if by_process else d.slice_index for d in devices})
    if granules != math.prod(dcn_sizes):
        what = "processes" if by_process else "TPU slices"
        raise ValueError(f"dcn mesh {dcn} spans {math.prod(dcn_sizes)} granules but the devices come from {granules} "
                         f"{what}; use a dcn shape whose sizes multiply to {granules}, or none")
    return mesh_utils.create_hybrid_device_mesh(ici_sizes, dcn_sizes, devices, process_is_granule=by_process,
                                                allow_split_physical_axes=allow_split_physical_axes)


def create_mesh(shape: dict[str, int], dcn_shape: dict[str, int] | None = None,
                devices: Sequence[Any] | None = None, *, allow_split_physical_axes: bool = True) -> Mesh:
    """A ``jax.sharding.Mesh`` named ``tuple(shape)`` over ``devices`` (default ``jax.devices()``),
    laid out by :func:`device_grid`. Raises ValueError naming the sizes when they do not multiply to
    the device count."""
    grid = device_grid(shape, dcn_shape, devices, allow_split_physical_axes=allow_split_physical_axes)
    return Mesh(grid, tuple(shape))


def global_shape(shape: dict[str, int], dcn_shape: dict[str, int] | None = None) -> dict[str, int]:
    """Axis sizes of the whole mesh: ``shape[a] * dcn_shape.get(a, 1)``."""
    dcn = dict(dcn_shape or {})
    return {n: int(s) * int(dcn.get(n, 1)) for n, s in dict(shape).items()}
