"""Test setup: 8 emulated CPU devices (set before jax is imported) and mesh fixtures."""

import os

os.environ["XLA_FLAGS"] = (
    os.environ.get("XLA_FLAGS", "") + " --xla_force_host_platform_device_count=8"
).strip()
os.environ.setdefault("JAX_PLATFORMS", "cpu")
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
# the corpus SentencePiece model is trained once and shared by the test workers
os.environ.setdefault("MOEJAX_CACHE", os.path.join(__import__("tempfile").gettempdir(), "moejax-test-cache"))
# JAX's persistent compilation cache for the processes the tests start (CLI runs, resumed trainers,
# multi-process launches, notebook kernels: they inherit the environment), so the same tiny models
# compile once per suite run instead of once per process. A size limit turns on JAX's file lock
# around every cache read and write (without one, a process can read an entry another is still
# writing). The test workers themselves do not use it (below): in these long-lived processes, jax
# 0.10's executable serialisation crashed (a segfault in ``put_executable_and_time``).
# MOEJAX_TEST_JAX_CACHE=0 turns it off for the children too (the Megablox checks' own process).
if os.environ.get("MOEJAX_TEST_JAX_CACHE", "1") != "0":
    os.environ.setdefault("JAX_COMPILATION_CACHE_DIR",
                          os.path.join(__import__("tempfile").gettempdir(), "moejax-test-jax-cache"))
    os.environ.setdefault("JAX_COMPILATION_CACHE_MAX_SIZE", str(16 * 2**30))
    os.environ.setdefault("JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS", "0.2")
else:
    for var in ("JAX_COMPILATION_CACHE_DIR", "JAX_COMPILATION_CACHE_MAX_SIZE"):
        os.environ.pop(var, None)

import jax  # noqa: E402
import pytest  # noqa: E402

from moejax.sharding import make_mesh  # noqa: E402

jax.config.update("jax_default_matmul_precision", "highest")
jax.config.update("jax_compilation_cache_dir", None)      # in-process: no persistent cache (see above)

MESH_SHAPES = {
    "data8": {"data": 8},
    "data2_expert4": {"data": 2, "expert": 4},
    "expert8": {"data": 1, "expert": 8},
    "data2_expert2_model2": {"data": 2, "expert": 2, "model": 2},
}


@pytest.fixture(scope="session")
def devices():
    devs = jax.devices()
    assert len(devs) == 8, f"expected 8 emulated CPU devices, got {len(devs)}"
    return devs


@pytest.fixture(params=sorted(MESH_SHAPES))
def mesh(request, devices):
    """Each of the four standard test meshes in turn."""
    return make_mesh(MESH_SHAPES[request.param], devices)


@pytest.fixture
def make_test_mesh(devices):
    """Factory: ``make_test_mesh({'data': 2, 'expert': 4})``."""
    return lambda shape: make_mesh(shape, devices)


def pytest_collection_modifyitems(items):
    """Modules with slow tests first (order kept within each module), so ``pytest -n 2`` starts
    the long end-to-end runs early instead of leaving one worker on them alone at the end."""
    slow_modules = {item.module.__name__ for item in items if item.get_closest_marker("slow")}
    items.sort(key=lambda item: item.module.__name__ not in slow_modules)
