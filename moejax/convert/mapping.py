"""Bookkeeping shared by the Hugging Face readers: track used / missing weights, stack layers."""

from __future__ import annotations

import numpy as np
from flax import nnx


class WeightReader:
    """Hands out HF weights by name and remembers which were used or missing.

    ``check()`` raises a ValueError listing the missing and the unexpected (never read) weights,
    so a checkpoint of another model or size never loads silently.
    """

    def __init__(self, weights: dict[str, np.ndarray]):
        self.weights = weights
        self.used: set[str] = set()
        self.missing: list[str] = []
        self.stacks: dict[str, list] = {}

    def get(self, name: str):
        if name not in self.weights:
            self.missing.append(name)
            return None
        self.used.add(name)
        return np.asarray(self.weights[name])

    def alias(self, *names: str) -> None:
        """Names that may be present (tied copies) and are fine to skip."""
        self.used.update(names)

    def get_stacked(self, names: list[str], fn=lambda w: w):
        """``np.stack([fn(w) for w in names])`` (None if any is missing): stacked experts."""
        ws = [self.get(n) for n in names]
        return None if any(w is None for w in ws) else np.stack([fn(w) for w in ws])

    def push(self, path: str, value) -> None:
        """Append one layer's array to the list stacked under ``path`` by :meth:`finish`."""
        self.stacks.setdefault(path, []).append(value)

    def check(self) -> None:
        unused = sorted(set(self.weights) - self.used)
        if self.missing or unused:
            def show(xs):
                return f"{xs[:8]}{' ...' if len(xs) > 8 else ''}"

            raise ValueError(
                "checkpoint does not match the model config: "
                + (f"missing {len(self.missing)} weights: {show(self.missing)}; " if self.missing else "")
                + (f"unexpected {len(unused)} weights: {show(unused)}" if unused else ""))

    def finish(self, flat: dict) -> dict:
        """Check, then add the per-layer lists stacked on a leading layer axis to ``flat``."""
        self.check()
        for path, arrs in self.stacks.items():
            flat[path] = np.stack(arrs)
        return flat


def load_into(model: nnx.Module, flat: dict[str, np.ndarray]) -> nnx.Module:
    """Copy ``flat`` arrays into ``model``'s params (shapes must match exactly)."""
    state = nnx.state(model, nnx.Param)
    flat_state = dict(nnx.to_flat_state(state))
    paths = {"/".join(map(str, p)): p for p in flat_state}
    extra = sorted(set(flat) - set(paths))
    absent = sorted(set(paths) - set(flat))
    if extra or absent:
        raise ValueError(f"parameter mismatch: not in model {extra}; not in checkpoint {absent}")
    for name, arr in flat.items():
        var = flat_state[paths[name]]
        if tuple(var[...].shape) != tuple(arr.shape):
            raise ValueError(f"{name}: checkpoint shape {tuple(arr.shape)} != model shape {tuple(var[...].shape)}")
        var[...] = arr.astype(var[...].dtype)
    nnx.update(model, state)
    return model
