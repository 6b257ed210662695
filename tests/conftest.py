"""Test-session setup, in one place (no test module changes the process environment).

One persistent XLA compilation cache per test session, shared by this process, pytest-xdist
workers and every CLI subprocess the tests start (they inherit the environment): tests build
the same tiny programs through different `jax.jit` objects, and each program then compiles
once per session instead of once per test. A fresh directory per session keeps a run's timing
honest (nothing is reused from an earlier run).
"""
import importlib.metadata
import os
import shutil
import tempfile

_OWNED = []

# Seconds per test file on the 2-core CI machine (a `--durations=0` run, 2026-12-03, with the
# compile flags below), heaviest first. pytest-xdist's `--dist loadfile` hands whole files to
# whichever worker is free, in collection order (`--no-loadscope-reorder` in pyproject.toml:
# xdist would otherwise order files by their number of tests, which put the 2-test distributed
# file last); starting with the longest files (longest-processing-time-first) keeps one worker
# from running a long file alone at the end. Files not listed run last, in their usual order.
# Approximate numbers are enough: only the order matters.
FILE_SECONDS = {
    "test_model.py": 80, "test_train.py": 59, "test_main.py": 56, "test_checkpoint.py": 55,
    "test_latent_pipeline.py": 51, "test_distributed.py": 50, "test_notebook.py": 49,
    "test_sweep.py": 45, "test_cache.py": 45, "test_convert.py": 44, "test_early_exit.py": 42,
    "test_measurements.py": 34, "test_samplers.py": 30, "test_benchmarks.py": 26,
    "test_inception.py": 23, "test_adadiff.py": 23, "test_sample.py": 18, "test_flops.py": 18,
    "test_calibrate.py": 12, "test_launch.py": 11, "test_encode_text.py": 10,
    "test_classifier.py": 10, "test_autoencoder.py": 9,
    # added this session (CPU seconds measured under load; long files first keeps both workers busy)
    "test_faults.py": 100, "test_tune.py": 50, "test_readme.py": 30, "test_golden_sweep.py": 20,
    "test_new_policy.py": 15, "test_docs.py": 5,
}


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
  # run time, and XLA:CPU's older (non-"fusion emitter") code generator halves what is left
  # (the tiny train step: 6.8 s -> 3.4 s). Neither changes what a program computes. Tests that
  # need their own XLA_FLAGS (device counts) append to these in their subprocess.
  fast = "--xla_backend_optimization_level=0 --xla_llvm_disable_expensive_passes=true"
  # XLA aborts on a flag it does not know, and it retires flags: this one only with the jaxlib
  # it was measured on (requirements.txt pins it).
  if importlib.metadata.version("jaxlib") == "0.10.2":
    fast += " --xla_cpu_use_fusion_emitters=false"
  if fast not in os.environ.get("XLA_FLAGS", ""):
    os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "") + " " + fast).strip()


def pytest_unconfigure(config):
  for path in _OWNED:
    shutil.rmtree(path, ignore_errors=True)


def pytest_collection_modifyitems(session, config, items):
  weight = lambda item: FILE_SECONDS.get(os.path.basename(str(item.path)), 0)
  items[:] = [item for _, item in sorted(enumerate(items), key=lambda p: (-weight(p[1]), p[0]))]
