"""FID Inception v3: the importer on the standard file layout and pool3 parity with PyTorch.

The real weights cannot be downloaded here, so the reference is an independent PyTorch
re-implementation of pytorch-fid's network (FIDInceptionA/C/E_1/E_2 on torchvision's
Inception v3 layout, with the official parameter names), randomly initialised with
realistic BatchNorm statistics. Its state_dict has exactly the layout of
`pt_inception-2015-12-05-6726825d.pth` (plus `num_batches_tracked`, which newer torch adds).
"""
import numpy as np
import pytest

torch = pytest.importorskip("torch")
tnn = torch.nn
F = torch.nn.functional

import jax  # noqa: E402

from deediff_jax.eval import inception  # noqa: E402


# ----------------------------------------------------------------------------- torch reference


class BasicConv2d(tnn.Module):
  def __init__(self, cin, cout, **kw):
    super().__init__()
    self.conv = tnn.Conv2d(cin, cout, bias=False, **kw)
    self.bn = tnn.BatchNorm2d(cout, eps=0.001)

  def forward(self, x):
    return F.relu(self.bn(self.conv(x)))


def _tf_avg_pool(x):
  return F.avg_pool2d(x, kernel_size=3, stride=1, padding=1, count_include_pad=False)


class FIDInceptionA(tnn.Module):
  def __init__(self, cin, pool_features):
    super().__init__()
    self.branch1x1 = BasicConv2d(cin, 64, kernel_size=1)
    self.branch5x5_1 = BasicConv2d(cin, 48, kernel_size=1)
    self.branch5x5_2 = BasicConv2d(48, 64, kernel_size=5, padding=2)
    self.branch3x3dbl_1 = BasicConv2d(cin, 64, kernel_size=1)
    self.branch3x3dbl_2 = BasicConv2d(64, 96, kernel_size=3, padding=1)
    self.branch3x3dbl_3 = BasicConv2d(96, 96, kernel_size=3, padding=1)
    self.branch_pool = BasicConv2d(cin, pool_features, kernel_size=1)

  def forward(self, x):
    b5 = self.branch5x5_2(self.branch5x5_1(x))
    b3 = self.branch3x3dbl_3(self.branch3x3dbl_2(self.branch3x3dbl_1(x)))
    return torch.cat([self.branch1x1(x), b5, b3, self.branch_pool(_tf_avg_pool(x))], 1)


class InceptionB(tnn.Module):
  def __init__(self, cin):
    super().__init__()
    self.branch3x3 = BasicConv2d(cin, 384, kernel_size=3, stride=2)
    self.branch3x3dbl_1 = BasicConv2d(cin, 64, kernel_size=1)
    self.branch3x3dbl_2 = BasicConv2d(64, 96, kernel_size=3, padding=1)
    self.branch3x3dbl_3 = BasicConv2d(96, 96, kernel_size=3, stride=2)

  def forward(self, x):
    bd = self.branch3x3dbl_3(self.branch3x3dbl_2(self.branch3x3dbl_1(x)))
    return torch.cat([self.branch3x3(x), bd, F.max_pool2d(x, kernel_size=3, stride=2)], 1)


class FIDInceptionC(tnn.Module):
  def __init__(self, cin, c7):
    super().__init__()
    self.branch1x1 = BasicConv2d(cin, 192, kernel_size=1)
    self.branch7x7_1 = BasicConv2d(cin, c7, kernel_size=1)
    self.branch7x7_2 = BasicConv2d(c7, c7, kernel_size=(1, 7), padding=(0, 3))
    self.branch7x7_3 = BasicConv2d(c7, 192, kernel_size=(7, 1), padding=(3, 0))
    self.branch7x7dbl_1 = BasicConv2d(cin, c7, kernel_size=1)
    self.branch7x7dbl_2 = BasicConv2d(c7, c7, kernel_size=(7, 1), padding=(3, 0))
    self.branch7x7dbl_3 = BasicConv2d(c7, c7, kernel_size=(1, 7), padding=(0, 3))
    self.branch7x7dbl_4 = BasicConv2d(c7, c7, kernel_size=(7, 1), padding=(3, 0))
    self.branch7x7dbl_5 = BasicConv2d(c7, 192, kernel_size=(1, 7), padding=(0, 3))
    self.branch_pool = BasicConv2d(cin, 192, kernel_size=1)

  def forward(self, x):
    b7 = self.branch7x7_3(self.branch7x7_2(self.branch7x7_1(x)))
    bd = x
    for i in range(1, 6):
      bd = getattr(self, f"branch7x7dbl_{i}")(bd)
    return torch.cat([self.branch1x1(x), b7, bd, self.branch_pool(_tf_avg_pool(x))], 1)


