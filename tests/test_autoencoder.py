"""deediff_jax.model.autoencoder: the KL-f8 first stage against a PyTorch reference.

The PyTorch model below is written here from the architecture (LDM's AutoencoderKL as U-ViT's
libs/autoencoder.py configures it), with the checkpoint's module names so that its state_dict
has the keys of `autoencoder_kl.pth`. It is small (ch 32, ch_mult (1, 2), one ResNet block per
level) so that the whole file runs in seconds, yet it has every kind of tensor: a nin_shortcut
in both halves, a downsample, an upsample and both mid attentions.
"""
import importlib.util
import os

import jax
import numpy as np
import pytest
import torch
import torch.nn as tnn
import torch.nn.functional as F

from deediff_jax.model import autoencoder as ae

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TOL = 1e-4
SMALL = dict(ch=32, ch_mult=(1, 2), num_res_blocks=1, z_channels=4, embed_dim=4, in_channels=3)
SMALL_DESC = "ch=32, ch_mult=(1, 2), num_res_blocks=1"

# --------------------------------------------------------------------------- torch reference


def _norm(c):
  return tnn.GroupNorm(32, c, eps=1e-6)


def _conv(cin, cout, k=3, stride=1, pad=None):
  return tnn.Conv2d(cin, cout, k, stride=stride, padding=k // 2 if pad is None else pad)


class TResnetBlock(tnn.Module):
  def __init__(self, cin, cout):
    super().__init__()
    self.norm1, self.conv1 = _norm(cin), _conv(cin, cout)
    self.norm2, self.conv2 = _norm(cout), _conv(cout, cout)
    if cin != cout:
      self.nin_shortcut = _conv(cin, cout, k=1)

  def forward(self, x):
    h = self.conv1(F.silu(self.norm1(x)))
    h = self.conv2(F.silu(self.norm2(h)))
    return (self.nin_shortcut(x) if hasattr(self, "nin_shortcut") else x) + h


class TAttnBlock(tnn.Module):
  def __init__(self, c):
    super().__init__()
    self.norm = _norm(c)
    self.q, self.k, self.v, self.proj_out = (_conv(c, c, k=1) for _ in range(4))

  def forward(self, x):
    b, c, h, w = x.shape
    n = self.norm(x)
    q, k, v = (m(n).reshape(b, c, h * w) for m in (self.q, self.k, self.v))
    attn = torch.softmax(torch.einsum("bci,bcj->bij", q, k) / c ** 0.5, dim=-1)  # i queries, j keys
    out = torch.einsum("bij,bcj->bci", attn, v).reshape(b, c, h, w)
    return x + self.proj_out(out)


def _mid(c):
  mid = tnn.Module()
  mid.block_1, mid.attn_1, mid.block_2 = TResnetBlock(c, c), TAttnBlock(c), TResnetBlock(c, c)
  return mid


def _run_mid(mid, h):
  return mid.block_2(mid.attn_1(mid.block_1(h)))


class TEncoder(tnn.Module):
  def __init__(self, ch, ch_mult, num_res_blocks, in_channels, z_channels):
    super().__init__()
    self.conv_in = _conv(in_channels, ch)
    self.down = tnn.ModuleList()
    width = ch
    for i, mult in enumerate(ch_mult):
      level = tnn.Module()
      level.block = tnn.ModuleList()
      for _ in range(num_res_blocks):
        level.block.append(TResnetBlock(width, ch * mult))
        width = ch * mult
      if i != len(ch_mult) - 1:
        level.downsample = tnn.Module()
        level.downsample.conv = _conv(width, width, stride=2, pad=0)
      self.down.append(level)
    self.mid = _mid(width)
    self.norm_out, self.conv_out = _norm(width), _conv(width, 2 * z_channels)

  def forward(self, x):
    h = self.conv_in(x)
    for level in self.down:
      for block in level.block:
        h = block(h)
      if hasattr(level, "downsample"):
        h = level.downsample.conv(F.pad(h, (0, 1, 0, 1)))  # right and bottom only
    h = _run_mid(self.mid, h)
    return self.conv_out(F.silu(self.norm_out(h)))


class TDecoder(tnn.Module):
  def __init__(self, ch, ch_mult, num_res_blocks, out_channels, z_channels):
    super().__init__()
    width = ch * ch_mult[-1]
    self.conv_in = _conv(z_channels, width)
    self.mid = _mid(width)
    levels = []
    for i in reversed(range(len(ch_mult))):
      level = tnn.Module()
      level.block = tnn.ModuleList()
      for _ in range(num_res_blocks + 1):
        level.block.append(TResnetBlock(width, ch * ch_mult[i]))
        width = ch * ch_mult[i]
      if i != 0:
        level.upsample = tnn.Module()
        level.upsample.conv = _conv(width, width)
      levels.insert(0, level)  # up.0 is the finest level, as in the checkpoint
    self.up = tnn.ModuleList(levels)
    self.norm_out, self.conv_out = _norm(width), _conv(width, out_channels)

  def forward(self, z):
    h = _run_mid(self.mid, self.conv_in(z))
    for level in reversed(self.up):
      for block in level.block:
        h = block(h)
      if hasattr(level, "upsample"):
        h = level.upsample.conv(F.interpolate(h, scale_factor=2.0, mode="nearest"))
    return self.conv_out(F.silu(self.norm_out(h)))


class TAutoencoderKL(tnn.Module):
  def __init__(self, ch, ch_mult, num_res_blocks, z_channels, embed_dim, in_channels):
    super().__init__()
    self.encoder = TEncoder(ch, ch_mult, num_res_blocks, in_channels, z_channels)
    self.decoder = TDecoder(ch, ch_mult, num_res_blocks, in_channels, z_channels)
    self.quant_conv = _conv(2 * z_channels, 2 * embed_dim, k=1)
    self.post_quant_conv = _conv(embed_dim, z_channels, k=1)

  def encode_moments(self, x):
    return self.quant_conv(self.encoder(x))

  def decode(self, z):
    return self.decoder(self.post_quant_conv(z / 0.18215))


def torch_model(seed=0, **kw):
  """The small reference model with every tensor random (GroupNorm affines and biases too)."""
  model = TAutoencoderKL(**{**SMALL, **kw}).eval()
  g = torch.Generator().manual_seed(seed)
  with torch.no_grad():
    for name, p in model.named_parameters():
      noise = torch.randn(p.shape, generator=g)
      if p.ndim == 4:
        p.copy_(noise / float(np.prod(p.shape[1:])) ** 0.5)
      elif "norm" in name and name.endswith("weight"):
        p.copy_(1.0 + 0.2 * noise)
      else:
        p.copy_(0.1 * noise)
  return model


def state_dict(model):
  return {k: v.detach().numpy().copy() for k, v in model.state_dict().items()}


def nchw(x):
  return torch.from_numpy(np.ascontiguousarray(x.transpose(0, 3, 1, 2)))


def nhwc(t):
  return t.detach().numpy().transpose(0, 2, 3, 1)


def rel_err(got, want):
  return float(np.max(np.abs(np.asarray(got) - want)) / np.max(np.abs(want)))


@pytest.fixture(scope="module")
def reference():
  model = torch_model()
  return model, ae.convert(state_dict(model))


# --------------------------------------------------------------------------- parity


# Every JAX call below runs at float32 "highest" matmul precision (full f32 on accelerators too; a
# CPU computes in f32 anyway) and with the shapes of the benchmark smoke test (16x16, batches of 2),
# so that each jitted function compiles once for the whole file.
HIGHEST = "highest"


def test_encode_and_decode_match_torch(reference):
  """Through the batched helpers: 3 images in batches of 2, so the padded last batch is covered."""
  model, params = reference
  x = np.random.default_rng(0).uniform(-1, 1, (3, 16, 16, 3)).astype(np.float32)
  with torch.no_grad():
    want_m = nhwc(model.encode_moments(nchw(x)))
  with jax.default_matmul_precision(HIGHEST):
    got_m = ae.encode_moments_batched(params, x, batch_size=2)
    # Two draws of two latents each (one compiled shape), three of them decoded.
    z = np.concatenate([np.asarray(ae.sample_latent(got_m[i:i + 2], jax.random.PRNGKey(i))) for i in (0, 1)])[:3]
    got_x = ae.decode_batched(params, z, batch_size=2)
  assert got_m.shape == (3, 8, 8, 8) == want_m.shape
  assert rel_err(got_m, want_m) < TOL
  with torch.no_grad():
    want_x = nhwc(model.decode(nchw(z)))
  assert got_x.shape == (3, 16, 16, 3)
  assert rel_err(got_x, want_x) < TOL
  # Not clipped, as in the reference: these random weights put values well outside [-1, 1].
  assert np.abs(want_x).max() > 1


def test_torch_tensors_and_loss_entries_are_accepted(reference):
  model, params = reference
  sd = dict(model.state_dict())  # torch tensors, not numpy
  sd["loss.logvar"] = torch.zeros(())  # what an LDM Lightning checkpoint carries besides the model
  sd["loss.discriminator.main.0.weight"] = torch.zeros(64, 3, 4, 4)
  got = ae.convert(sd)
  assert jax.tree_util.tree_all(jax.tree_util.tree_map(lambda a, b: bool(np.array_equal(a, b)), got, params))
  assert ae.config_from_params(got) == ae.AutoencoderConfig(**SMALL)


def test_sample_latent_is_the_scaled_clamped_gaussian():
  mean = np.random.default_rng(0).standard_normal((2, 8, 8, 4)).astype(np.float32)
  logvar = np.array([-50.0, -1.0, 0.5, 40.0], np.float32) * np.ones((2, 8, 8, 1), np.float32)
  key = jax.random.PRNGKey(3)
  with jax.default_matmul_precision(HIGHEST):
    # mean 0, logvar 0 gives 0.18215 * the noise itself: the same key draws the same noise below.
    noise = np.asarray(ae.sample_latent(np.zeros((2, 8, 8, 8), np.float32), key)) / 0.18215
    got = np.asarray(ae.sample_latent(np.concatenate([mean, logvar], -1), key))
  assert 0.9 < noise.std() < 1.1
  want = 0.18215 * (mean + np.exp(0.5 * np.clip(logvar, -30.0, 20.0)) * noise)
  np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-6)


