"""Test-session setup, in one place (no test module changes the process environment).

One persistent XLA compilation cache per test session, shared by this process, pytest-xdist
workers and every CLI subprocess the tests start (they inherit the environment): tests build
the same tiny programs through different `jax.jit` objects, and each program then compiles
once per session instead of once per test. A fresh directory per session keeps a run's timing
honest (nothing is reused from an earlier run).
"""
import os
import shutil
import tempfile

_OWNED = []


def pytest_configure(config):
  # Set before any test module imports jax (jax reads these when it is imported). xdist
  # workers start after the controller ran this, so they inherit its directory.
  if "DEEDIFF_TEST_XLA_CACHE" not in os.environ:
    path = tempfile.mkdtemp(prefix="deediff_test_xla_")
    os.environ["DEEDIFF_TEST_XLA_CACHE"] = path
    _OWNED.append(path)
  os.environ["JAX_COMPILATION_CACHE_DIR"] = os.environ["DEEDIFF_TEST_XLA_CACHE"]
  os.environ["JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS"] = "0"
  os.environ["JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES"] = "0"
  # Test programs are tiny and compile far longer than they run: a lower LLVM optimisation level
  # cuts XLA:CPU compile time by about a third (measured on the train step) at a small cost in
  # run time. Tests that need their own XLA_FLAGS (device counts) set them in their subprocess.
  fast = "--xla_backend_optimization_level=0 --xla_llvm_disable_expensive_passes=true"
  if fast not in os.environ.get("XLA_FLAGS", ""):
    os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "") + " " + fast).strip()


def pytest_unconfigure(config):
  for path in _OWNED:
    shutil.rmtree(path, ignore_errors=True)
