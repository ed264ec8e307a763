"""The quickstart notebook runs top to bottom (with its settings made tiny)."""

from __future__ import annotations

from pathlib import Path

import nbformat
from nbclient import NotebookClient

ROOT = Path(__file__).resolve().parents[1]


def test_quickstart_notebook_executes(tmp_path):
    notebook = nbformat.read(ROOT / "notebooks" / "quickstart.ipynb", as_version=4)
    settings = next(cell for cell in notebook.cells if cell.cell_type == "code")
    settings.source += ("\nBENCHMARK = 'metaworld:drawer-open-v3'\nEPISODES_PER_TASK = 2\nTRAIN_STEPS = 5\n"
                        "EVAL_EPISODES = 1\n")
    client = NotebookClient(notebook, timeout=600, kernel_name="python3",
                            resources={"metadata": {"path": str(tmp_path)}})
    client.execute()
    assert (tmp_path / "quickstart" / "eval" / "success.png").exists()
    assert (tmp_path / "quickstart" / "open_drawer.gif").exists()
