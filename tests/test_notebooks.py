"""The tutorial notebooks execute without errors (the "notebooks run in CI" requirement).

Each notebook runs in a fresh kernel in a temporary working directory, on a copy: the notebooks in
the repository (committed with their outputs) are not modified. The kernel is "python3", which
resolves to the Python running the tests (ipykernel's own kernelspec in this environment); user
kernels are ignored by pointing the Jupyter data directory at an empty temporary folder.
"""

import sys
from pathlib import Path

import pytest

nbformat = pytest.importorskip("nbformat")
nbclient = pytest.importorskip("nbclient")

NOTEBOOKS = Path(__file__).resolve().parent.parent / "notebooks"
CELL_TIMEOUT = 600  # seconds per cell; the whole of a notebook takes about a minute on 2 cores


@pytest.fixture
def clean_jupyter_env(tmp_path, monkeypatch):
    """Hide kernels registered by the user, so "python3" is this environment's Python."""
    monkeypatch.setenv("JUPYTER_DATA_DIR", str(tmp_path / "jupyter_data"))
    monkeypatch.delenv("JUPYTER_PATH", raising=False)
    monkeypatch.delenv("MPLBACKEND", raising=False)  # the kernel uses the inline backend
    from jupyter_client.kernelspec import KernelSpecManager

    spec = KernelSpecManager().get_kernel_spec("python3")
    # ipykernel's spec says "python"; jupyter_client launches it with sys.executable
    assert spec.argv[0] in {"python", "python3", sys.executable}, spec.argv
    return tmp_path


@pytest.mark.parametrize("name", ["01_scvi_batch_correction.ipynb", "02_totalvi_citeseq.ipynb"])
def test_notebook_executes(name, clean_jupyter_env):
    path = NOTEBOOKS / name
    if not path.exists():
        pytest.skip(f"{name} is not written yet")
    nb = nbformat.read(path, as_version=4)
    workdir = clean_jupyter_env / "work"
    workdir.mkdir()
    client = nbclient.NotebookClient(
        nb,
        kernel_name="python3",
        timeout=CELL_TIMEOUT,
        resources={"metadata": {"path": str(workdir)}},
    )
    client.execute()  # raises CellExecutionError on the first failing cell
    errors = [
        out
        for cell in nb.cells
        if cell.cell_type == "code"
        for out in cell.get("outputs", [])
        if out.get("output_type") == "error"
    ]
    assert not errors
    assert nb.cells[0].cell_type == "markdown" and nb.cells[0].source.startswith("# ")
    assert not list(workdir.iterdir()), "notebooks must write only into temporary folders"
