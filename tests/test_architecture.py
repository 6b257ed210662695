"""Imports run one way (ARCHITECTURE.md), checked from the source with `ast`."""
import ast
import os

import pytest

ROOT = os.path.join(os.path.dirname(__file__), "..", "deediff_jax")

# package prefix -> prefixes it must not import (anything above it in the direction of data)
RULES = {
    "deediff_jax.config": ["deediff_jax.model", "deediff_jax.diffusion", "deediff_jax.data", "deediff_jax.train",
                           "deediff_jax.eval", "deediff_jax.early_exit", "deediff_jax.sampling",
                           "deediff_jax.sample", "deediff_jax.main", "deediff_jax.convert"],
    "deediff_jax.diffusion": ["deediff_jax.model", "deediff_jax.early_exit", "deediff_jax.sampling",
                              "deediff_jax.train", "deediff_jax.eval", "deediff_jax.sample", "deediff_jax.main"],
    "deediff_jax.model": ["deediff_jax.train", "deediff_jax.eval", "deediff_jax.data", "deediff_jax.main",
                          "deediff_jax.sample", "deediff_jax.sampling", "deediff_jax.early_exit",
                          "deediff_jax.diffusion", "deediff_jax.convert"],
    "deediff_jax.train": ["deediff_jax.eval", "deediff_jax.sampling", "deediff_jax.sample",
                          "deediff_jax.early_exit", "deediff_jax.main"],
    "deediff_jax.early_exit": ["deediff_jax.sampling", "deediff_jax.sample", "deediff_jax.eval",
                               "deediff_jax.train", "deediff_jax.main"],
    "deediff_jax.sampling": ["deediff_jax.sample", "deediff_jax.eval", "deediff_jax.train", "deediff_jax.main"],
    "deediff_jax.data": ["deediff_jax.train", "deediff_jax.sampling", "deediff_jax.sample",
                         "deediff_jax.early_exit", "deediff_jax.main"],
}


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


@pytest.fixture(scope="module")
def graph():
  mods = _modules()
  return {m: _imports(p, m, mods) for m, p in mods.items()}


def test_no_import_runs_against_the_direction_of_data(graph):
  bad = [f"{m} -> {i}" for m, imps in graph.items() for prefix, banned in RULES.items() if _under(m, prefix)
         for i in imps if any(_under(i, b) for b in banned) and not _under(i, prefix)]
  assert not bad, "backward imports: " + ", ".join(sorted(bad))


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
  # A package's __init__ re-exporting its own submodules is not a cycle of data.
  cycles = [c for c in cycles if not all(_under(x, c.split(" -> ")[0]) for x in c.split(" -> "))]
  assert not cycles, "import cycles: " + "; ".join(cycles)


def test_the_rules_can_fail(graph):
  """A planted backward import is caught (the check is not vacuous)."""
  planted = dict(graph)
  planted["deediff_jax.diffusion.samplers"] = graph["deediff_jax.diffusion.samplers"] | {"deediff_jax.early_exit"}
  with pytest.raises(AssertionError, match="deediff_jax.diffusion.samplers -> deediff_jax.early_exit"):
    test_no_import_runs_against_the_direction_of_data(planted)
