"""The ragged backend's grouped matmul: the Megablox TPU kernel (run here in Pallas interpret mode,
its CPU fallback) equals jax.lax.ragged_dot, alone and inside the MoE layer vs the Python-loop
reference; the platform choice of ``grouped_matmul='auto'``."""

import os
import subprocess
import sys

import pytest

from moejax.moe import MoeConfig
from moejax.moe.grouped import megablox_available, resolve

needs_megablox = pytest.mark.skipif(not megablox_available(), reason="this jax has no Megablox kernel")


@needs_megablox
def test_megablox_kernel_in_a_fresh_process():
    """``megablox_checks.py``: the kernel equals ``ragged_dot`` (f32 and bf16, values and gradients)
    and the layer with it equals the Python-loop reference; run in its own process (see there)."""
    env = dict(os.environ, MOEJAX_TEST_JAX_CACHE="0")
    here = os.path.dirname(__file__)
    root = os.path.dirname(os.path.dirname(here))
    proc = subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "-p", "no:randomly",
                           os.path.join(here, "megablox_checks.py")], cwd=root, env=env, capture_output=True,
                          text=True, timeout=600)
    assert proc.returncode == 0, (proc.stdout + proc.stderr)[-4000:]
    assert "3 passed" in proc.stdout, proc.stdout[-2000:]


def test_auto_picks_megablox_only_on_tpu():
    assert resolve("auto", "cpu") == resolve("auto", "gpu") == "ragged_dot"
    assert resolve("auto", "tpu") == ("megablox" if megablox_available() else "ragged_dot")
    assert resolve("megablox", "cpu") == "megablox"
    with pytest.raises(ValueError, match="unknown grouped_matmul 'cutlass'; valid: auto, ragged_dot, megablox"):
        resolve("cutlass")
    with pytest.raises(ValueError, match="unknown grouped_matmul 'cutlass'"):
        MoeConfig(grouped_matmul="cutlass").validate()
