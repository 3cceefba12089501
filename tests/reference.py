"""Hugging Face `transformers` (PyTorch) T5 models as the independent reference.

Tests build a random reference model for a `T5Config`, save it with
`save_pretrained` (the library that owns the format), and compare what our
JAX model computes from those files with what `transformers` computes.
"""

import numpy as np
import torch
import transformers

from model.config import T5Config


def hf_config(config: T5Config) -> transformers.T5Config:
  return transformers.T5Config(
      vocab_size=config.vocab_size, d_model=config.d_model, d_kv=config.d_kv,
      d_ff=config.d_ff, num_layers=config.num_encoder_layers,
      num_decoder_layers=config.num_decoder_layers,
      num_heads=config.num_heads,
      relative_attention_num_buckets=config.relative_attention_num_buckets,
      relative_attention_max_distance=config.relative_attention_max_distance,
      feed_forward_proj=config.feed_forward,
      tie_word_embeddings=config.logits_via_embedding,
      layer_norm_epsilon=config.layer_norm_epsilon, dropout_rate=0.0,
      pad_token_id=0, eos_token_id=1, decoder_start_token_id=0)


def make_reference(config: T5Config, seed: int = 0,
                   eos_boost: float = 0.0
                   ) -> transformers.T5ForConditionalGeneration:
  """A randomly initialised `transformers` T5 in eval mode, float32.

  transformers 5 ties lm_head to the shared embedding for every T5 config;
  a T5 1.1-style config gets its own output layer here. `eos_boost` is added
  to the EOS row of the output layer so that greedy decoding ends sequences
  at varied lengths.
  """
  torch.manual_seed(seed)
  model = transformers.T5ForConditionalGeneration(hf_config(config)).eval()
  if not config.logits_via_embedding:
    model.lm_head.weight = torch.nn.Parameter(
        torch.randn(config.vocab_size, config.d_model) * config.d_model**-0.5)
  with torch.no_grad():
    head = model.shared if config.logits_via_embedding else model.lm_head
    head.weight[1] += eos_boost
  count = sum(p.numel() for p in model.parameters())
  assert count == config.num_parameters(), (count, config.num_parameters())
  return model


def random_inputs(rng: np.random.Generator, batch: int, length: int,
                  vocab_size: int, min_length: int = 1) -> np.ndarray:
  """[batch, length] int32 token ids in [2, vocab), 0-padded to varied
  lengths (one example of every length from min_length up, cycling)."""
  tokens = rng.integers(2, vocab_size, size=(batch, length)).astype(np.int32)
  lengths = min_length + np.arange(batch) % (length - min_length + 1)
  tokens[np.arange(length)[None, :] >= lengths[:, None]] = 0
  return tokens


def hf_greedy(model, encoder_tokens: np.ndarray, max_length: int) -> np.ndarray:
  """transformers' greedy `generate`, as [batch, max_length], 0 after EOS."""
  inputs = torch.from_numpy(encoder_tokens.astype(np.int64))
  with torch.no_grad():
    out = model.generate(input_ids=inputs, attention_mask=inputs > 0,
                         max_new_tokens=max_length, do_sample=False,
                         num_beams=1).numpy()
  out = out[:, 1:]  # drop the decoder start token
  result = np.zeros((out.shape[0], max_length), np.int32)
  result[:, :out.shape[1]] = out
  return result


def hf_logits(model, encoder_tokens, decoder_input_tokens) -> np.ndarray:
  inputs = torch.from_numpy(encoder_tokens.astype(np.int64))
  with torch.no_grad():
    return model(input_ids=inputs, attention_mask=inputs > 0,
                 decoder_input_ids=torch.from_numpy(
                     decoder_input_tokens.astype(np.int64))).logits.numpy()


def hf_encoder_output(model, encoder_tokens) -> np.ndarray:
  inputs = torch.from_numpy(encoder_tokens.astype(np.int64))
  with torch.no_grad():
    return model.encoder(input_ids=inputs,
                         attention_mask=inputs > 0).last_hidden_state.numpy()


def hf_scores(model, encoder_tokens, decoder_input_tokens,
              decoder_target_tokens, weights) -> np.ndarray:
  """Summed log-likelihood of the targets per example, from torch."""
  logits = torch.from_numpy(
      hf_logits(model, encoder_tokens, decoder_input_tokens)).double()
  log_probs = torch.log_softmax(logits, dim=-1).numpy()
  token = np.take_along_axis(log_probs, decoder_target_tokens[..., None],
                             axis=-1)[..., 0]
  return (token * weights).sum(-1)
