"""Text-feature extraction: JAX MiniLM parity with sentence-transformers (torch), the caption
templates, the encode_text CLI's npz contract, and the CLIP path (errors + a tiny random CLIP)."""
import json
import re
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from deediff_jax.data import captions as C
from deediff_jax.data import encode_text as E
from deediff_jax.data import minilm

REPO = Path(__file__).resolve().parents[1]
SENTENCES = ["a handwritten seven", "The digit 7, written thickly!", "",
             "someone wrote down an eight here", "number nine"]


@pytest.fixture(scope="module")
def jax_model():
  return minilm.load(max_length=16)


@pytest.fixture(scope="module")
def st_model():
  st = pytest.importorskip("sentence_transformers")
  return st.SentenceTransformer(str(minilm.default_model_dir()), device="cpu")


def names_of(caption):
  """The digits a caption names, by word or numeral (word boundaries: 'someone' is not 'one')."""
  found = set()
  for d, w in enumerate(C.DIGIT_WORDS):
    if re.search(rf"\b({w}|{d})\b", caption):
      found.add(d)
  return found


# --------------------------------------------------------------------------- MiniLM in JAX


def test_minilm_matches_sentence_transformers(jax_model, st_model):
  hidden, mask = jax_model(SENTENCES)
  assert hidden.shape == (len(SENTENCES), 16, 384) and hidden.dtype == np.float32
  assert mask.shape == (len(SENTENCES), 16) and mask.dtype == bool
  ref_ids = st_model.tokenizer(SENTENCES)["input_ids"]
  ids, _, n_trunc = minilm.tokenize(jax_model.tokenizer, SENTENCES)
  assert n_trunc == 0
  ref_tokens = st_model.encode(SENTENCES, output_value="token_embeddings", convert_to_numpy=False)
  for i, ref_id in enumerate(ref_ids):
    n = len(ref_id)
    # Same WordPiece ids ([CLS] ... [SEP]), then [PAD]=0 up to 16.
    np.testing.assert_array_equal(ids[i, :n], ref_id)
    assert not ids[i, n:].any() and mask[i, :n].all() and not mask[i, n:].any()
    np.testing.assert_allclose(hidden[i, :n], ref_tokens[i].numpy(), atol=1e-4, rtol=0)
  pooled = np.asarray(minilm.mean_pool(hidden, mask))
  ref_pooled = np.stack([t.numpy().mean(0) for t in ref_tokens])    # before normalisation
  np.testing.assert_allclose(pooled, ref_pooled, atol=1e-5)
  # sentence-transformers' encode = mean pool + L2 normalise (its 2_Normalize module).
  unit = pooled / np.linalg.norm(pooled, axis=-1, keepdims=True)
  np.testing.assert_allclose(unit, st_model.encode(SENTENCES), atol=1e-5)


def test_minilm_padding_does_not_leak(jax_model):
  # Real tokens must not attend to padding: a longer pad gives the same real-token states.
  long = minilm.MiniLM(jax_model.params, jax_model.cfg, minilm.load_tokenizer(None, 24), 24)
  h16, m16 = jax_model(SENTENCES)
  h24, m24 = long(SENTENCES)
  np.testing.assert_array_equal(m24[:, :16], m16)
  np.testing.assert_allclose(h24[:, :16] * m16[..., None], h16 * m16[..., None], atol=1e-5)


def test_minilm_truncates_to_max_length(jax_model):
  text = "one two three four five six seven eight nine ten eleven twelve thirteen fourteen fifteen"
  ids, mask, n_trunc = minilm.tokenize(jax_model.tokenizer, [text])
  assert n_trunc == 1 and mask.all() and ids[0, 0] == 101 and ids[0, -1] == 102  # [CLS] ... [SEP]


def test_minilm_missing_files_error(tmp_path):
  with pytest.raises(minilm.MiniLMError, match=r"lacks model.safetensors, tokenizer.json, config.json"):
    minilm.load(tmp_path)


# --------------------------------------------------------------------------- caption templates


def test_templates_name_only_their_digit_and_fit_16_tokens(jax_model):
  assert len(C.TRAIN_TEMPLATES) >= 8 and len(C.HELDOUT_TEMPLATES) >= 2
  for d in range(10):
    train, held = C.captions_of(d, "train"), C.captions_of(d, "heldout")
    assert len(set(train)) == len(train) and not set(train) & set(held)
    for cap in train + held:
      assert names_of(cap) == {d}, cap
    assert any(C.DIGIT_WORDS[d] in c for c in train) and any(str(d) in c for c in train)
    _, _, n_trunc = minilm.tokenize(jax_model.tokenizer, train + held)
    assert n_trunc == 0
  assert C.fill("{a_word} / {a_num}", 8) == "an eight / an 8"
  assert C.fill("{a_word} / {a_num}", 1) == "a one / a 1"


