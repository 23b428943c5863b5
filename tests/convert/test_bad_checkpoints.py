"""Damaged or mismatched Hugging Face directories through ``moejax convert``: one ``error:`` line
naming the tensor or the file, exit code 2, never a traceback (issue 18)."""

import json
import os
import shutil

import numpy as np
import pytest

pytest.importorskip("torch")
safetensors_numpy = pytest.importorskip("safetensors.numpy")

from moejax.main import main  # noqa: E402
from tests.convert.test_hf_mixtral import tiny_mixtral  # noqa: E402


@pytest.fixture(scope="module")
def saved(tmp_path_factory):
    d = tmp_path_factory.mktemp("hf") / "mixtral"
    tiny_mixtral().save_pretrained(d, safe_serialization=True)
    return d


def _rewrite(d, edit):
    f = os.path.join(d, "model.safetensors")
    tensors = safetensors_numpy.load_file(f)
    edit(tensors)
    safetensors_numpy.save_file(tensors, f, metadata={"format": "pt"})


def _expert(tensors, i):
    return next(k for k in sorted(tensors) if f"experts.{i}." in k and k.endswith("w1.weight"))


def wrong_shape(d):
    def edit(t):
        k = "model.layers.0.self_attn.q_proj.weight"
        t[k] = np.zeros((t[k].shape[0] + 16, t[k].shape[1]), t[k].dtype)
    _rewrite(d, edit)
    return "HF tensor 'model.layers.0.self_attn.q_proj.weight' has shape (48, 32)"


def transposed_expert(d):
    def edit(t):
        k = _expert(t, 1)
        t[k] = np.ascontiguousarray(t[k].T)
    _rewrite(d, edit)
    return "experts.1.w1.weight' converts to shape (48, 32) where its siblings"


def missing_field(d):
    cfg = json.loads((d / "config.json").read_text())
    del cfg["hidden_size"]
    (d / "config.json").write_text(json.dumps(cfg))
    return "config.json lacks the field 'hidden_size'"


def truncated(d):
    f = d / "model.safetensors"
    with open(f, "r+b") as fh:
        fh.truncate(int(os.path.getsize(f) * 0.6))
    return "model.safetensors' is truncated or corrupt: tensor"


def bad_json(d):
    (d / "config.json").write_text('{"model_type": "mixtral", "hidden_size": 32,,}')
    return "config.json' is not valid JSON (Expecting property name"


def bad_header(d):
    f = d / "model.safetensors"
    raw = f.read_bytes()
    f.write_bytes(raw[:8] + b"\xff" * 16 + raw[24:])
    return "model.safetensors' is not a safetensors file (its header is not JSON)"


@pytest.mark.parametrize("damage", [wrong_shape, transposed_expert, missing_field, truncated, bad_json, bad_header])
def test_a_damaged_hf_directory_is_one_line_naming_the_cause(saved, tmp_path, capsys, damage):
    d = tmp_path / "hf"
    shutil.copytree(saved, d)
    want = damage(d)
    rc = main(["convert", "--hf_dir", str(d), "--out", str(tmp_path / "out")])
    err = capsys.readouterr().err
    assert rc == 2 and err.startswith("error:") and len(err.strip().splitlines()) == 1, err
    assert want in err, err
    assert not os.path.exists(tmp_path / "out" / "checkpoints")
