"""Training: sharded == single-device, real FSDP sharding, frozen backbone, grad accumulation,
EMA and learning-rate schedule against hand computations.

Multi-device checks run in a subprocess with 8 simulated CPU devices (XLA_FLAGS must be set
before jax is imported); that subprocess is this file run as a script.
"""
import json
import math
import os
import subprocess
import sys

import numpy as np
import pytest


ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def tiny_config(**train):
  from deediff_jax.config import base_config
  c = base_config()
  c.model.update(image_size=8, in_channels=1, embed_dim=32, depth=2, num_heads=2, patch_size=2,
                 num_classes=10)
  c.train.update(batch_size=16, num_steps=6, lr=1e-3, warmup_steps=2, log_every=2,
                 checkpoint_every=2, sample_at_end=False)
  c.train.update(**train)
  return c


def run_steps(config, n, mesh=None, state=None):
  """n train steps on the digits data; returns (state, [metrics per step as floats])."""
  import jax
  from deediff_jax.train import sharding as shd
  from deediff_jax.train import trainer
  setup = trainer.make_setup(config, mesh)
  batch_fn, _ = trainer.default_batch_fn(config)
  state = trainer.init_state(setup) if state is None else state
  history = []
  for step in range(n):
    batch = shd.global_batch(batch_fn(step), setup.batch_sharding, config.train.batch_size)
    state, m = setup.train_step(state, batch)
    history.append({k: float(v) for k, v in jax.device_get(m).items()})
  return state, history


def max_abs_diff(a, b):
  import jax
  diffs = jax.tree_util.tree_map(lambda x, y: float(np.max(np.abs(np.asarray(x, np.float64) -
                                                                  np.asarray(y, np.float64)))), a, b)
  return max(jax.tree_util.tree_leaves(diffs))


# ------------------------------------------------------------------ the 8-device worker


def _flat(tree) -> dict:
  import jax
  return {jax.tree_util.keystr(k): np.asarray(v) for k, v in jax.tree_util.tree_leaves_with_path(tree)}


def _worker(out_dir: str):
  """Trains the sharded runs on 8 devices; the single-device reference runs in the test process."""
  import jax
  from deediff_jax.train import sharding as shd
  assert jax.device_count() == 8, jax.devices()
  out = {}

  def mesh_of(data, fsdp):
    from ml_collections import ConfigDict
    return shd.make_mesh(ConfigDict({"data": data, "fsdp": fsdp}))

  m42 = mesh_of(4, 2)
  out["mesh_shape"] = dict(m42.shape)
  shard, shard_hist = run_steps(tiny_config(), 3, m42)
  out["loss_sharded"] = [h["loss"] for h in shard_hist]
  out["gn_sharded"] = [h["grad_norm"] for h in shard_hist]
  np.savez(os.path.join(out_dir, "sharded.npz"), **_flat(jax.device_get(shard.params)))
  np.savez(os.path.join(out_dir, "sharded_ema.npz"), **_flat(jax.device_get(shard.ema_params)))

  kernel = shard.params["in_blocks"]["mlp"]["fc1"]["kernel"]       # [1, 32, 128]
  out["fc1_spec"] = [str(a) for a in kernel.sharding.spec]
  out["fc1_shard_shape"] = list(kernel.addressable_shards[0].data.shape)
  out["ema_fc1_spec"] = [str(a) for a in shard.ema_params["in_blocks"]["mlp"]["fc1"]["kernel"].sharding.spec]
  mu = shard.opt_state[1][0].mu["in_blocks"]["mlp"]["fc1"]["kernel"]  # adamw's first moment
  out["mu_fc1_spec"] = [str(a) for a in mu.sharding.spec]
  bias = shard.params["mid_block"]["norm1"]["bias"]                # 32 elements: replicated
  out["small_spec"] = [str(a) for a in bias.sharding.spec]
  out["small_replicated"] = bias.sharding.is_fully_replicated

  # Gradient accumulation on the mesh: 2 microbatches of 8 == one batch of 16 on one device.
  acc, acc_hist = run_steps(tiny_config(grad_accum=2), 3, m42)
  out["loss_accum"] = [h["loss"] for h in acc_hist]
  out["gn_accum"] = [h["grad_norm"] for h in acc_hist]
  np.savez(os.path.join(out_dir, "accum.npz"), **_flat(jax.device_get(acc.params)))
  print("RESULT " + json.dumps(out))