def test_heldout_wording_structure_differs():
  # No word trigram of a held-out template occurs in any training template: the held-out
  # prompts are new sentence shapes, not the training strings with one word swapped.
  def trigrams(t):
    w = t.replace(",", "").split()
    return {tuple(w[i:i + 3]) for i in range(len(w) - 2)}
  train = set().union(*map(trigrams, C.TRAIN_TEMPLATES))
  for t in C.HELDOUT_TEMPLATES:
    assert not trigrams(t) & train, t


def test_caption_for_is_seeded_and_validates():
  a = [C.caption_for(3, np.random.default_rng(7)) for _ in range(3)]
  assert len(set(a)) == 1 and a[0] in C.captions_of(3, "train")
  draws = {C.caption_for(3, r) for r in [np.random.default_rng(1)] for _ in range(200)}
  assert draws == set(C.captions_of(3, "train"))          # every template gets used
  assert C.caption_for(5, np.random.default_rng(0), "heldout") in C.captions_of(5, "heldout")
  with pytest.raises(ValueError, match="caption split must be one of train, heldout"):
    C.caption_for(3, np.random.default_rng(0), "test")
  with pytest.raises(ValueError, match="digit label must be an integer in 0..9"):
    C.caption_for(10, np.random.default_rng(0))


# --------------------------------------------------------------------------- the CLI


def expected(jax_model, texts):
  h, m = jax_model(texts)
  return np.where(m[..., None], h, 0.0), m


def test_cli_caption_file(tmp_path, jax_model, capsys):
  lines = ["a handwritten seven", "number nine", "a handwritten seven", "the digit 4"]
  src = tmp_path / "caps.txt"
  src.write_text("\n".join(lines) + "\n")
  out = tmp_path / "feats.npz"
  assert E.main(["--captions", str(src), "--out", str(out), "--no-progress"]) == 0
  summary = capsys.readouterr().out.strip()
  assert summary.startswith(f"encode_text: wrote {out}: 3 unique captions (4 train, 0 held-out) x 16 "
                            "tokens x 384 (minilm, float16), 0 truncated")
  z = np.load(out)
  assert set(z.files) == {"features", "captions", "mask", "caption_index", "null_features",
                          "eval_captions", "eval_features", "eval_mask", "eval_labels", "encoder",
                          "max_length"}
  assert z["features"].shape == (3, 16, 384) and z["features"].dtype == np.float16
  assert z["mask"].dtype == bool and z["caption_index"].dtype == np.int32
  assert list(z["captions"]) == ["a handwritten seven", "number nine", "the digit 4"]
  assert list(z["captions"][z["caption_index"]]) == lines
  want, want_mask = expected(jax_model, list(z["captions"]))
  np.testing.assert_array_equal(z["mask"], want_mask)
  np.testing.assert_allclose(z["features"].astype(np.float32), want, atol=1e-2, rtol=2e-3)
  assert not z["features"][~z["mask"]].any()                     # padding zeroed
  null, null_mask = expected(jax_model, [""])
  assert null_mask[0].sum() == 2 and z["null_features"].shape == (16, 384)
  np.testing.assert_allclose(z["null_features"].astype(np.float32), null[0], atol=1e-2, rtol=2e-3)
  assert z["null_features"][:2].any() and not z["null_features"][2:].any()
  assert str(z["encoder"]) == "minilm" and int(z["max_length"]) == 16
  assert z["eval_features"].shape == (0, 16, 384) and z["eval_labels"].shape == (0,)
  # Held-out captions for a plain caption file: their features, no labels, sampled in order.
  held = tmp_path / "held.txt"
  held.write_text("number nine\nthe digit 2\n")
  out2 = tmp_path / "feats2.npz"
  assert E.main(["--captions", str(src), "--eval-captions", str(held), "--out", str(out2), "--no-progress"]) == 0
  z2 = np.load(out2)
  assert list(z2["eval_captions"]) == ["number nine", "the digit 2"] and "eval_labels" not in z2.files
  np.testing.assert_array_equal(z2["eval_features"][0], z2["features"][1])   # same caption, same features
  from deediff_jax.config import base_config
  from deediff_jax.data.eval_context import EvalContextError, load_eval_context
  c = base_config()
  c.model.update(num_classes=0, context_dim=384, context_len=16)
  c.data.context_file = str(out2)
  ctx, labels, null = load_eval_context(c, 3)
  assert ctx.shape == (3, 16, 384) and labels is None and null.shape == (16, 384)
  c.data.context_file = str(out)   # no held-out captions: one line naming the fix
  with pytest.raises(EvalContextError, match="holds no held-out captions to sample from; encode some"):
    load_eval_context(c, 3)


