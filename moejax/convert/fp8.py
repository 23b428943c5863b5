"""Block-scaled FP8 checkpoints (``quantization_config.quant_method: fp8``; DeepSeek-V3's Hub
weights): dequantised to bfloat16 on read.

Each quantised ``<name>`` (float8 e4m3) has a float32 ``<name>_scale_inv`` ``[ceil(r / br), ceil(c /
bc)]`` for blocks of ``weight_block_size = [br, bc]`` (128 x 128): the value is ``w * scale_inv`` of
its block (a partial last block uses the same scale). Which tensors are quantised is read from the
checkpoint itself (a tensor with a ``_scale_inv`` companion), not from names: attention, experts and
dense MLPs in V3, router, norms and embeddings in bf16. :func:`fp8_view` wraps the lazy weights of a
directory so every converter sees plain bfloat16 tensors (one tensor dequantised at a time, when it
is read), as DeepSeek's own ``fp8_cast_bf16.py`` does.
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping

import ml_dtypes
import numpy as np

SCALE_SUFFIX = "_scale_inv"
_FORMATS = {"e4m3": np.dtype(ml_dtypes.float8_e4m3fn)}
_KEYS = {"quant_method", "fmt", "activation_scheme", "weight_block_size", "modules_to_not_convert"}


def is_fp8(hf: Mapping) -> bool:
    """Does ``config.json`` say the checkpoint is block-scaled FP8?"""
    q = hf.get("quantization_config")
    return isinstance(q, Mapping) and q.get("quant_method") == "fp8"


def block_size(hf: Mapping) -> tuple[int, int] | None:
    """``weight_block_size`` of an ``fp8`` ``quantization_config`` (None without one); another
    quantisation method, or any setting moejax does not reproduce, is a ValueError naming it (for
    the families whose converters read FP8)."""
    q = hf.get("quantization_config")
    if q is None:
        return None
    if not is_fp8(hf):
        method = q.get("quant_method") if isinstance(q, Mapping) else q
        raise ValueError(f"config.json has quantization_config.quant_method={method!r}; this converter reads "
                         "block-scaled 'fp8' checkpoints only")
    unknown = sorted(set(q) - _KEYS)
    if unknown:
        raise ValueError(f"config.json quantization_config has fields moejax does not know: {', '.join(unknown)}")
    if q.get("fmt", "e4m3") not in _FORMATS:
        raise ValueError(f"config.json has quantization_config.fmt={q['fmt']!r}; supported: {', '.join(_FORMATS)}")
    if q.get("activation_scheme", "dynamic") != "dynamic":
        raise ValueError(f"config.json has quantization_config.activation_scheme={q['activation_scheme']!r}; "
                         "supported: 'dynamic' (the weights are dequantised, activations stay in the compute dtype)")
    size = q.get("weight_block_size")
    if not (isinstance(size, (list, tuple)) and len(size) == 2 and all(isinstance(s, int) and s > 0 for s in size)):
        raise ValueError(f"config.json has quantization_config.weight_block_size={size!r}; expected two block "
                         "sizes, e.g. [128, 128]")
    return int(size[0]), int(size[1])


def dequantize(w: np.ndarray, scale_inv: np.ndarray, block: tuple[int, int]) -> np.ndarray:
    """``w [r, c]`` (float8) times its block's ``scale_inv [ceil(r / br), ceil(c / bc)]`` -> float32."""
    w = np.asarray(w)
    r, c = w.shape[-2:]
    br, bc = block
    want = (-(-r // br), -(-c // bc))
    s = np.asarray(scale_inv, np.float32)
    if s.shape[-2:] != want:
        raise ValueError(f"scale_inv of shape {s.shape} does not cover a {w.shape} weight in {br}x{bc} blocks "
                         f"(expected {want})")
    full = np.repeat(np.repeat(s, br, axis=-2), bc, axis=-1)[..., :r, :c]
    return w.astype(np.float32) * full


class Fp8Weights(Mapping):
    """A lazy weights mapping (``LazyWeights``) with every FP8 tensor delivered as bfloat16 (its
    ``_scale_inv`` companions hidden); ``shape`` / ``dtype`` without reading, like the mapping it wraps."""

    def __init__(self, weights, block: tuple[int, int]):
        self.inner, self.block = weights, block
        self.scaled = {n[: -len(SCALE_SUFFIX)] for n in weights if n.endswith(SCALE_SUFFIX)}
        orphans = sorted(n for n in self.scaled if n not in weights)
        if orphans:
            raise ValueError(f"FP8 checkpoint has scales without their weights: {orphans[:4]}")
        wrong = sorted(n for n in self.scaled if self._stored(n) not in _FORMATS.values())
        if wrong:
            raise ValueError(f"FP8 checkpoint: {wrong[0]!r} has a {SCALE_SUFFIX} companion but is stored as "
                             f"{self._stored(wrong[0])}, not float8")

    def _stored(self, name: str) -> np.dtype:
        w = self.inner
        return np.dtype(w.dtype(name) if hasattr(w, "dtype") else np.asarray(w[name]).dtype)

    def __getitem__(self, name: str) -> np.ndarray:
        if name.endswith(SCALE_SUFFIX) and name[: -len(SCALE_SUFFIX)] in self.scaled:
            raise KeyError(name)
        w = self.inner[name]
        if name not in self.scaled:
            return w
        try:
            out = dequantize(w, self.inner[name + SCALE_SUFFIX], self.block)
        except ValueError as e:
            raise ValueError(f"FP8 tensor {name!r}: {e}") from None
        return out.astype(ml_dtypes.bfloat16)

    def __iter__(self) -> Iterator[str]:
        return (n for n in self.inner if not (n.endswith(SCALE_SUFFIX) and n[: -len(SCALE_SUFFIX)] in self.scaled))

    def __len__(self) -> int:
        return len(self.inner) - len(self.scaled)

    def __contains__(self, name) -> bool:
        return name in self.inner and not (isinstance(name, str) and name.endswith(SCALE_SUFFIX)
                                           and name[: -len(SCALE_SUFFIX)] in self.scaled)

    def shape(self, name: str) -> tuple[int, ...]:
        return tuple(self.inner.shape(name))

    def dtype(self, name: str) -> np.dtype:
        return np.dtype(ml_dtypes.bfloat16) if name in self.scaled else np.dtype(self.inner.dtype(name))

    def dtypes(self) -> set[np.dtype]:
        return {self.dtype(n) for n in self}


def fp8_view(hf: Mapping, weights):
    """``weights`` itself, or an :class:`Fp8Weights` view when ``config.json`` says the checkpoint is
    block-scaled FP8 (a ValueError when it says so but holds no scales). Other quantisation methods
    pass through (their family's converter reads or refuses them)."""
    if not is_fp8(hf):
        return weights
    block = block_size(hf)
    view = Fp8Weights(weights, block)
    if not view.scaled:
        raise ValueError("config.json says quantization_config fp8, but no tensor has a "
                         f"{SCALE_SUFFIX} companion")
    return view
