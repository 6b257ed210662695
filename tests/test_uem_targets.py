"""`loss.uem_target` (eps / x0 / fidelity) against hand computation, where gradients may not flow,
`train.mode=uem_only` (only the UEMs learn), and the one-line config errors of these options."""
import contextlib
import io

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from deediff_jax.config import ConfigError, LossSpec, base_config, validate
from deediff_jax.diffusion import losses as L
from deediff_jax.train import trainer
from deediff_jax.train.checkpoint import export_params


def hand_made():
  # N = 2 exits, B = 2 samples, 1x2x1 images (as in test_losses).
  eps = jnp.array([[[[1.0], [-1.0]]], [[[0.0], [2.0]]]])                # [B, 1, 2, 1]
  eps_all = jnp.stack([eps + jnp.array([[[[1.0], [1.0]]], [[[0.5], [-0.5]]]]),  # exit 1
                       eps + 0.1])                                         # exit 2 (the last)
  u_all = jnp.array([[0.2, 0.6], [0.1, 0.3]])
  x0_scale = jnp.array([0.5, 4.0])                                         # sigma/alpha per sample
  return eps_all, u_all, eps, x0_scale


# u_hat [N, B] by hand. mean |eps_i - eps|: exit 1 [1.0, 0.5], exit 2 [0.1, 0.1].
# mean |eps_1 - eps_2|: [|0.9|, |0.9|] -> 0.9 and [|0.4|, |-0.6|] -> 0.5; exit 2 to itself 0.
def _squash(e):
  return e / (1.0 + e)


WANT = {
    "eps": np.tanh([[1.0, 0.5], [0.1, 0.1]]),
    "x0": _squash(np.array([[0.5 * 1.0, 4.0 * 0.5], [0.5 * 0.1, 4.0 * 0.1]])),      # 1/3, 2/3, ...
    "fidelity": _squash(np.array([[0.5 * 0.9, 4.0 * 0.5], [0.0, 0.0]])),
}


@pytest.mark.parametrize("target", ["eps", "x0", "fidelity"])
def test_targets_equal_hand_computation(target):
  eps_all, u_all, eps, scale = hand_made()
  np.testing.assert_allclose(L.uem_target_values(eps_all, eps, target, scale), WANT[target], rtol=1e-6)
  _, m = L.deediff_loss(eps_all, u_all, eps, uem_target=target, x0_scale=scale)
  u = np.array([[0.2, 0.6], [0.1, 0.3]])
  l_u = np.sum(np.mean((u - WANT[target]) ** 2, axis=1))          # sum over exits of the batch mean
  np.testing.assert_allclose(m["loss_u"], l_u, rtol=1e-6)
  np.testing.assert_allclose(m["u_hat_mean"], np.mean(WANT[target]), rtol=1e-6)
  # The config path passes loss.uem_target through (config.loss -> LossSpec -> configured_loss).
  c = base_config()
  c.loss.uem_target = target
  _, m2 = L.configured_loss(eps_all, u_all, eps, LossSpec.from_config(c), x0_scale=scale)
  np.testing.assert_allclose(m2["loss_u"], l_u, rtol=1e-6)


def test_fidelity_measures_against_the_models_own_final_prediction():
  # The true noise does not enter the fidelity target at all; it does enter x0's.
  eps_all, _, eps, scale = hand_made()
  other = eps + 3.0
  np.testing.assert_array_equal(L.uem_target_values(eps_all, other, "fidelity", scale),
                                L.uem_target_values(eps_all, eps, "fidelity", scale))
  assert not np.allclose(L.uem_target_values(eps_all, other, "x0", scale),
                         L.uem_target_values(eps_all, eps, "x0", scale))


@pytest.mark.parametrize("target", ["eps", "x0", "fidelity"])
def test_targets_carry_no_gradient(target):
  eps_all, u_all, eps, scale = hand_made()
  # L_u's gradient wrt every eps_i (eps_N included) and wrt the true noise is exactly zero: the
  # target is stop-gradient and u_all is an independent input.
  loss_u = lambda e, n: L.deediff_loss(e, u_all, n, uem_target=target, x0_scale=scale)[1]["loss_u"]
  g_eps_all, g_eps = jax.grad(loss_u, argnums=(0, 1))(eps_all, eps)
  assert float(jnp.abs(g_eps_all).max()) == 0.0 and float(jnp.abs(g_eps).max()) == 0.0
  # So with beta_ual = layer_loss = 0 the total's gradient wrt eps_all is L_simple's alone:
  # 2 (eps_N - eps) / (B H W C) = 2 * 0.1 / 4 at the last exit, exactly 0 at the others.
  total = lambda e: L.deediff_loss(e, u_all, eps, lambda_u=1.0, beta_ual=0.0, uem_target=target,
                                   x0_scale=scale)[0]
  g = np.asarray(jax.grad(total)(eps_all))
  assert np.all(g[0] == 0.0)
  np.testing.assert_allclose(g[1], np.full(g[1].shape, 0.05), rtol=1e-5)
  # And u gets the L_u gradient 2 (u - u_hat) / B = u - u_hat.
  loss_u_of_u = lambda u: L.deediff_loss(eps_all, u, eps, uem_target=target, x0_scale=scale)[1]["loss_u"]
  g_u = jax.grad(loss_u_of_u)(u_all)
  np.testing.assert_allclose(g_u, np.asarray(u_all) - WANT[target], rtol=1e-5, atol=1e-7)