def test_cli_json_captions_max_length_and_truncation(tmp_path, capsys):
  long = "a very long caption " * 4
  src = tmp_path / "caps.json"
  src.write_text(json.dumps(["a 7", long]))
  out = tmp_path / "f.npz"
  assert E.main(["--captions", str(src), "--out", str(out), "--max-length", "8", "--no-progress"]) == 0
  assert ", 1 truncated," in capsys.readouterr().out
  z = np.load(out)
  assert z["features"].shape == (2, 8, 384) and z["null_features"].shape == (8, 384)
  assert z["mask"].sum(1).tolist() == [4, 8]                     # [CLS] a 7 [SEP]; truncated full


def fake_mnist(path, n_train=60, n_test=20):
  rng = np.random.default_rng(0)
  np.savez(path, image=rng.integers(0, 256, (n_train, 28, 28, 1), dtype=np.uint8),
           label=np.arange(n_train, dtype=np.uint8) % 10,
           test_image=rng.integers(0, 256, (n_test, 28, 28, 1), dtype=np.uint8),
           test_label=(np.arange(n_test, dtype=np.uint8) * 3) % 10)


def test_cli_captions_for_mnist_npz(tmp_path, jax_model, capsys):
  src = tmp_path / "mnist.npz"
  fake_mnist(src)
  out = tmp_path / "mnist_caps.npz"
  assert E.main(["--captions-for-npz", str(src), "--out", str(out), "--seed", "3", "--no-progress"]) == 0
  assert "(60 train, 20 test, 30 held-out)" in capsys.readouterr().out
  z, labels = np.load(out), np.load(src)
  m = len(z["captions"])
  assert z["features"].shape == (m, 16, 384) and z["mask"].shape == (m, 16)
  assert z["caption_index"].shape == (60,) and z["test_caption_index"].shape == (20,)
  assert z["test_caption_index"].dtype == np.int32
  for idx, lab in ((z["caption_index"], labels["label"]), (z["test_caption_index"], labels["test_label"])):
    for row, d in zip(idx, lab):
      cap = str(z["captions"][row])
      assert names_of(cap) == {int(d)} and cap in C.captions_of(int(d), "train"), (cap, d)
  held = {c for d in range(10) for c in C.captions_of(d, "heldout")}
  assert not held & set(z["captions"].tolist())                 # never seen in training
  assert sorted(z["eval_captions"].tolist()) == sorted(held)
  for cap, d in zip(z["eval_captions"], z["eval_labels"]):
    assert names_of(str(cap)) == {int(d)}
  want, want_mask = expected(jax_model, list(z["eval_captions"][:4]) + [""])
  np.testing.assert_allclose(z["eval_features"][:4].astype(np.float32), want[:4], atol=1e-2, rtol=2e-3)
  np.testing.assert_array_equal(z["eval_mask"][:4], want_mask[:4])
  np.testing.assert_allclose(z["null_features"].astype(np.float32), want[4], atol=1e-2, rtol=2e-3)
  # Deterministic given the seed; another seed draws other templates.
  again = E.mnist_captions(str(src), seed=3)
  assert again[0] == list(z["captions"][z["caption_index"]])
  assert again[1] == list(z["captions"][z["test_caption_index"]])
  assert E.mnist_captions(str(src), seed=4)[0] != again[0]


def test_cli_bad_inputs_one_line(tmp_path, capsys):
  caps = tmp_path / "c.txt"
  caps.write_text("a 7\n\nnumber two\n")
  assert E.main(["--captions", str(caps), "--out", str(tmp_path / "o.npz")]) == 2
  assert capsys.readouterr().err == (f"encode_text: error: caption 2 of {caps} is empty; every entry must "
                                     "be a caption (the empty-caption null embedding is written as "
                                     "null_features anyway)\n")
  bad = tmp_path / "nolabel.npz"
  np.savez(bad, image=np.zeros((2, 4, 4), np.uint8))
  assert E.main(["--captions-for-npz", str(bad), "--out", str(tmp_path / "o.npz")]) == 2
  assert capsys.readouterr().err == (f"encode_text: error: --captions-for-npz {bad} has no 'label' array "
                                     "(it has image); captions are written from digit labels\n")


