"""Read and write Hugging Face ``save_pretrained`` directories (safetensors only; never unpickles).

Reading memory-maps every shard: :func:`open_hf_dir` returns a lazy ``{name: array}`` mapping whose
values are read-only ``numpy.memmap`` views into the files (bfloat16 / float8 through ``ml_dtypes``),
so nothing is read until a converter slices a tensor, and the page cache, not the Python heap,
holds what was read. Writing streams tensor by tensor (:class:`ShardedWriter`): the header is
computed from the shapes first, then each tensor's bytes are appended, so the host holds one tensor
(or one stacked parameter) at a time, never the model. The format: an 8-byte little-endian header
length, a JSON header ``{name: {"dtype", "shape", "data_offsets": [begin, end]}}``, the raw bytes.
"""

from __future__ import annotations

import json
import os
import struct
from collections.abc import Iterator, Mapping

import ml_dtypes
import numpy as np

_DTYPES = {
    "BOOL": np.dtype(bool), "U8": np.dtype(np.uint8), "I8": np.dtype(np.int8), "U16": np.dtype(np.uint16),
    "I16": np.dtype(np.int16), "U32": np.dtype(np.uint32), "I32": np.dtype(np.int32), "U64": np.dtype(np.uint64),
    "I64": np.dtype(np.int64), "F16": np.dtype(np.float16), "F32": np.dtype(np.float32),
    "F64": np.dtype(np.float64), "BF16": np.dtype(ml_dtypes.bfloat16),
    "F8_E4M3": np.dtype(ml_dtypes.float8_e4m3fn), "F8_E5M2": np.dtype(ml_dtypes.float8_e5m2),
}
_NAMES = {v: k for k, v in _DTYPES.items()}
INDEX_FILE = "model.safetensors.index.json"
SINGLE_FILE = "model.safetensors"
#: Default shard size of :class:`ShardedWriter` (transformers' ``max_shard_size`` default in 4.x).
MAX_SHARD_BYTES = 5 * 1024 ** 3


def read_hf_config(path: str) -> dict:
    """The ``config.json`` of a ``save_pretrained`` directory as a dict."""
    cfg_path = os.path.join(path, "config.json")
    if not os.path.exists(cfg_path):
        raise ValueError(f"{path!r} has no config.json; expected a Hugging Face save_pretrained directory")
    with open(cfg_path) as f:
        try:
            cfg = json.load(f)
        except json.JSONDecodeError as e:
            raise ValueError(f"{cfg_path!r} is not valid JSON ({e.msg} at line {e.lineno}, column {e.colno})") from None
    if not isinstance(cfg, dict):
        raise ValueError(f"{cfg_path!r} is not a config object (a JSON {type(cfg).__name__})")
    return cfg


def read_header(file: str) -> tuple[dict, int]:
    """``(header without __metadata__, byte offset of the data)`` of one safetensors file."""
    with open(file, "rb") as f:
        raw = f.read(8)
        if len(raw) != 8:
            raise ValueError(f"{file!r} is not a safetensors file (shorter than its 8-byte header length)")
        (n,) = struct.unpack("<Q", raw)
        if n > os.path.getsize(file) - 8:
            raise ValueError(f"{file!r} is not a safetensors file (header length {n} exceeds the file)")
        try:
            header = json.loads(f.read(n))
        except (json.JSONDecodeError, UnicodeDecodeError):
            raise ValueError(f"{file!r} is not a safetensors file (its header is not JSON)") from None
    if not isinstance(header, dict):
        raise ValueError(f"{file!r} is not a safetensors file (its header is not a JSON object)")
    header.pop("__metadata__", None)
    data = os.path.getsize(file) - 8 - n
    for name, h in header.items():
        if not isinstance(h, dict) or not {"dtype", "shape", "data_offsets"} <= set(h):
            raise ValueError(f"{file!r} is corrupt: header entry {name!r} lacks dtype / shape / data_offsets")
        if h["dtype"] not in _DTYPES:
            raise ValueError(f"{file!r}: tensor {name!r} has dtype {h['dtype']}; readable: {', '.join(_DTYPES)}")
        begin, end = h["data_offsets"]
        want = int(np.prod(h["shape"], dtype=np.int64)) * _DTYPES[h["dtype"]].itemsize
        if end > data or end - begin != want:
            raise ValueError(f"{file!r} is truncated or corrupt: tensor {name!r} ({h['dtype']}{h['shape']}) "
                             f"needs bytes [{begin}, {end}) of {data} data bytes")
    return header, 8 + n


