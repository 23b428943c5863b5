"""Read and write Hugging Face ``save_pretrained`` directories as numpy (never unpickles)."""

from __future__ import annotations

import json
import os

import numpy as np


def read_hf_config(path: str) -> dict:
    """The ``config.json`` of a ``save_pretrained`` directory as a dict."""
    cfg_path = os.path.join(path, "config.json")
    if not os.path.exists(cfg_path):
        raise ValueError(f"{path!r} has no config.json; expected a Hugging Face save_pretrained directory")
    with open(cfg_path) as f:
        return json.load(f)


def load_hf_dir(path: str) -> tuple[dict, dict[str, np.ndarray]]:
    """``(config.json dict, {weight name: numpy array})`` from a ``save_pretrained`` directory.

    Reads ``model.safetensors`` or the shards listed in ``model.safetensors.index.json``.
    PyTorch ``.bin`` checkpoints are refused (they would need unpickling).
    """
    from safetensors.flax import load_file  # handles bfloat16, unlike the numpy loader

    config = read_hf_config(path)
    index = os.path.join(path, "model.safetensors.index.json")
    single = os.path.join(path, "model.safetensors")
    if os.path.exists(index):
        with open(index) as f:
            files = sorted(set(json.load(f)["weight_map"].values()))
    elif os.path.exists(single):
        files = ["model.safetensors"]
    else:
        bins = [n for n in os.listdir(path) if n.endswith(".bin")]
        hint = " (found PyTorch .bin files, which moejax never unpickles; re-save with safe_serialization=True)" \
            if bins else ""
        raise ValueError(f"no model.safetensors or model.safetensors.index.json in {path!r}{hint}")
    weights: dict[str, np.ndarray] = {}
    for name in files:
        weights.update({k: np.asarray(v) for k, v in load_file(os.path.join(path, name)).items()})
    return config, weights


def save_hf_dir(path: str, config: dict, weights: dict[str, np.ndarray]) -> None:
    """Write ``config.json`` and ``model.safetensors`` (contiguous numpy arrays)."""
    from safetensors.numpy import save_file

    os.makedirs(path, exist_ok=True)
    with open(os.path.join(path, "config.json"), "w") as f:
        json.dump(config, f, indent=2)
    save_file({k: np.ascontiguousarray(v) for k, v in weights.items()}, os.path.join(path, "model.safetensors"),
              metadata={"format": "pt"})
