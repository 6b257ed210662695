"""The README keeps its promises: its Python block runs (on a tiny model), its two Quickstart
commands and its test command are the ones CI runs, it fits on 250 lines, names what it
implements first and points nowhere outside the repository."""
import pathlib
import re

ROOT = pathlib.Path(__file__).resolve().parents[1]
README = (ROOT / "README.md").read_text()
QUICKSTART = [
    "pip install -r requirements.txt -e . && python -m deediff_jax.main --config configs/digits.py --workdir /tmp/deediff_digits",
    "pip install -r requirements-test.txt -e . && python -m pytest tests",
]
# Shrinks the README's model to seconds; everything else in the block runs as written.
TINY = {"model.embed_dim": 32, "model.depth": 2, "model.num_heads": 2, "train.num_steps": 4,
        "train.batch_size": 16, "train.warmup_steps": 1, "train.log_every": 2, "train.checkpoint_every": 4,
        "sample.steps": 4, "sample.batch_size": 10}


def _python_block() -> str:
  section = README.split("## Python API", 1)[1]
  return re.search(r"```python\n(.*?)```", section, re.S).group(1)


def test_readme_python_example_runs(tmp_path, monkeypatch, capsys):
  import deediff_jax.config as config_module
  load = config_module.load_config_file
  monkeypatch.setattr(config_module, "load_config_file",
                      lambda path, overrides=None: load(str(ROOT / path), {**(overrides or {}), **TINY}))
  code = _python_block()
  assert '"/tmp/deediff_api"' in code
  code = code.replace('"/tmp/deediff_api"', repr(str(tmp_path / "api")))
  exec(compile(code, "README.md", "exec"), {"__name__": "readme"})
  out = capsys.readouterr().out
  assert re.search(r"blocks run [01]\.\d\d of full depth, PSNR vs full (\d+\.\d|inf) dB", out), out
  assert (tmp_path / "api" / "checkpoints").is_dir()


def test_readme_quickstart_and_ci_run_the_same_commands():
  blocks = re.findall(r"```bash\n(.*?)```", README.split("## Quickstart", 1)[1].split("\n## ", 1)[0], re.S)
  assert [b.strip() for b in blocks] == QUICKSTART
  ci = (ROOT / ".ci" / "run").read_text()
  assert "python -m pip install -r requirements-test.txt -e . && python -m pytest tests" in ci


def test_readme_shape():
  lines = README.splitlines()
  assert len(lines) <= 250, f"README.md has {len(lines)} lines; move detail to docs/"
  head = " ".join(lines[:5])
  assert "DeeDiff" in head and "AdaDiff" in head
  assert "../shared" not in README
  assert "--mode tune" in README and "tuned.json" in README
  assert "docs/results.md" in README and "CITATION.cff" in README