def shard_files(path: str) -> list[str]:
    """The safetensors files of a ``save_pretrained`` directory (the index's shards, or the single file)."""
    index, single = os.path.join(path, INDEX_FILE), os.path.join(path, SINGLE_FILE)
    if os.path.exists(index):
        with open(index) as f:
            try:
                files = sorted(set(json.load(f)["weight_map"].values()))
            except (json.JSONDecodeError, KeyError, TypeError, AttributeError):
                raise ValueError(f"{index!r} is not a safetensors index (JSON with a weight_map)") from None
        gone = [n for n in files if not os.path.exists(os.path.join(path, n))]
        if gone:
            raise ValueError(f"{index!r} lists shard files that are not in {path!r}: {gone[:4]}")
        return files
    if os.path.exists(single):
        return [SINGLE_FILE]
    bins = [n for n in os.listdir(path) if n.endswith(".bin")]
    hint = " (found PyTorch .bin files, which moejax never unpickles; re-save with safe_serialization=True)" \
        if bins else ""
    raise ValueError(f"no {SINGLE_FILE} or {INDEX_FILE} in {path!r}{hint}")


class LazyWeights(Mapping):
    """``{HF weight name: read-only numpy.memmap}`` over the safetensors files of a directory.

    Each lookup maps just that tensor's bytes (a new ``np.memmap``): nothing is read until the
    array is, and once the caller drops it the pages leave the process (the page cache keeps them),
    so reading a checkpoint tensor by tensor never makes it resident as a whole.
    ``shape(name)`` / ``dtype(name)`` come from the headers without touching the data."""

    def __init__(self, path: str):
        self._where: dict[str, tuple[str, dict, int]] = {}
        for name in shard_files(path):
            file = os.path.join(path, name)
            header, start = read_header(file)
            for key, h in header.items():
                if key in self._where:
                    raise ValueError(f"weight {key!r} appears in two shards of {path!r}")
                self._where[key] = (file, h, start)

    def __getitem__(self, name: str) -> np.ndarray:
        file, h, start = self._where[name]
        shape = tuple(h["shape"])
        if 0 in shape:
            return np.zeros(shape, _DTYPES[h["dtype"]])
        m = np.memmap(file, dtype=_DTYPES[h["dtype"]], mode="r", offset=start + h["data_offsets"][0],
                      shape=shape or (1,))
        return m if shape else m.reshape(())

    def __iter__(self) -> Iterator[str]:
        return iter(self._where)

    def __len__(self) -> int:
        return len(self._where)

    def shape(self, name: str) -> tuple[int, ...]:
        return tuple(self._where[name][1]["shape"])

    def dtype(self, name: str) -> np.dtype:
        return _DTYPES[self._where[name][1]["dtype"]]

    def dtypes(self) -> set[np.dtype]:
        """Every dtype stored (to pick the checkpoint's parameter dtype)."""
        return {self.dtype(n) for n in self._where}


def open_hf_dir(path: str) -> tuple[dict, LazyWeights]:
    """``(config.json dict, lazy {name: memmap})`` of a ``save_pretrained`` directory.

    Reads ``model.safetensors`` or the shards listed in ``model.safetensors.index.json``; PyTorch
    ``.bin`` checkpoints are refused (they would need unpickling)."""
    config = read_hf_config(path)
    return config, LazyWeights(path)


def load_hf_dir(path: str) -> tuple[dict, dict[str, np.ndarray]]:
    """``(config.json dict, {name: numpy array})``: :func:`open_hf_dir` read whole into memory."""
    config, weights = open_hf_dir(path)
    return config, {k: np.array(v) for k, v in weights.items()}


