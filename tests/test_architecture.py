"""Imports run one way, as ARCHITECTURE.md's table says: checked from the source with `ast`.

The table in ARCHITECTURE.md is the rule. Its rows are units (a top-level module `name.py` or a
package `name/`) from the bottom up; a unit may import only the units above it, and its "imports"
column lists exactly the units it imports. Imports inside one unit are free (except cycles).
"""
import ast
import os
import re

import pytest

REPO = os.path.join(os.path.dirname(__file__), "..")
ROOT = os.path.join(REPO, "deediff_jax")


def _modules() -> dict:
  out = {}
  for d, _, files in os.walk(ROOT):
    for f in files:
      if f.endswith(".py"):
        path = os.path.join(d, f)
        rel = os.path.relpath(path, os.path.dirname(ROOT))[:-3].replace(os.sep, ".")
        out[rel[:-9] if rel.endswith(".__init__") else rel] = path
  return out


def _imports(path: str, name: str, known) -> set:
  found = set()
  is_pkg = path.endswith("__init__.py")
  for node in ast.walk(ast.parse(open(path).read())):  # function-level imports count too
    if isinstance(node, ast.Import):
      found |= {a.name for a in node.names}
    elif isinstance(node, ast.ImportFrom):
      base = node.module or ""
      if node.level:
        parts = name.split(".")
        parts = parts[: len(parts) - node.level + (1 if is_pkg else 0)]
        base = ".".join(parts + ([base] if base else []))
      found.add(base)
      found |= {f"{base}.{a.name}" for a in node.names}
  return {m for m in found if m in known and m != name}


def _under(module: str, prefix: str) -> bool:
  return module == prefix or module.startswith(prefix + ".")


def unit_of(module: str):
  """deediff_jax.eval.sweep -> 'eval/', deediff_jax.sampling -> 'sampling.py'; the package root
  (deediff_jax/__init__.py: only the version) -> None."""
  parts = module.split(".")
  if len(parts) == 1:
    return None
  if os.path.isdir(os.path.join(ROOT, parts[1])):
    return parts[1] + "/"
  return parts[1] + ".py"


def architecture_table() -> list:
  """[(unit, {units it imports})] from ARCHITECTURE.md, bottom row first."""
  text = open(os.path.join(REPO, "ARCHITECTURE.md")).read()
  rows = []
  for line in text.splitlines():
    m = re.match(r"\|\s*`([\w]+(?:\.py|/))`\s*\|.*\|(.*)\|\s*$", line)
    if m:
      rows.append((m.group(1), set(re.findall(r"`([\w]+(?:\.py|/))`", m.group(2)))))
  return rows


@pytest.fixture(scope="module")
def graph():
  mods = _modules()
  return {m: _imports(p, m, mods) for m, p in mods.items()}


def _unit_imports(graph) -> dict:
  out = {}
  for m, imps in graph.items():
    src = unit_of(m)
    if src is None:
      continue
    out.setdefault(src, set())
    out[src] |= {unit_of(i) for i in imps if unit_of(i) not in (None, src)}
  return out


def test_every_unit_has_a_row(graph):
  rows = [u for u, _ in architecture_table()]
  assert len(rows) == len(set(rows)), "a unit appears twice in ARCHITECTURE.md"
  missing = sorted(set(_unit_imports(graph)) - set(rows))
  assert not missing, f"add a row to ARCHITECTURE.md's table for: {', '.join(missing)}"


def test_no_import_runs_against_the_direction_of_data(graph):
  order = {u: i for i, (u, _) in enumerate(architecture_table())}
  bad = sorted(f"{m} -> {i}" for m, imps in graph.items() for i in imps
               if unit_of(m) in order and unit_of(i) in order and order[unit_of(i)] > order[unit_of(m)])
  assert not bad, "backward imports: " + ", ".join(bad)


def test_the_table_lists_exactly_what_each_unit_imports(graph):
  table = dict(architecture_table())
  wrong = [f"{u}: the code imports {sorted(got)}, ARCHITECTURE.md says {sorted(table[u])} (update its row)"
           for u, got in sorted(_unit_imports(graph).items()) if u in table and got != table[u]]
  assert not wrong, "; ".join(wrong)


def test_no_import_cycles(graph):
  state, cycles = {}, []

  def visit(m, stack):
    state[m] = 1
    for n in sorted(graph[m]):
      if state.get(n) == 1:
        cycles.append(" -> ".join(stack[stack.index(n):] + [n]))
      elif n not in state:
        visit(n, stack + [n])
    state[m] = 2

  for m in sorted(graph):
    if m not in state:
      visit(m, [m])
  # A package's __init__ re-exporting its own submodules is not a cycle of data: every module of
  # such a cycle lies under the package (its shortest member), wherever the search entered it.
  def reexport(c):
    nodes = c.split(" -> ")
    return all(_under(x, min(nodes, key=len)) for x in nodes)

  cycles = [c for c in cycles if not reexport(c)]
  assert not cycles, "import cycles: " + "; ".join(cycles)


def test_the_rules_can_fail(graph):
  """A planted backward import is caught (the check is not vacuous)."""
  planted = dict(graph)
  planted["deediff_jax.diffusion.samplers"] = graph["deediff_jax.diffusion.samplers"] | {"deediff_jax.early_exit"}
  with pytest.raises(AssertionError, match="deediff_jax.diffusion.samplers -> deediff_jax.early_exit"):
    test_no_import_runs_against_the_direction_of_data(planted)
  with pytest.raises(AssertionError, match="diffusion/: the code imports"):
    test_the_table_lists_exactly_what_each_unit_imports(planted)
