"""Execute every notebook top to bottom on CPU (8 emulated devices), as a reader would in Colab."""

import glob
import os

import pytest

NOTEBOOKS = sorted(glob.glob(os.path.join(os.path.dirname(__file__), "..", "notebooks", "*.ipynb")))


@pytest.mark.slow
@pytest.mark.parametrize("path", NOTEBOOKS, ids=[os.path.basename(p) for p in NOTEBOOKS])
def test_notebook_runs(path, tmp_path, monkeypatch):
    """Every cell runs without an error; the training notebooks at a quarter of their steps (what they
    show is checked, at full length, by tests/training: test_end_to_end.py, test_distill.py, ...)."""
    monkeypatch.setenv("MOEJAX_NOTEBOOK_SCALE", "0.25")
    import nbformat
    from nbclient import NotebookClient

    nb = nbformat.read(path, as_version=4)
    assert all(not c.get("outputs") for c in nb.cells if c.cell_type == "code"), "commit notebooks without outputs"
    env_dir = str(tmp_path)
    client = NotebookClient(nb, timeout=900, kernel_name="python3", resources={"metadata": {"path": env_dir}})
    client.execute()
    errors = [o for c in nb.cells if c.cell_type == "code" for o in c.get("outputs", [])
              if o.get("output_type") == "error"]
    assert not errors, errors
