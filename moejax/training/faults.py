"""What the train loop does about faults: non-finite steps, preemption, non-finite params on disk.

* :class:`NonFiniteGuard` counts consecutive non-finite steps (the step's ``metrics['nonfinite']``,
  read one step late so the host never waits on the step it just dispatched) and raises
  :class:`NonFiniteError` after ``limit`` of them in a row. The step itself is never applied
  (:mod:`moejax.training.state`); the trainer saves no checkpoint while the newest step was
  non-finite, so a good checkpoint is never rotated out by a bad one.
* :class:`Preemption` turns SIGTERM into a flag the loop polls after each step: the trainer saves
  the current step and raises :class:`Preempted`, and the rerun resumes exactly.
* :func:`nonfinite_leaves` names the parameters holding NaN / inf (a damaged checkpoint).
"""

from __future__ import annotations

import signal
import threading

import jax
import jax.numpy as jnp
import numpy as np

from moejax.tree import path_str


class NonFiniteError(RuntimeError):
    """Training stopped: too many consecutive steps had a non-finite loss or gradient."""


class Preempted(Exception):
    """The run got SIGTERM after step ``step``; ``saved``: whether that step was saved (not when it
    was non-finite: the newest checkpoint is then ``newest``)."""

    def __init__(self, step: int, directory: str, saved: bool = True, newest: int | None = None):
        what = (f"saved checkpoint {step} in {directory}" if saved else
                f"step {step} was non-finite and not saved (newest checkpoint: {newest}) in {directory}")
        super().__init__(f"preempted (SIGTERM) at step {step}: {what}; rerun the same command to resume")
        self.step, self.saved = step, saved


class NonFiniteGuard:
    """Host-side count of consecutive non-finite steps. ``observe(step, flag)`` takes the device
    scalar ``metrics['nonfinite']`` of ``step`` (blocking on that step only)."""

    def __init__(self, limit: int):
        self.limit = int(limit)
        self.run = 0                 # consecutive non-finite steps ending at the last observed one
        self.total = 0
        self.first_bad = None
        self._pending = None

    def push(self, step: int, flag) -> None:
        """Record ``step``'s flag and observe the one pushed before it (already computed, or nearly)."""
        pending, self._pending = self._pending, (step, flag)
        if pending is not None:
            self._observe(*pending)

    def flush(self) -> None:
        """Observe the last pushed step too (before a save, at the end of the run)."""
        pending, self._pending = self._pending, None
        if pending is not None:
            self._observe(*pending)

    def _observe(self, step: int, flag) -> None:
        bad = bool(np.asarray(jax.device_get(flag)) > 0)
        if not bad:
            self.run, self.first_bad = 0, None
            return
        self.total += 1
        if self.run == 0:
            self.first_bad = step
        self.run += 1
        print(f"warning: step {step} had a non-finite loss or gradient; it was not applied "
              f"({self.run} in a row, stopping at {self.limit})", flush=True)
        if self.run >= self.limit:
            raise NonFiniteError(
                f"{self.run} consecutive steps ({self.first_bad}..{step}) had a non-finite loss or gradient "
                f"(TrainConfig.max_nonfinite_steps={self.limit}); none was applied and no checkpoint was saved "
                "after them: lower the learning rate, or check the data and the dtype, then rerun to resume "
                "from the newest checkpoint")

    @property
    def clean(self) -> bool:
        """Whether the newest observed step was finite (a checkpoint of it may be saved)."""
        return self.run == 0


class Preemption:
    """Context manager: while active, SIGTERM sets :attr:`requested` instead of killing the process
    (main thread only; elsewhere it does nothing). The previous handler comes back on exit."""

    def __init__(self):
        self.requested = False
        self._previous = None

    def __enter__(self):
        if threading.current_thread() is threading.main_thread():
            self._previous = signal.signal(signal.SIGTERM, self._handle)
        return self

    def _handle(self, signum, frame):
        self.requested = True

    def __exit__(self, *exc):
        if self._previous is not None:
            signal.signal(signal.SIGTERM, self._previous)
        return False


def nonfinite_leaves(tree) -> list[str]:
    """Paths of the floating-point leaves of ``tree`` holding a NaN or inf (one small device ->
    host transfer per leaf)."""
    flat = jax.tree_util.tree_flatten_with_path(tree)[0]
    flags = [jnp.all(jnp.isfinite(x)) if jnp.issubdtype(x.dtype, jnp.inexact) else jnp.bool_(True)
             for _, x in flat]
    got = jax.device_get(flags)
    return [path_str(p) for (p, _), ok in zip(flat, got) if not bool(ok)]