@pytest.fixture(scope="module")
def reference():
  """Three steps of tiny_config() on one device (the default, no mesh): the reference the 8-device
  runs must match. Built in this process, where the other tests compile the same program."""
  import jax
  state, hist = run_steps(tiny_config(), 3)
  return jax.device_get(state.params), jax.device_get(state.ema_params), hist


def test_sharded_mesh_matches_single_device_and_shards_params(reference, tmp_path):
  ref_params, ref_ema, ref_hist = reference
  env = dict(os.environ, XLA_FLAGS=(os.environ.get("XLA_FLAGS", "") + " --xla_force_host_platform_device_count=8").strip(), JAX_PLATFORMS="cpu",
             PYTHONPATH=ROOT)
  proc = subprocess.run([sys.executable, os.path.abspath(__file__), "worker", str(tmp_path)], env=env,
                        cwd=ROOT, capture_output=True, text=True, timeout=300)
  lines = [l for l in proc.stdout.splitlines() if l.startswith("RESULT ")]
  assert proc.returncode == 0 and lines, proc.stderr[-3000:]
  r = json.loads(lines[-1][len("RESULT "):])
  assert r["mesh_shape"] == {"data": 4, "fsdp": 2}
  loss_ref, gn_ref = [h["loss"] for h in ref_hist], [h["grad_norm"] for h in ref_hist]

  def diff(name, tree):
    got, want = dict(np.load(tmp_path / name)), _flat(tree)
    assert set(got) == set(want)
    return max_abs_diff(got, want)

  # Same losses and parameters as one device, up to float reassociation.
  np.testing.assert_allclose(r["loss_sharded"], loss_ref, rtol=1e-5, atol=1e-6)
  np.testing.assert_allclose(r["gn_sharded"], gn_ref, rtol=1e-5)
  assert diff("sharded.npz", ref_params) < 1e-5 and diff("sharded_ema.npz", ref_ema) < 1e-5
  assert loss_ref[0] != loss_ref[1]  # The steps really differ (fresh noise per step).
  # fc1 kernel [1, 32, 128]: its largest axis (128) is split over 'fsdp'; params, EMA and
  # Adam moments follow the same rule; a 32-element LayerNorm bias stays replicated.
  assert r["fc1_spec"] == ["None", "None", "fsdp"]
  assert r["fc1_shard_shape"] == [1, 32, 64]
  assert r["ema_fc1_spec"] == r["fc1_spec"] == r["mu_fc1_spec"]
  assert r["small_replicated"] and "fsdp" not in r["small_spec"]
  # grad_accum=2 on the mesh == one big batch on one device.
  np.testing.assert_allclose(r["loss_accum"], loss_ref, rtol=1e-5, atol=1e-6)
  np.testing.assert_allclose(r["gn_accum"], gn_ref, rtol=1e-5)
  assert diff("accum.npz", ref_params) < 1e-5


# ------------------------------------------------------------------ in-process, one device


def test_param_spec_rule():
  from jax.sharding import PartitionSpec as P
  from deediff_jax.train.sharding import param_spec
  assert param_spec((1, 32, 128), 2) == P(None, None, "fsdp")
  assert param_spec((96, 64), 4) == P("fsdp", None)            # largest axis first
  assert param_spec((3, 512, 6), 4) == P(None, "fsdp", None)
  assert param_spec((7, 1000), 3) == P()                      # nothing divisible: replicate
  assert param_spec((1000, 7), 5) == P("fsdp", None)
  assert param_spec((32,), 2) == P()                          # small: replicate
  assert param_spec((4096, 4096), 1) == P()                   # no fsdp axis


