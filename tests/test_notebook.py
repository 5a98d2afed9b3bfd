"""The quickstart notebook runs from top to bottom with the installed version (and so never rots)."""

from pathlib import Path

import nbformat
import pytest
from nbclient import NotebookClient

NOTEBOOK = Path(__file__).resolve().parents[1] / "examples" / "quickstart.ipynb"


@pytest.mark.slow
def test_quickstart_notebook_runs(data_dir, tmp_path, monkeypatch):
    monkeypatch.setenv("FACTEDIT_DATA_DIR", str(data_dir))
    notebook = nbformat.read(NOTEBOOK, as_version=4)
    NotebookClient(notebook, timeout=900, kernel_name="python3", resources={"metadata": {"path": str(tmp_path)}}).execute()
    outputs = "".join(out.get("text", "") for cell in notebook.cells if cell.cell_type == "code"
                      for out in cell.get("outputs", []))
    assert "converged" in outputs and "p(Rome)" in outputs
    assert (tmp_path / "eiffel-rome.safetensors").is_file() and (tmp_path / "quickstart_mlp.png").is_file()
    assert not any(out.get("output_type") == "error" for cell in notebook.cells for out in cell.get("outputs", []))
