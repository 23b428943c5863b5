"""Timing helpers shared by the benchmark scripts: wall time of jitted calls.

On a shared 2-core machine the speed of the same call drifts by 10-20% over minutes, so a ratio
of two times is only meaningful when both were measured in the same moments: :func:`interleaved`
runs the calls round-robin and keeps each one's best round.
"""

from __future__ import annotations

import statistics
import time

import jax


def _median(fn, args, reps: int) -> float:
    """Median seconds of ``fn(*args)`` over ``reps`` calls (no warm-up)."""
    times = []
    for _ in range(reps):
        t0 = time.perf_counter()
        jax.block_until_ready(fn(*args))
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def timeit(fn, *args, reps: int = 20) -> float:
    """Median seconds of ``fn(*args)`` over ``reps`` calls, after two warm-up calls (compile)."""
    jax.block_until_ready(fn(*args))
    jax.block_until_ready(fn(*args))
    return _median(fn, args, reps)


def interleaved(calls: dict, rounds: int = 3, reps: int = 3) -> dict:
    """``{name: (fn, args)}`` -> ``{name: seconds}``: each call's median over ``reps`` calls, in
    ``rounds`` round-robin rounds (all calls compiled first); the minimum over the rounds."""
    for fn, args in calls.values():
        jax.block_until_ready(fn(*args))
    best = {name: float("inf") for name in calls}
    for _ in range(rounds):
        for name, (fn, args) in calls.items():
            best[name] = min(best[name], _median(fn, args, reps))
    return best