def test_lr_schedule_hand_values():
  from deediff_jax.train.state import lr_schedule
  c = tiny_config(lr=2e-3, warmup_steps=10, num_steps=110)
  f = lr_schedule(c.train)
  # Warmup: lr * (step + 1) / warmup.
  assert math.isclose(float(f(0)), 2e-4, rel_tol=1e-6)
  assert math.isclose(float(f(4)), 1e-3, rel_tol=1e-6)
  assert math.isclose(float(f(9)), 2e-3, rel_tol=1e-6)
  # Cosine over the remaining 100 steps: lr * (1 + cos(pi * (step - 10) / 100)) / 2.
  assert math.isclose(float(f(10)), 2e-3, rel_tol=1e-6)
  assert math.isclose(float(f(60)), 1e-3, rel_tol=1e-5)
  assert math.isclose(float(f(35)), 2e-3 * (1 + math.cos(math.pi * 0.25)) / 2, rel_tol=1e-5)
  assert abs(float(f(110))) < 1e-12 and abs(float(f(500))) < 1e-12
  c.train.lr_schedule = "constant"
  g = lr_schedule(c.train)
  assert math.isclose(float(g(4)), 1e-3, rel_tol=1e-6) and math.isclose(float(g(80)), 2e-3, rel_tol=1e-6)


def test_ema_update_hand_computation():
  import jax.numpy as jnp
  from deediff_jax.train.state import ema_update
  ema = {"head": {"w": jnp.array([1.0, 2.0])}, "uems": {"w": jnp.array([0.0])}}
  new = {"head": {"w": jnp.array([3.0, 6.0])}, "uems": {"w": jnp.array([4.0])}}
  # step 0: decay min(0.999, 1/10) = 0.1 -> 0.1 * ema + 0.9 * new.
  out = ema_update(ema, new, 0, 0.999)
  np.testing.assert_allclose(out["head"]["w"], [0.1 * 1 + 0.9 * 3, 0.1 * 2 + 0.9 * 6], rtol=1e-6)
  # step 10000: decay = rate.
  out = ema_update(ema, new, 10000, 0.5)
  np.testing.assert_allclose(out["uems"]["w"], [2.0], rtol=1e-6)
  # frozen_backbone: the backbone EMA is the backbone itself, bit for bit.
  out = ema_update(ema, new, 10000, 0.5, mode="frozen_backbone")
  assert np.array_equal(out["head"]["w"], new["head"]["w"])
  np.testing.assert_allclose(out["uems"]["w"], [2.0], rtol=1e-6)


def test_train_step_wires_ema_lr_and_rng():
  import jax
  from deediff_jax.train import trainer
  from deediff_jax.train.state import lr_schedule
  c = tiny_config()  # the reference's program (compiled once in this process)
  setup = trainer.make_setup(c)
  s0 = jax.device_get(trainer.init_state(setup).params)
  state, hist = run_steps(c, 1)
  p1, e1 = jax.device_get(state.params), jax.device_get(state.ema_params)
  d0 = min(c.train.ema_rate, 1.0 / 10.0)
  expect = jax.tree_util.tree_map(lambda a, b: d0 * a + (1 - d0) * b, s0, p1)
  assert max_abs_diff(expect, e1) < 1e-6
  assert max_abs_diff(s0, p1) > 1e-4  # The step did move the parameters.
  state, hist2 = run_steps(c, 1, state=state)  # second step: step index 1 (batch 0 again here)
  d1 = min(c.train.ema_rate, 2.0 / 11.0)
  p2, e2 = jax.device_get(state.params), jax.device_get(state.ema_params)
  expect = jax.tree_util.tree_map(lambda a, b: d1 * a + (1 - d1) * b, e1, p2)
  assert max_abs_diff(expect, e2) < 1e-6
  f = lr_schedule(c.train)
  assert math.isclose(hist[0]["lr"], float(f(0)), rel_tol=1e-6)
  assert math.isclose(hist2[0]["lr"], float(f(1)), rel_tol=1e-6)
  # Same batch, but step 1 draws other t/noise (fold_in(seed, step)): a different loss.
  assert int(state.step) == 2 and hist[0]["loss"] != hist2[0]["loss"]