def test_target_errors():
  eps_all, _, eps, _ = hand_made()
  with pytest.raises(ValueError, match=r"^loss.uem_target=x0 needs sigma/alpha per sample \(x0_scale\)$"):
    L.uem_target_values(eps_all, eps, "x0")
  with pytest.raises(ValueError, match=r"^unknown loss.uem_target 'x1'; choose one of eps, x0, fidelity$"):
    L.uem_target_values(eps_all, eps, "x1", jnp.ones(2))


# ----------------------------------------------------------------------------- uem_only

def _tiny_config():
  c = base_config()                      # digits: 8x8x1, 10 classes
  c.model.update(embed_dim=32, depth=2, num_heads=2)
  c.train.update(batch_size=8, num_steps=1, warmup_steps=1, log_every=1, checkpoint_every=1,
                 sample_at_end=False)
  return c


def test_uem_only_trains_only_the_uems(tmp_path):
  c = _tiny_config()
  c.train.update(mode="uem_only", init_from=str(tmp_path / "init"))
  c.loss.uem_target = "fidelity"         # the x0_scale path of the train step, too
  # The trainer's own fresh init (its compiled setup is cached and reused by `train`), and the
  # model to start from: every leaf shifted, so that "loaded" and "fresh" can be told apart.
  fresh = jax.device_get(trainer.make_setup(c).init_params())
  start = jax.tree_util.tree_map(lambda a: (a + 0.01).astype(a.dtype), fresh)
  export_params(str(tmp_path / "init"), start, c)
  rng = np.random.default_rng(0)
  batch = {"image": rng.uniform(-1, 1, (8, 8, 8, 1)).astype(np.float32), "label": np.arange(8) % 10}
  with contextlib.redirect_stdout(io.StringIO()):
    state = trainer.train(c, str(tmp_path / "wd"), batch_fn=lambda step: batch, progress=False)
  assert int(state.step) == 1
  params = jax.device_get(state.params)
  ema = jax.device_get(state.ema_params)
  assert sorted(params) == sorted(start)
  bitwise = lambda a, b: a.dtype == b.dtype and np.array_equal(a.view(np.uint8), b.view(np.uint8))
  for key in params:
    if key == "uems":
      continue
    # Backbone and exit heads: the loaded parameters, bit for bit, and their EMA too.
    for tree in (params, ema):
      assert all(jax.tree_util.tree_leaves(jax.tree_util.tree_map(bitwise, tree[key], start[key]))), key
  # The UEMs start fresh (the trainer's init, not the checkpoint's 0.01 away) and every leaf
  # learned: one AdamW step moves an element by at most about lr = 1e-3.
  for new, init in zip(jax.tree_util.tree_leaves(params["uems"]), jax.tree_util.tree_leaves(fresh["uems"])):
    step = np.abs(new - init)
    assert step.max() < 2e-3 and np.mean(step > 1e-4) > 0.5


def _error(c) -> str:
  with pytest.raises(ConfigError) as e:
    validate(c)
  return str(e.value)


def test_config_errors():
  c = base_config()
  c.train.mode = "uem_only"
  assert _error(c) == ("train.mode=uem_only needs train.init_from=DIR (a checkpoint workdir or "
                       "converted U-ViT weights)")
  c = base_config()
  c.model.exit_style = "adadiff"
  c.exit.policy = "adadiff"
  c.loss.uem_target = "x0"
  assert _error(c) == ("loss.uem_target applies to exit_style=deediff; adadiff uses the official "
                       "confidence target, so leave loss.uem_target=eps")
  c = base_config()
  c.model.exit_style = "adadiff"
  c.exit.policy = "uem"
  assert _error(c) == ("config key 'exit.policy': exit policy 'uem' needs model.exit_style=deediff, "
                       "this model is adadiff; use --config.exit.policy=adadiff")
  c = base_config()
  c.exit.policy = "adadiff"
  assert _error(c) == ("config key 'exit.policy': exit policy 'adadiff' needs model.exit_style=adadiff, "
                       "this model is deediff; use --config.exit.policy=uem")
  c = base_config()
  c.loss.uem_target = "x1"
  assert _error(c) == "config key 'loss.uem_target' is 'x1'; choose one of eps, x0, fidelity"