class ShardedWriter:
    """Write tensors into ``model.safetensors`` (or ``model-0000i-of-0000n.safetensors`` shards and
    ``model.safetensors.index.json`` when the total exceeds ``max_shard_bytes``), one at a time.

    ``plan``: ``[(name, shape, dtype)]`` in the order :meth:`write` will be called; the headers are
    written from it up front, then each tensor's bytes as it arrives."""

    def __init__(self, path: str, plan: list[tuple[str, tuple[int, ...], np.dtype]],
                 max_shard_bytes: int = MAX_SHARD_BYTES):
        os.makedirs(path, exist_ok=True)
        self.path = path
        shards: list[list[tuple[str, tuple[int, ...], np.dtype]]] = [[]]
        size = 0
        for name, shape, dt in plan:
            n = int(np.prod(shape, dtype=np.int64)) * np.dtype(dt).itemsize
            if shards[-1] and size + n > max_shard_bytes:
                shards.append([])
                size = 0
            shards[-1].append((name, tuple(shape), np.dtype(dt)))
            size += n
        count = len(shards)
        self.files = [SINGLE_FILE] if count == 1 else \
            [f"model-{i + 1:05d}-of-{count:05d}.safetensors" for i in range(count)]
        self._order = [(name, i) for i, shard in enumerate(shards) for name, _, _ in shard]
        self._expect = {name: (shape, dt) for shard in shards for name, shape, dt in shard}
        self._next = 0
        self._handles = []
        total = 0
        for file, shard in zip(self.files, shards, strict=True):
            header, offset = {"__metadata__": {"format": "pt"}}, 0
            for name, shape, dt in shard:
                if dt not in _NAMES:
                    raise ValueError(f"cannot write {name!r} of dtype {dt} to safetensors")
                n = int(np.prod(shape, dtype=np.int64)) * dt.itemsize
                header[name] = {"dtype": _NAMES[dt], "shape": list(shape), "data_offsets": [offset, offset + n]}
                offset += n
            total += offset
            raw = json.dumps(header, separators=(",", ":")).encode()
            raw += b" " * (-len(raw) % 8)                    # 8-byte aligned data, as safetensors writes
            f = open(os.path.join(path, file), "wb")
            f.write(struct.pack("<Q", len(raw)) + raw)
            self._handles.append(f)
        if count > 1:
            with open(os.path.join(path, INDEX_FILE), "w") as f:
                json.dump({"metadata": {"total_size": total},
                           "weight_map": {name: self.files[i] for name, i in self._order}}, f, indent=2)

    def write(self, name: str, array) -> None:
        """Append ``array`` as tensor ``name`` (the next one of the plan)."""
        want, shard = self._order[self._next]
        if name != want:
            raise ValueError(f"ShardedWriter expected tensor {want!r} next, got {name!r}")
        array = np.asarray(array, order="C")
        shape, dt = self._expect[name]
        if tuple(array.shape) != shape or array.dtype != dt:
            raise ValueError(f"{name}: got {array.dtype}{list(array.shape)}, planned {dt}{list(shape)}")
        self._handles[shard].write(array.tobytes())
        self._next += 1

    def close(self, complete: bool = True) -> None:
        """Close the files; ``complete``: check every planned tensor was written (ValueError)."""
        for f in self._handles:
            f.close()
        if complete and self._next != len(self._order):
            raise ValueError(f"ShardedWriter closed after {self._next} of {len(self._order)} planned tensors")


def save_hf_dir(path: str, config: dict, weights: dict[str, np.ndarray]) -> None:
    """Write ``config.json`` and the safetensors file(s) of in-memory ``weights``."""
    os.makedirs(path, exist_ok=True)
    with open(os.path.join(path, "config.json"), "w") as f:
        json.dump(config, f, indent=2)
    w = ShardedWriter(path, [(k, np.shape(v), np.asarray(v).dtype) for k, v in weights.items()])
    for k, v in weights.items():
        w.write(k, v)
    w.close()
