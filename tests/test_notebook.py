from pathlib import Path

import nbformat
from nbclient import NotebookClient

NOTEBOOK = Path(__file__).parents[1] / "notebooks" / "quickstart.ipynb"


def test_quickstart_notebook_runs_top_to_bottom(tmp_path):
    nb = nbformat.read(NOTEBOOK, as_version=4)
    NotebookClient(nb, timeout=600, kernel_name="python3", resources={"metadata": {"path": str(tmp_path)}}).execute()
    outputs = [o for cell in nb.cells if cell.cell_type == "code" for o in cell.outputs]
    assert not [o for o in outputs if o.output_type == "error"]
    text = "".join(o.get("text", "") for o in outputs if o.output_type == "stream")
    assert "baseline" in text and "MMPareto" in text and "OGM-GE" in text  # the results table was printed
    assert sum("image/png" in o.get("data", {}) for o in outputs) >= 2  # both figures were drawn
    assert (tmp_path / "quickstart_runs" / "mmpareto" / "version_0" / "metrics.csv").exists()