# --------------------------------------------------------------------------- CLIP


def test_clip_missing_path_error(tmp_path):
  caps = tmp_path / "c.txt"
  caps.write_text("a 7\n")
  r = subprocess.run([sys.executable, "-m", "deediff_jax.data.encode_text", "--encoder", "clip",
                      "--captions", str(caps), "--out", str(tmp_path / "o.npz")],
                     capture_output=True, text=True, cwd=REPO, timeout=60)
  assert r.returncode == 2 and r.stdout == ""
  assert r.stderr == ("encode_text: error: --encoder clip needs a local CLIP text model: download "
                      "openai/clip-vit-large-patch14 on a machine with internet (e.g. `hf download "
                      "openai/clip-vit-large-patch14 --local-dir DIR`) and pass --encoder-path DIR\n")
  with pytest.raises(E.EncodeTextError, match=r"^--encoder-path /no/such/clip does not exist; download "
                     r"openai/clip-vit-large-patch14"):
    E.get_encoder("clip", "/no/such/clip")
  (tmp_path / "empty").mkdir()
  with pytest.raises(E.EncodeTextError, match=r"empty has no config.json; download"):
    E.get_encoder("clip", str(tmp_path / "empty"))


def test_clip_encoder_uvit_convention(tmp_path, capsys):
  """A tiny random CLIP text model stands in for ViT-L/14: 77 tokens, no mask, all kept."""
  torch = pytest.importorskip("torch")
  pytest.importorskip("transformers")
  from tiny_clip import save_tiny_clip
  d = tmp_path / "clip"
  tok, model = save_tiny_clip(d)
  src = tmp_path / "c.txt"
  src.write_text("a 7\nnumber two\n")
  out = tmp_path / "clip.npz"
  assert E.main(["--encoder", "clip", "--encoder-path", str(d), "--captions", str(src), "--out", str(out),
                 "--no-progress"]) == 0
  z = np.load(out)
  assert z["features"].shape == (2, 77, 32) and z["mask"].all() and str(z["encoder"]) == "clip"
  assert int(z["max_length"]) == 77
  ids = tok(["a 7", "number two", ""], padding="max_length", max_length=77, truncation=True,
            return_tensors="pt")["input_ids"]
  with torch.no_grad():
    ref = model(input_ids=ids).last_hidden_state.numpy()
  np.testing.assert_allclose(z["features"].astype(np.float32), ref[:2], atol=5e-3, rtol=2e-3)
  np.testing.assert_allclose(z["null_features"].astype(np.float32), ref[2], atol=5e-3, rtol=2e-3)


def test_coco_captions_json_gives_the_first_caption_per_image_in_id_order(tmp_path):
  ann = {"images": [{"id": 7, "file_name": "b.jpg"}, {"id": 3, "file_name": "a.jpg"}],
         "annotations": [{"id": 5, "image_id": 7, "caption": "seven  late\n"}, {"id": 2, "image_id": 7, "caption": "seven"},
                         {"id": 9, "image_id": 3, "caption": "three"}]}
  p = tmp_path / "captions_val2014.json"
  p.write_text(json.dumps(ann))
  assert E.read_caption_file(str(p)) == ["three", "seven"]
  from deediff_jax.data import coco
  assert coco.captions_for_files(str(p), ["x/b.jpg", "a.jpg"]) == ["seven", "three"]
  with pytest.raises(coco.CocoCaptionsError, match=r"^image c.jpg has no caption in .*captions_val2014.json; "):
    coco.captions_for_files(str(p), ["c.jpg"])
  (tmp_path / "bad.json").write_text(json.dumps({"images": [{"id": 1}], "annotations": []}))
  with pytest.raises(E.EncodeTextError, match=r"bad.json is not a COCO captions file \(KeyError: 'file_name'\)$"):
    E.read_caption_file(str(tmp_path / "bad.json"))
  (tmp_path / "empty.json").write_text(json.dumps({"images": [], "annotations": []}))
  with pytest.raises(E.EncodeTextError, match=r"empty.json has no captions$"):
    E.read_caption_file(str(tmp_path / "empty.json"))