def test_frozen_backbone_changes_only_exits(tmp_path):
  import jax
  from deediff_jax.model import build, init_params
  from deediff_jax.train.checkpoint import export_params
  from deediff_jax.train import trainer
  base = tiny_config()
  pretrained = jax.device_get(jax.jit(lambda r: init_params(build(base.model), r))(jax.random.PRNGKey(7)))
  export_params(tmp_path / "export", pretrained, base)
  c = tiny_config(mode="frozen_backbone", init_from=str(tmp_path / "export"), lr=1e-2)
  setup = trainer.make_setup(c)
  state0 = jax.device_get(trainer.init_state(setup).params)
  assert max_abs_diff(state0, pretrained) == 0.0  # Backbone *and* saved exits were loaded.
  state, hist = run_steps(c, 3)
  p, e = jax.device_get(state.params), jax.device_get(state.ema_params)
  for key in p:
    same = jax.tree_util.tree_leaves(jax.tree_util.tree_map(np.array_equal, p[key], pretrained[key]))
    same_ema = jax.tree_util.tree_leaves(jax.tree_util.tree_map(np.array_equal, e[key], pretrained[key]))
    if key in ("exit_heads", "uems"):
      assert not all(same), key              # exits learn
    else:
      assert all(same) and all(same_ema), key  # backbone and its EMA bitwise unchanged
  assert all(np.isfinite(h["loss"]) for h in hist)


def test_finetune_loads_backbone_and_fresh_exits(tmp_path):
  import jax
  from deediff_jax.model import build, init_params, split_params
  from deediff_jax.train.checkpoint import export_params
  from deediff_jax.train import trainer
  base = tiny_config()
  pretrained = jax.device_get(jax.jit(lambda r: init_params(build(base.model), r))(jax.random.PRNGKey(7)))
  backbone, _ = split_params(pretrained)
  export_params(tmp_path / "bare", backbone, base)  # like a converted U-ViT: no exits
  c = tiny_config(mode="finetune", init_from=str(tmp_path / "bare"))
  setup = trainer.make_setup(c)
  params = jax.device_get(trainer.init_state(setup).params)
  fresh = jax.device_get(setup.init_params())
  assert max_abs_diff({k: params[k] for k in backbone}, backbone) == 0.0
  assert max_abs_diff({k: params[k] for k in ("exit_heads", "uems")},
                      {k: fresh[k] for k in ("exit_heads", "uems")}) == 0.0


def test_finetune_from_a_params_file_starts_at_its_weights(tmp_path):
  """train.init_from=FILE.npz (python -m deediff_jax.export): every tensor, exits included, starts
  at the file's (float16-rounded) value; a file for another model is one CheckpointError."""
  import jax
  import pytest
  from deediff_jax.model import build, init_params
  from deediff_jax.tensor_files import CheckpointError
  from deediff_jax.train import params_file, trainer
  base = tiny_config()
  pretrained = jax.device_get(jax.jit(lambda r: init_params(build(base.model), r))(jax.random.PRNGKey(7)))
  path = str(tmp_path / "model.npz")
  params_file.save(path, pretrained, base, float16=True)
  setup = trainer.make_setup(tiny_config(mode="finetune", init_from=path))
  state = trainer.init_state(setup)
  rounded = jax.tree_util.tree_map(lambda v: np.asarray(v, np.float16).astype(np.float32), pretrained)
  assert max_abs_diff(jax.device_get(state.params), rounded) == 0.0
  assert max_abs_diff(jax.device_get(state.ema_params), rounded) == 0.0
  other = tiny_config(mode="finetune", init_from=path)
  other.model.embed_dim = 64
  with pytest.raises(CheckpointError, match="another model: it has model.embed_dim=32 but the config says 64"):
    trainer.init_state(trainer.make_setup(other))


def test_bad_mesh_and_batch_are_config_errors():
  import pytest
  from ml_collections import ConfigDict
  from deediff_jax.config import ConfigError
  from deediff_jax.train import sharding as shd
  with pytest.raises(ConfigError, match="mesh.data x mesh.fsdp = 4 x 2 does not fit the 1 available"):
    shd.make_mesh(ConfigDict({"data": 4, "fsdp": 2}))
  with pytest.raises(ConfigError, match="mesh.fsdp"):
    shd.make_mesh(ConfigDict({"data": -1, "fsdp": 3}))


if __name__ == "__main__" and sys.argv[1:2] == ["worker"]:
  _worker(sys.argv[2])