class InceptionD(tnn.Module):
  def __init__(self, cin):
    super().__init__()
    self.branch3x3_1 = BasicConv2d(cin, 192, kernel_size=1)
    self.branch3x3_2 = BasicConv2d(192, 320, kernel_size=3, stride=2)
    self.branch7x7x3_1 = BasicConv2d(cin, 192, kernel_size=1)
    self.branch7x7x3_2 = BasicConv2d(192, 192, kernel_size=(1, 7), padding=(0, 3))
    self.branch7x7x3_3 = BasicConv2d(192, 192, kernel_size=(7, 1), padding=(3, 0))
    self.branch7x7x3_4 = BasicConv2d(192, 192, kernel_size=3, stride=2)

  def forward(self, x):
    b3 = self.branch3x3_2(self.branch3x3_1(x))
    b7 = x
    for i in range(1, 5):
      b7 = getattr(self, f"branch7x7x3_{i}")(b7)
    return torch.cat([b3, b7, F.max_pool2d(x, kernel_size=3, stride=2)], 1)


class FIDInceptionE(tnn.Module):
  def __init__(self, cin, max_pool):
    super().__init__()
    self.max_pool = max_pool  # E_2 (Mixed_7c) uses a max pool, E_1 (Mixed_7b) the TF avg pool
    self.branch1x1 = BasicConv2d(cin, 320, kernel_size=1)
    self.branch3x3_1 = BasicConv2d(cin, 384, kernel_size=1)
    self.branch3x3_2a = BasicConv2d(384, 384, kernel_size=(1, 3), padding=(0, 1))
    self.branch3x3_2b = BasicConv2d(384, 384, kernel_size=(3, 1), padding=(1, 0))
    self.branch3x3dbl_1 = BasicConv2d(cin, 448, kernel_size=1)
    self.branch3x3dbl_2 = BasicConv2d(448, 384, kernel_size=3, padding=1)
    self.branch3x3dbl_3a = BasicConv2d(384, 384, kernel_size=(1, 3), padding=(0, 1))
    self.branch3x3dbl_3b = BasicConv2d(384, 384, kernel_size=(3, 1), padding=(1, 0))
    self.branch_pool = BasicConv2d(cin, 192, kernel_size=1)

  def forward(self, x):
    b3 = self.branch3x3_1(x)
    b3 = torch.cat([self.branch3x3_2a(b3), self.branch3x3_2b(b3)], 1)
    bd = self.branch3x3dbl_2(self.branch3x3dbl_1(x))
    bd = torch.cat([self.branch3x3dbl_3a(bd), self.branch3x3dbl_3b(bd)], 1)
    pooled = F.max_pool2d(x, 3, stride=1, padding=1) if self.max_pool else _tf_avg_pool(x)
    return torch.cat([self.branch1x1(x), b3, bd, self.branch_pool(pooled)], 1)