def test_full_size_config_is_kl_f8():
  """The default config has the 83.65M parameters of SD's KL-f8 and reads back from its params."""
  spec = ae._spec(ae.KL_F8)
  assert sum(int(np.prod(s)) for _, s in spec.values()) == 83_653_863
  assert spec["encoder.down.3.block.1.conv2.weight"][1] == (512, 512, 3, 3)
  assert "encoder.down.3.downsample.conv.weight" not in spec
  assert spec["decoder.up.3.upsample.conv.weight"][1] == (512, 512, 3, 3)
  assert spec["decoder.up.0.block.2.conv1.weight"][1] == (128, 128, 3, 3)
  assert spec["decoder.up.1.block.0.nin_shortcut.weight"][1] == (256, 512, 1, 1)
  assert spec["quant_conv.weight"][1] == (8, 8, 1, 1) and spec["post_quant_conv.weight"][1] == (4, 4, 1, 1)


# --------------------------------------------------------------------------- converter errors


def _convert_error(sd):
  with pytest.raises(ae.ConversionError) as e:
    ae.convert(sd)
  msg = str(e.value)
  assert "\n" not in msg
  return e.type, msg


def test_missing_tensor_is_named(reference):
  sd = state_dict(reference[0])
  del sd["decoder.mid.attn_1.k.bias"]
  assert _convert_error(sd) == (ae.MissingTensorError,
                                "autoencoder checkpoint lacks tensor 'decoder.mid.attn_1.k.bias' (expected "
                                f"shape (64,), sizes inferred: {SMALL_DESC})")
  sd = state_dict(reference[0])
  del sd["encoder.conv_in.weight"]
  assert _convert_error(sd) == (ae.MissingTensorError, "autoencoder checkpoint lacks tensor "
                                "'encoder.conv_in.weight', needed to infer its sizes")


