"""The Colab quickstart runs top to bottom (tiny settings via DEEDIFF_NOTEBOOK_QUICK=1)."""
import pathlib

import nbformat
from nbclient import NotebookClient

ROOT = pathlib.Path(__file__).resolve().parents[1]


def test_quickstart_notebook_executes(tmp_path, monkeypatch):
  monkeypatch.setenv("DEEDIFF_NOTEBOOK_QUICK", "1")
  monkeypatch.setenv("DEEDIFF_NOTEBOOK_WORKDIR", str(tmp_path / "work"))
  nb = nbformat.read(ROOT / "notebooks" / "quickstart.ipynb", as_version=4)
  NotebookClient(nb, timeout=600, kernel_name="python3",
                 resources={"metadata": {"path": str(ROOT)}}).execute()  # raises on any cell error
  outputs = [o for c in nb.cells if c.cell_type == "code" for o in c.get("outputs", [])]
  text = "".join(o.get("text", "") for o in outputs)
  assert "speedup" in text and "layers run" in text
  # The grids, the heatmap and the Pareto plot were displayed inline as images.
  assert sum("image/png" in o.get("data", {}) for o in outputs) >= 4
  assert (tmp_path / "work" / "sweep" / "sweep.json").exists()


def test_notebook_is_generated_from_its_script():
  """quickstart.ipynb must be what make_quickstart.py writes (edit the script, not the JSON)."""
  import tempfile
  nb_path = ROOT / "notebooks" / "quickstart.ipynb"
  committed = nbformat.read(nb_path, as_version=4)
  script = (ROOT / "notebooks" / "make_quickstart.py").read_text()
  ns = {"__file__": str(pathlib.Path(tempfile.mkdtemp()) / "make_quickstart.py"), "__name__": "nb"}
  exec(compile(script, "make_quickstart.py", "exec"), ns)
  fresh = nbformat.read(pathlib.Path(ns["__file__"]).with_name("quickstart.ipynb"), as_version=4)
  assert [c.source for c in fresh.cells] == [c.source for c in committed.cells]


def test_notebook_text_matches_its_code():
  """The variable the first cell's text names is the one its code reads, the times are stated, and
  it ends with the recommendation (tune)."""
  nb = nbformat.read(ROOT / "notebooks" / "quickstart.ipynb", as_version=4)
  intro, setup = nb.cells[0].source, nb.cells[1].source
  assert "`REPO_URL`" in intro and "`DEEDIFF_REPO_URL`" in intro
  assert 'REPO_URL = ""' in setup and 'os.environ.get("DEEDIFF_REPO_URL"' in setup
  assert "minutes" in intro and "sweep" in intro
  assert nb.cells[-1].cell_type == "markdown" and "--mode tune" in nb.cells[-1].source