class FIDInceptionV3(tnn.Module):
  def __init__(self):
    super().__init__()
    self.Conv2d_1a_3x3 = BasicConv2d(3, 32, kernel_size=3, stride=2)
    self.Conv2d_2a_3x3 = BasicConv2d(32, 32, kernel_size=3)
    self.Conv2d_2b_3x3 = BasicConv2d(32, 64, kernel_size=3, padding=1)
    self.Conv2d_3b_1x1 = BasicConv2d(64, 80, kernel_size=1)
    self.Conv2d_4a_3x3 = BasicConv2d(80, 192, kernel_size=3)
    self.Mixed_5b = FIDInceptionA(192, 32)
    self.Mixed_5c = FIDInceptionA(256, 64)
    self.Mixed_5d = FIDInceptionA(288, 64)
    self.Mixed_6a = InceptionB(288)
    self.Mixed_6b = FIDInceptionC(768, 128)
    self.Mixed_6c = FIDInceptionC(768, 160)
    self.Mixed_6d = FIDInceptionC(768, 160)
    self.Mixed_6e = FIDInceptionC(768, 192)
    self.Mixed_7a = InceptionD(768)
    self.Mixed_7b = FIDInceptionE(1280, max_pool=False)
    self.Mixed_7c = FIDInceptionE(2048, max_pool=True)
    self.fc = tnn.Linear(2048, 1008)

  def forward(self, x):  # NCHW in [-1, 1] -> pool3 [B, 2048]; pytorch-fid's resize first
    x = F.interpolate(x, size=(299, 299), mode="bilinear", align_corners=False)
    x = self.Conv2d_2b_3x3(self.Conv2d_2a_3x3(self.Conv2d_1a_3x3(x)))
    x = F.max_pool2d(x, kernel_size=3, stride=2)
    x = self.Conv2d_4a_3x3(self.Conv2d_3b_1x1(x))
    x = F.max_pool2d(x, kernel_size=3, stride=2)
    for name in ("5b", "5c", "5d", "6a", "6b", "6c", "6d", "6e", "7a", "7b", "7c"):
      x = getattr(self, f"Mixed_{name}")(x)
    return F.adaptive_avg_pool2d(x, (1, 1)).flatten(1)