def test_extra_tensor_is_named(reference):
  sd = state_dict(reference[0])
  sd["decoder.up.0.block.2.norm1.weight"] = np.ones(32, np.float32)
  assert _convert_error(sd) == (ae.UnusedTensorError,
                                "autoencoder checkpoint tensor 'decoder.up.0.block.2.norm1.weight' (shape "
                                f"(32,)) has no place in a KL autoencoder with {SMALL_DESC}")


def test_misshaped_tensor_is_named(reference):
  sd = state_dict(reference[0])
  sd["decoder.up.1.block.0.conv1.weight"] = np.zeros((64, 64, 1, 1), np.float32)
  assert _convert_error(sd) == (ae.ShapeMismatchError,
                                "tensor 'decoder.up.1.block.0.conv1.weight' has shape (64, 64, 1, 1) but a KL "
                                f"autoencoder with {SMALL_DESC} expects (64, 64, 3, 3)")


# --------------------------------------------------------------------------- checkpoint files


def test_load_checkpoint_pth_npz_and_missing_file(reference, tmp_path):
  model, params = reference
  torch.save(model.state_dict(), tmp_path / "autoencoder_kl.pth")
  np.savez(tmp_path / "autoencoder_kl.npz", **state_dict(model))
  for name in ("autoencoder_kl.pth", "autoencoder_kl.npz"):
    got = ae.convert(ae.load_checkpoint(tmp_path / name))
    assert jax.tree_util.tree_all(jax.tree_util.tree_map(lambda a, b: bool(np.array_equal(a, b)), got, params))
  with pytest.raises(ae.CheckpointError) as e:
    ae.load_checkpoint(tmp_path / "nope.pth")
  assert str(e.value) == (f"autoencoder checkpoint {str(tmp_path / 'nope.pth')!r} does not exist; pass U-ViT's "
                          "assets/stable-diffusion/autoencoder_kl.pth (or an .npz export of it)")


def test_load_checkpoint_refuses_pickled_objects(tmp_path):
  torch.save({"encoder.conv_in.weight": torch.zeros(1), "evil": object()}, tmp_path / "bad.pth")
  with pytest.raises(ae.CheckpointError) as e:
    ae.load_checkpoint(tmp_path / "bad.pth")
  msg = str(e.value)
  assert "\n" not in msg and "\x1b" not in msg
  assert msg.startswith(f"{tmp_path / 'bad.pth'}: not loadable as a plain tensor state_dict with weights_only=True")
  assert "Unsupported global" in msg


# --------------------------------------------------------------------------- benchmark smoke test


def test_benchmark_runs_at_small_size(tmp_path):
  spec = importlib.util.spec_from_file_location("bench_autoencoder",
                                                os.path.join(REPO, "benchmarks", "bench_autoencoder.py"))
  bench = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(bench)
  out = tmp_path / "bench.json"
  with jax.default_matmul_precision(HIGHEST):  # as the parity test: its compiled functions are reused
    result = bench.main(["--small", "--json", str(out)])
  assert out.exists()
  for key in ("encode", "decode"):
    assert result[key]["images_per_second"] > 0
  assert result["latent_shape"] == [result["batch"], 8, 8, 4] and result["output_finite"]
