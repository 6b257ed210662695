"""The docs live in the repository and stay true to the code: the generated config reference,
links that resolve, no pointer outside the repository, the license and citation files, and the
Python version stated once."""
import pathlib
import re
import sys

import pytest

ROOT = pathlib.Path(__file__).resolve().parents[1]
DOCS = ["design.md", "results.md", "latent.md", "text.md", "adadiff.md", "config.md"]
# Written by the exit-policy registry and the caching work; linked from here before they land.
PENDING = {"docs/caching.md"}


def _markdown_files():
  return [ROOT / "README.md", ROOT / "ARCHITECTURE.md"] + sorted((ROOT / "docs").glob("*.md"))


def test_config_reference_matches_the_schema():
  """docs/config.md's table is generated from base_config (python -m deediff_jax.config refreshes it)."""
  from deediff_jax.config import REFERENCE_FILE, REFERENCE_MARKERS, reference_markdown
  text = (ROOT / REFERENCE_FILE).read_text()
  start, end = REFERENCE_MARKERS
  assert text.split(start, 1)[1].split(end, 1)[0] == reference_markdown(), \
      "docs/config.md is stale: run python -m deediff_jax.config"
  # Every key of the schema appears, with a non-empty meaning.
  for line in reference_markdown().splitlines()[2:]:
    assert line.rstrip().endswith("|") and not line.rstrip().endswith("|  |"), line


def test_the_docs_exist():
  for name in DOCS:
    assert (ROOT / "docs" / name).stat().st_size > 500, name
  assert "Apache License" in (ROOT / "LICENSE").read_text() and "Version 2.0" in (ROOT / "LICENSE").read_text()


def test_citation_file():
  yaml = pytest.importorskip("yaml")
  cff = yaml.safe_load((ROOT / "CITATION.cff").read_text())
  assert cff["cff-version"] == "1.2.0" and cff["license"] == "Apache-2.0"
  assert cff["title"] and cff["message"] and cff["authors"]
  import tomllib
  assert cff["version"] == tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["version"]
  cited = [cff["preferred-citation"]] + cff["references"]
  titles = " ".join(r["title"] for r in cited)
  assert "Uncertainty-Aware Early Exiting" in titles and "All are Worth Words" in titles
  for ref in cited:
    assert ref["authors"] and ref["year"], ref["title"]


def _slug(heading: str) -> str:
  """GitHub's anchor for a Markdown heading."""
  s = re.sub(r"[^\w\- ]", "", heading.strip().lower())
  return s.replace(" ", "-")


def test_links_resolve():
  """Every relative link in README.md, ARCHITECTURE.md and docs/ names a file of the repository,
  and every #anchor into a Markdown file names one of its headings."""
  bad = []
  for md in _markdown_files():
    text = re.sub(r"```.*?```", "", md.read_text(), flags=re.S)
    for target in re.findall(r"\]\(([^)\s]+)\)", text):
      if re.match(r"[a-z]+:", target):
        continue
      path, _, anchor = target.partition("#")
      dest = (md.parent / path).resolve() if path else md
      rel = dest.relative_to(ROOT).as_posix() if dest.is_relative_to(ROOT) else str(dest)
      if not dest.exists():
        if rel not in PENDING:
          bad.append(f"{md.name}: {target}")
        continue
      if anchor and dest.suffix == ".md":
        headings = {_slug(h) for h in re.findall(r"^#+ (.+)$", dest.read_text(), re.M)}
        if anchor not in headings:
          bad.append(f"{md.name}: {target} (no such heading)")
  assert not bad, "broken links: " + "; ".join(bad)


def test_nothing_points_outside_the_repository():
  """No `../shared` path and no external design document in the package, configs and docs."""
  files = [p for d in ("deediff_jax", "configs") for p in (ROOT / d).rglob("*.py")] + _markdown_files()
  bad = [f"{p.relative_to(ROOT)}:{i}" for p in files
         for i, line in enumerate(p.read_text().splitlines(), 1)
         if "../shared" in line or re.search(r"DESIGN(\.md)? *§", line)]
  assert not bad, "points outside the repository: " + ", ".join(bad)


def test_python_version_is_stated_once_and_holds():
  import tomllib
  requires = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["requires-python"]
  assert requires == ">=3.11"
  assert sys.version_info >= (3, 11)
  readme = (ROOT / "README.md").read_text()
  assert re.findall(r"Python (3\.\d+)", readme) == ["3.11"], "the README names the Python version once"


def test_the_headline_study_tables_are_the_committed_files():
  """docs/results.md quotes the 13-block study's tables exactly as benchmarks/results_tables.py
  writes them from the committed JSON files (and the README its headline table), so a regenerated
  study cannot leave stale numbers."""
  import importlib.util
  spec = importlib.util.spec_from_file_location("results_tables", ROOT / "benchmarks" / "results_tables.py")
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  text = (ROOT / "docs" / "results.md").read_text()
  tables = module.tables(str(ROOT / "benchmarks" / "results" / "mnist13"))
  for name, table in tables.items():
    assert table in text, f"docs/results.md lacks the current {name} table: python benchmarks/results_tables.py benchmarks/results/mnist13"
  assert tables["headline"] in (ROOT / "README.md").read_text(), "README.md lacks the current headline table"
