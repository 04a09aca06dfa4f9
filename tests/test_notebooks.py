"""The notebooks in colab/: each runs top to bottom on a CPU runtime with its tiny settings
(executed here with nbclient, slow), and each is committed without outputs."""

import json
import time
from pathlib import Path

import pytest

COLAB = Path(__file__).resolve().parents[1] / "colab"
NOTEBOOKS = sorted(p.name for p in COLAB.glob("*.ipynb"))


@pytest.mark.parametrize("name", NOTEBOOKS)
def test_notebooks_are_committed_without_outputs(name):
    cells = json.loads((COLAB / name).read_text())["cells"]
    dirty = [i for i, c in enumerate(cells) if c["cell_type"] == "code" and (c["outputs"] or c["execution_count"])]
    assert not dirty, f"{name}: cells {dirty} hold outputs (clear them before committing)"


@pytest.mark.slow
@pytest.mark.parametrize("name", NOTEBOOKS)
def test_notebook_runs_top_to_bottom_on_cpu(name, tmp_path, monkeypatch):
    nbclient = pytest.importorskip("nbclient")
    nbformat = pytest.importorskip("nbformat")
    monkeypatch.delenv("XLA_FLAGS", raising=False)  # the kernel sees one CPU device, as on Colab (not the tests' 8)
    notebook = nbformat.read(COLAB / name, as_version=4)
    start = time.perf_counter()
    nbclient.NotebookClient(notebook, timeout=1800, kernel_name="python3",
                            resources={"metadata": {"path": str(COLAB)}}).execute()
    images = sum(1 for c in notebook.cells if c.cell_type == "code"
                 for o in c.get("outputs", []) if "image/png" in o.get("data", {}))
    print(f"{name}: {time.perf_counter() - start:.0f} s, {images} pictures")
    assert images >= 1  # every notebook shows its pictures
