"""benchmarks/diagnose_denoiser.py: oracle and zero predictors give hand-computable errors."""
import importlib.util
import json
import pathlib
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np

from deediff_jax.diffusion import schedule as S

ROOT = pathlib.Path(__file__).resolve().parents[1]
spec = importlib.util.spec_from_file_location("diagnose_denoiser", ROOT / "benchmarks" / "diagnose_denoiser.py")
dd = importlib.util.module_from_spec(spec)
spec.loader.exec_module(dd)

SCHED = S.make_schedule("cosine", 1000)
X0 = jnp.asarray(np.random.default_rng(0).choice([-1.0, 1.0], size=(4, 6, 6, 1)), jnp.float32)


def oracle(x, t):
  """Knows x0: eps = (x_t - alpha x0) / sigma exactly."""
  a, s = S.alpha_sigma(SCHED, t)
  return (x - a[:, None, None, None] * X0) / s[:, None, None, None]


def test_oracle_has_zero_error_and_restarts_exactly():
  rows, images = dd.per_time_errors(oracle, SCHED, X0, [10, 500, 900], jax.random.PRNGKey(0))
  for r, img in zip(rows, images):
    assert r["eps_mse"] < 1e-8 and r["x0_mse"] < 1e-8
    np.testing.assert_allclose(img, X0, atol=1e-3)
  a, s = S.alpha_sigma(SCHED, 900)
  assert rows[2]["sigma_over_alpha"] == float(s / a)
  for t in (300, 999):
    out = dd.restart(oracle, SCHED, X0, t, 7, jax.random.PRNGKey(1))
    np.testing.assert_allclose(out, X0, atol=1e-4)


def test_zero_predictor_errors_by_hand():
  zero = lambda x, t: jnp.zeros_like(x)
  rows, _ = dd.per_time_errors(zero, SCHED, X0, [100], jax.random.PRNGKey(0))
  noise = jax.random.normal(jax.random.fold_in(jax.random.PRNGKey(0), 0), X0.shape, jnp.float32)
  a, s = S.alpha_sigma(SCHED, 100)
  x_t = a * X0 + s * noise
  assert abs(rows[0]["eps_mse"] - float(jnp.mean(noise ** 2))) < 1e-6
  expected_x0 = np.clip(np.asarray(x_t) / float(a), -1, 1)   # eps_hat = 0: x0 = x_t / alpha
  assert abs(rows[0]["x0_mse"] - float(np.mean((expected_x0 - np.asarray(X0)) ** 2))) < 1e-6


def test_markdown_table_and_cli_errors(tmp_path):
  md = dd.markdown([{"t": 5, "eps_mse": 0.5, "x0_mse": 0.25, "sigma_over_alpha": 0.1}],
                   [{"t_start": 700, "mse": 0.125}],
                   dict(workdir="W", step=3, weights="EMA", num=2, source="digits", split="test",
                        schedule="cosine", restart_steps=20))
  assert "| 5 | 0.10 | 0.5000 | 0.2500 |" in md and "| 700 | 0.1250 |" in md
  r = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "diagnose_denoiser.py"), "--workdir",
                      str(tmp_path), "--out", str(tmp_path / "o")], capture_output=True, text=True)
  assert r.returncode != 0
  assert r.stderr.strip() == f"error: {tmp_path} has no config.json; pass a training workdir"


def test_a_params_file_is_diagnosed_like_a_workdir(tmp_path):
  """--params-file + --config (the committed-model path): the same tables and grids, no checkpoint."""
  import jax
  from deediff_jax.config import load_config_file
  from deediff_jax.model import build, init_params
  from deediff_jax.train import params_file
  config = load_config_file(str(ROOT / "configs" / "digits.py"))
  path = str(tmp_path / "p.npz")
  params_file.save(path, init_params(build(config.model), jax.random.PRNGKey(0)), config)
  out = tmp_path / "o"
  assert dd.main(["--params-file", path, "--config", str(ROOT / "configs" / "digits.py"), "--out", str(out),
                  "--num", "3", "--split", "train", "--times", "10,500", "--restarts", "500", "--restart-steps", "2"]) == 0
  got = json.load(open(out / "denoise.json"))
  assert [r["t"] for r in got["per_time"]] == [10, 500] and got["meta"]["weights"] == "params file"
  assert got["meta"]["step"] is None and (out / "restart_grid.png").exists()
  r = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "diagnose_denoiser.py"), "--params-file", path,
                      "--out", str(out)], capture_output=True, text=True)
  assert r.returncode != 0 and r.stderr.strip() == ("error: --params-file needs --config, the config file the "
                                                     "model was trained with")