def _images(seed, n, h, w):
  # Smooth-ish images in [-1, 1] (a random low-res field upsampled + noise): closer to
  # photos than white noise, so the pooling and resize paths see real spatial structure.
  g = torch.Generator().manual_seed(seed)
  low = torch.rand(n, 3, max(2, h // 8), max(2, w // 8), generator=g) * 2 - 1
  x = F.interpolate(low, size=(h, w), mode="bilinear", align_corners=False)
  x = x + 0.2 * (torch.rand(n, 3, h, w, generator=g) * 2 - 1)
  return x.clamp(-1, 1)


def make_torch_model(seed=0):
  torch.manual_seed(seed)
  model = FIDInceptionV3()
  # Realistic BatchNorm statistics: one training-mode pass with momentum 1 sets each
  # running mean/var to that layer's batch statistics (so activations stay O(1) through
  # ~100 layers), then random perturbations make every statistic and affine term matter.
  for m in model.modules():
    if isinstance(m, tnn.BatchNorm2d):
      m.momentum = 1.0
  model.train()
  with torch.no_grad():
    model(_images(99, 2, 299, 299))
    for m in model.modules():
      if isinstance(m, tnn.BatchNorm2d):
        c = m.num_features
        m.running_mean += 0.3 * torch.randn(c) * m.running_var.sqrt()
        m.running_var *= torch.empty(c).uniform_(0.5, 2.0)
        m.weight.copy_(torch.empty(c).uniform_(0.5, 1.5))
        m.bias.copy_(0.2 * torch.randn(c))
  return model.eval()


@pytest.fixture(scope="module")
def torch_model():
  return make_torch_model()


@pytest.fixture(scope="module")
def state_dict(torch_model):
  return {k: v.detach().numpy().copy() for k, v in torch_model.state_dict().items()}


@pytest.fixture(scope="module")
def params(state_dict):
  return inception.convert(state_dict)


def _torch_pool3(model, x_nhwc):
  with torch.no_grad():
    return model(torch.from_numpy(np.ascontiguousarray(x_nhwc.transpose(0, 3, 1, 2)))).numpy()


# ----------------------------------------------------------------------------- tests


def test_reference_has_the_standard_file_layout(state_dict):
  keys = {k for k in state_dict if not k.endswith("num_batches_tracked")}
  # 94 conv+BN layers x 5 tensors + fc (the count of pt_inception-2015-12-05-6726825d.pth).
  assert len(keys) == 472
  assert state_dict["Conv2d_1a_3x3.conv.weight"].shape == (32, 3, 3, 3)
  assert state_dict["Mixed_6b.branch7x7_2.conv.weight"].shape == (128, 128, 1, 7)
  assert state_dict["Mixed_7c.branch_pool.conv.weight"].shape == (192, 2048, 1, 1)
  assert state_dict["Mixed_7c.branch3x3dbl_3b.bn.running_var"].shape == (384,)
  assert state_dict["fc.weight"].shape == (1008, 2048)
  # The module's own description of the layout agrees tensor by tensor.
  layout = inception.torch_layout()
  assert set(layout) | {"fc.weight", "fc.bias"} == keys
  assert all(layout[k] == state_dict[k].shape for k in layout)


def test_convert_uses_every_tensor_once_with_explicit_transposes(state_dict, params):
  leaves = jax.tree_util.tree_flatten_with_path(params)[0]
  assert len(leaves) == 470  # every conv/BN tensor; fc deliberately dropped
  p = params["Mixed_6b"]["branch7x7_2"]
  np.testing.assert_array_equal(p["conv"]["kernel"],
                                state_dict["Mixed_6b.branch7x7_2.conv.weight"].transpose(2, 3, 1, 0))
  assert p["conv"]["kernel"].shape == (1, 7, 128, 128)  # HWIO
  for ours, theirs in [("scale", "weight"), ("bias", "bias"), ("mean", "running_mean"),
                       ("var", "running_var")]:
    np.testing.assert_array_equal(p["bn"][ours], state_dict[f"Mixed_6b.branch7x7_2.bn.{theirs}"])
  # Every converted leaf is a distinct tensor of the file (no tensor used twice).
  fingerprints = {float(np.asarray(leaf).ravel()[:3].sum()) + leaf.size for _, leaf in leaves
                  if leaf.size > 1 and np.asarray(leaf).std() > 0}
  assert len(fingerprints) > 300


def test_pool3_matches_pytorch_at_299(torch_model, params):
  x = _images(1, 2, 299, 299).numpy().transpose(0, 2, 3, 1)  # batch 2 keeps this fast
  want = _torch_pool3(torch_model, x)
  got = inception.features(params, x)
  assert got.shape == (2, 2048) and got.dtype == np.float32
  assert want.std() > 0.05  # the random network is not degenerate
  np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-4 * np.abs(want).max())
  # The two images differ, and so do their features (no batch mixing or broadcasting bug).
  assert np.abs(got[0] - got[1]).max() > 1e-2


def test_small_inputs_resize_like_torch_interpolate(torch_model, params):
  x = _images(2, 2, 32, 32).numpy().transpose(0, 2, 3, 1)
  want_resized = F.interpolate(torch.from_numpy(x.transpose(0, 3, 1, 2).copy()), size=(299, 299),
                               mode="bilinear", align_corners=False).numpy().transpose(0, 2, 3, 1)
  got_resized = np.asarray(inception.resize_to_input(x))
  np.testing.assert_allclose(got_resized, want_resized, atol=1e-5)
  # End to end on the 32x32 input (reuses the compiled 299x299 network).
  want = _torch_pool3(torch_model, x)
  np.testing.assert_allclose(inception.features(params, x), want, rtol=1e-4,
                             atol=1e-4 * np.abs(want).max())


@pytest.mark.parametrize("hw", [(512, 400), (300, 301), (64, 1000)])
def test_resize_matches_torch_for_downsampling_and_odd_sizes(hw):
  x = np.random.default_rng(3).uniform(-1, 1, (1, *hw, 3)).astype(np.float32)
  want = F.interpolate(torch.from_numpy(x.transpose(0, 3, 1, 2).copy()), size=(299, 299),
                       mode="bilinear", align_corners=False).numpy().transpose(0, 2, 3, 1)
  np.testing.assert_allclose(np.asarray(inception.resize_to_input(x)), want, atol=1e-5)


def test_grayscale_equals_repeated_rgb_and_batching_is_invisible(params):
  g = _images(4, 3, 32, 32).numpy().transpose(0, 2, 3, 1)[..., :1]
  rgb = np.repeat(g, 3, axis=-1)
  full = inception.features(params, rgb, batch_size=2)  # chunks of 2 + a padded chunk of 1
  np.testing.assert_allclose(inception.features(params, g, batch_size=2), full, rtol=1e-6, atol=1e-6)
  # Image 2 alone in the zero-padded last chunk == image 2 in a full chunk.
  swapped = inception.features(params, rgb[[2, 0]], batch_size=2)
  np.testing.assert_allclose(swapped, full[[2, 0]], rtol=1e-5, atol=1e-5 * np.abs(full).max())


def test_convert_names_missing_unexpected_and_misshaped_tensors(state_dict):
  sd = dict(state_dict)
  del sd["Mixed_5c.branch5x5_2.bn.running_mean"]
  with pytest.raises(inception.InceptionWeightsError,
                     match=r"missing 1: Mixed_5c\.branch5x5_2\.bn\.running_mean"):
    inception.convert(sd)
  sd = dict(state_dict, **{"AuxLogits.conv0.conv.weight": np.zeros((128, 768, 1, 1), np.float32)})
  with pytest.raises(inception.InceptionWeightsError, match=r"unexpected 1: AuxLogits\.conv0\.conv\.weight"):
    inception.convert(sd)
  sd = dict(state_dict, **{"Mixed_7b.branch1x1.conv.weight": np.zeros((320, 1280, 3, 3), np.float32)})
  with pytest.raises(inception.InceptionWeightsError,
                     match=r"wrong shape 1: Mixed_7b\.branch1x1\.conv\.weight \(320, 1280, 3, 3\) "
                           r"\(expected \(320, 1280, 1, 1\)\)"):
    inception.convert(sd)
  sd = dict(state_dict, **{"fc.weight": np.zeros((1000, 2048), np.float32)})
  with pytest.raises(inception.InceptionWeightsError, match=r"fc\.weight \(1000, 2048\)"):
    inception.convert(sd)
  # fc and num_batches_tracked are optional: the file without them converts.
  lean = {k: v for k, v in state_dict.items()
          if not (k.startswith("fc.") or k.endswith("num_batches_tracked"))}
  assert len(jax.tree_util.tree_leaves(inception.convert(lean))) == 470
  assert issubclass(inception.InceptionWeightsError, ValueError)


def test_load_weights_pth_npz_and_cli_conversion(tmp_path, torch_model, state_dict, params, capsys):
  pth = tmp_path / "pt_inception-2015-12-05-6726825d.pth"
  torch.save(torch_model.state_dict(), pth)
  from_pth = inception.load_weights(str(pth))
  out = tmp_path / "conv" / "inception_fid.npz"
  assert inception.main(["--torch", str(pth), "--out", str(out)]) == 0
  from_npz = inception.load_weights(str(out))
  for a, b, c in zip(jax.tree_util.tree_leaves(params), jax.tree_util.tree_leaves(from_pth),
                     jax.tree_util.tree_leaves(from_npz)):
    np.testing.assert_array_equal(a, b)
    np.testing.assert_array_equal(a, c)
  # A file that would need arbitrary unpickling is refused by weights_only=True.
  evil = tmp_path / "evil.pth"
  torch.save({"x": _Pickled()}, evil)
  with pytest.raises(inception.InceptionWeightsError, match="cannot read .*evil.pth"):
    inception.load_weights(str(evil))
  assert inception.main(["--torch", str(evil), "--out", str(tmp_path / "e.npz")]) == 2
  assert "error: cannot read" in capsys.readouterr().err
  assert not (tmp_path / "e.npz").exists()
  with pytest.raises(inception.InceptionWeightsError, match="does not exist; download https://github.com/"
                                                           "mseitzer/pytorch-fid/releases"):
    inception.load_weights(str(tmp_path / "nope.pth"))


class _Pickled:
  pass


def test_feature_input_errors(params):
  with pytest.raises(ValueError, match=r"NHWC with 1 or 3 channels, got shape \(2, 3, 32, 32\)"):
    inception.features(params, np.zeros((2, 3, 32, 32), np.float32))
  with pytest.raises(ValueError, match="floats in \\[-1, 1\\], got dtype uint8"):
    inception.features(params, np.zeros((1, 32, 32, 3), np.uint8))
  with pytest.raises(ValueError, match=r"in \[-1, 1\], got max \|x\| = 255"):
    inception.features(params, np.full((1, 32, 32, 3), 255.0, np.float32))
