"""The walkthrough notebook runs headless, top to bottom, without an error."""

from pathlib import Path

import nbformat
import pytest
from nbclient import NotebookClient

pytestmark = pytest.mark.integration
NOTEBOOK = Path(__file__).resolve().parents[2] / "notebooks" / "walkthrough.ipynb"


def test_the_walkthrough_executes_and_is_committed_without_outputs():
    notebook = nbformat.read(NOTEBOOK, as_version=4)
    assert all(not cell.get("outputs") for cell in notebook.cells if cell.cell_type == "code")  # cleared in git
    NotebookClient(notebook, timeout=600, kernel_name="python3").execute()  # raises on any cell error
    outputs = [o for cell in notebook.cells if cell.cell_type == "code" for o in cell.outputs]
    assert any("image/png" in o.get("data", {}) for o in outputs)  # the overlays and the AP plot rendered
    assert any("text/markdown" in o.get("data", {}) for o in outputs)  # the report table
