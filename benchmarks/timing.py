"""Timing helper shared by the benchmark scripts: median wall time of a jitted call."""

from __future__ import annotations

import statistics
import time

import jax


def timeit(fn, *args, reps: int = 20) -> float:
    """Median seconds of ``fn(*args)`` over ``reps`` calls, after two warm-up calls (compile)."""
    jax.block_until_ready(fn(*args))
    jax.block_until_ready(fn(*args))
    times = []
    for _ in range(reps):
        t0 = time.perf_counter()
        jax.block_until_ready(fn(*args))
        times.append(time.perf_counter() - t0)
    return statistics.median(times)
