"""A tiny random CLIP text model saved like openai/clip-vit-large-patch14 (config.json, weights,
tokenizer files), standing in for the real one in tests: byte-level vocabulary, no merges, one layer,
width 32, 77 positions."""


def save_tiny_clip(path, width: int = 32):
  """Writes the model and tokenizer to `path`; returns (tokenizer, model)."""
  import torch
  from tokenizers import pre_tokenizers
  from transformers import CLIPTextConfig, CLIPTextModel, CLIPTokenizer
  vocab = {"<|startoftext|>": 0, "<|endoftext|>": 1}
  chars = sorted(pre_tokenizers.ByteLevel.alphabet())
  for c in chars + [c + "</w>" for c in chars]:
    vocab[c] = len(vocab)
  tok = CLIPTokenizer(vocab=vocab, merges=[])
  tok.save_pretrained(path)
  torch.manual_seed(0)
  model = CLIPTextModel(CLIPTextConfig(vocab_size=len(vocab), hidden_size=width, intermediate_size=2 * width,
                                       num_hidden_layers=1, num_attention_heads=2,
                                       max_position_embeddings=77, bos_token_id=0, eos_token_id=1,
                                       pad_token_id=1)).eval()
  model.save_pretrained(path)
  return tok, model
