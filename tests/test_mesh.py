"""Topology-aware meshes (moejax.mesh) on fake TPU / GPU device lists and on the CPU devices,
and the shipped mesh gin files."""

import itertools
import math

import numpy as np
import pytest

from moejax.mesh import create_mesh, device_grid, global_shape


class FakeDevice:
    """What jax's mesh_utils reads of a device."""

    def __init__(self, id, platform="tpu", kind="TPU v5p", coords=(0, 0, 0), process_index=0, slice_index=0):
        self.id, self.platform, self.device_kind = id, platform, kind
        self.coords, self.core_on_chip = coords, 0
        self.process_index, self.slice_index = process_index, slice_index

    def __repr__(self):
        return f"Fake({self.id}, {self.coords}, s{self.slice_index})"


def v5p_slice(dims=(4, 8, 8), slice_index=0, first_id=0):
    """A TPU v5p slice of prod(dims) chips in jax.devices() order: process-tiled, each host a 2x2x1
    block of 4 chips, hosts in (z, y, x) order."""
    devs = []
    hosts = itertools.product(range(dims[2]), range(dims[1] // 2), range(dims[0] // 2))
    for h, (z, hy, hx) in enumerate(hosts):
        for cy, cx in itertools.product(range(2), range(2)):
            i = first_id + len(devs)
            devs.append(FakeDevice(i, coords=(2 * hx + cx, 2 * hy + cy, z), process_index=first_id // 4 + h,
                                   slice_index=slice_index))
    return devs


def torus_neighbours(a, b, dims):
    d = [min(abs(p - q), n - abs(p - q)) for p, q, n in zip(a.coords, b.coords, dims)]
    return sum(d) == 1


def test_v5p_256_puts_the_model_axis_on_ici_neighbours():
    devs = v5p_slice()
    grid = device_grid({"data": 4, "expert": 16, "model": 4}, devices=devs)
    assert grid.shape == (4, 16, 4) and len({d.id for d in grid.flat}) == 256
    # every model group (the innermost, busiest axis) is a chain of physical torus neighbours
    for i, j in itertools.product(range(4), range(16)):
        ring = grid[i, j, :]
        assert all(torus_neighbours(ring[k], ring[k + 1], (4, 8, 8)) for k in range(3)), ring
    # each data replica's 64 chips (its expert all-to-alls) form one compact sub-cuboid of the torus
    for i in range(4):
        coords = np.array([d.coords for d in grid[i].flat])
        assert np.prod(coords.max(0) - coords.min(0) + 1) == 64
    # a plain reshape of jax.devices() order would not do that for every group
    naive = np.asarray(devs, dtype=object).reshape(4, 16, 4)
    assert not all(torus_neighbours(naive[i, j, k], naive[i, j, k + 1], (4, 8, 8))
                   for i in range(4) for j in range(16) for k in range(3))


def test_multislice_hybrid_mesh_keeps_dcn_on_the_data_axis():
    devs = v5p_slice(slice_index=0) + v5p_slice(slice_index=1, first_id=256)
    grid = device_grid({"data": 4, "expert": 16, "model": 4}, {"data": 2}, devs)
    assert grid.shape == (8, 16, 4)
    slices = np.vectorize(lambda d: d.slice_index)(grid)
    assert (slices[:4] == 0).all() and (slices[4:] == 1).all()     # only the data axis crosses slices
    assert global_shape({"data": 4, "expert": 16, "model": 4}, {"data": 2}) == {"data": 8, "expert": 16, "model": 4}


def test_gpu_nodes_are_granules_by_process():
    devs = [FakeDevice(i, platform="gpu", kind="NVIDIA H100", process_index=i // 8) for i in range(16)]
    grid = device_grid({"data": 1, "expert": 8}, {"data": 2}, devs[::-1])
    procs = np.vectorize(lambda d: d.process_index)(grid)
    assert grid.shape == (2, 8) and (procs[0] == 0).all() and (procs[1] == 1).all()


def test_cpu_mesh_and_errors(devices):
    mesh = create_mesh({"data": 2, "expert": 4})
    assert dict(mesh.shape) == {"data": 2, "expert": 4}
    assert list(mesh.devices.flat) == list(devices)               # CPU: the given order
    with pytest.raises(ValueError, match=r"mesh \{'data': 3, 'expert': 4\} x dcn \{\} needs 12 devices but 8"):
        create_mesh({"data": 3, "expert": 4})
    with pytest.raises(ValueError, match=r"dcn mesh axes \['pipeline'\] are not axes of the mesh"):
        create_mesh({"data": 4}, {"pipeline": 2})
    with pytest.raises(ValueError,
                       match=r"dcn mesh \{'data': 2\} spans 2 granules but the devices come from 1 processes"):
        create_mesh({"data": 4}, {"data": 2})
    with pytest.raises(ValueError, match="mesh axis 'expert' has size 0"):
        create_mesh({"data": 8, "expert": 0})


@pytest.mark.parametrize("name,devices_needed", [("tpu_v5p_256", 256), ("tpu_v5p_2x256", 512), ("gpu_2x8", 16),
                                                  ("data2_expert4", 8)])
def test_mesh_gin_files(name, devices_needed):
    import gin
    from moejax.entry import shipped_gin_dir

    gin.clear_config()
    gin.add_config_file_search_path(shipped_gin_dir())
    gin.parse_config_files_and_bindings(["runs/base.gin", f"mesh/{name}.gin"], [], finalize_config=False)
    shape = gin.query_parameter("MESH_SHAPE/macro.value")
    dcn = gin.query_parameter("DCN_MESH_SHAPE/macro.value")
    gin.clear_config()
    assert math.prod(global_shape(shape, dcn).values()) == devices_needed
