"""``moejax export``: a moejax checkpoint -> a Hugging Face ``save_pretrained`` directory through
the one family that represents the model (``moejax.convert.to_hf``). Round trips through the CLI
reload in ``transformers`` with the original's logits; what no family represents (quantized or
merged experts, OpenMoE) is a one-line refusal."""

import json

import numpy as np
import pytest

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")

from flax import nnx  # noqa: E402

from moejax.checkpoint import save  # noqa: E402
from moejax.convert import exporter  # noqa: E402
from moejax.main import main  # noqa: E402
from moejax.models import build_model  # noqa: E402
from moejax.models.registry import get_config  # noqa: E402
from tests.convert.test_hf_mixtral import IDS, hf_logits, tiny_mixtral  # noqa: E402


def test_convert_then_export_round_trips_through_the_cli(tmp_path, capsys):
    hf = tiny_mixtral()
    hf.save_pretrained(tmp_path / "hf", safe_serialization=True)
    assert main(["convert", "--hf_dir", str(tmp_path / "hf"), "--out", str(tmp_path / "ckpt")]) == 0
    assert main(["export", "--checkpoint", str(tmp_path / "ckpt"), "--out", str(tmp_path / "out")]) == 0
    assert "model_type 'mixtral'" in capsys.readouterr().out
    back = transformers.AutoModelForCausalLM.from_pretrained(str(tmp_path / "out"), attn_implementation="eager")
    np.testing.assert_allclose(hf_logits(back.eval(), IDS), hf_logits(hf, IDS), atol=1e-5, rtol=1e-5)
    args = ["export", "--checkpoint", str(tmp_path / "ckpt"), "--out", str(tmp_path / "bf16"), "--dtype", "bfloat16"]
    assert main(args) == 0
    assert json.loads((tmp_path / "bf16" / "config.json").read_text())["dtype"] == "bfloat16"
    # the output directory already holds a model: refused, nothing overwritten
    before = (tmp_path / "out" / "config.json").read_text()
    assert main(["export", "--checkpoint", str(tmp_path / "ckpt"), "--out", str(tmp_path / "out")]) == 2
    assert "already holds a config.json" in capsys.readouterr().err
    assert (tmp_path / "out" / "config.json").read_text() == before


@pytest.mark.parametrize("step,args,message", [
    ("merge", ["--num_experts", "2"], "moe.expert_map=(0, 0, 1, 1) (HF would give None)"),
    ("quantize", ["--bits", "8"], "8-bit quantized experts"),
], ids=["merged", "quantized"])
def test_merged_or_quantized_models_are_refused_by_name(tmp_path, capsys, step, args, message):
    """Merged to two experts a Mixtral keeps its router over the original four experts, mapped onto
    two (an expert map); quantized experts are int8 codes and scales: no HF family holds either, so
    export names why instead of writing a router or experts of the wrong shape."""
    src = str(tmp_path / "src")
    save(build_model(get_config("tiny_mixtral"), nnx.Rngs(0)), src)
    assert main([step, "--checkpoint", src, *args, "--out", str(tmp_path / "m")]) == 0
    capsys.readouterr()
    assert main(["export", "--checkpoint", str(tmp_path / "m"), "--out", str(tmp_path / "out")]) == 2
    assert message in capsys.readouterr().err
    assert not (tmp_path / "out").exists()


def test_what_no_family_represents_is_refused():
    with pytest.raises(ValueError, match="no Hugging Face family represents this DecoderConfig: hf_mixtral: "):
        exporter(get_config("tiny_openmoe"))
    with pytest.raises(ValueError, match="hf_mixtral: takes no expert_capacity"):
        exporter(get_config("tiny_mixtral"), expert_capacity=8)
    assert exporter(get_config("tiny_switch"), expert_capacity=64).__name__ == "moejax.convert.hf_switch"
