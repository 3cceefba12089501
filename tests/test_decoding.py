"""Sampling and beam search against independent computations: exhaustive
enumeration scored by teacher forcing, and the softmax of the logits."""

import itertools

import jax
import numpy as np
import pytest
from scipy import stats

from model import network
from model.config import T5Config
from model.decoding import DecodingConfig
from model.inference import InferenceModel


def tiny_model(vocab_size=8, seed=3, eos_boost=1.5):
  config = T5Config(vocab_size=vocab_size, d_model=16, num_heads=2, d_kv=8,
                    d_ff=32, num_encoder_layers=1, num_decoder_layers=2)
  params = network.init_params(config, seed)
  # Make EOS likely enough that sequences end at varied lengths.
  params['decoder']['logits_dense']['kernel'] = (
      params['decoder']['logits_dense']['kernel'].at[:, 1].add(eos_boost))
  return InferenceModel(config, params)


def sequence_log_likelihood(model, encoder, sequences):
  """Teacher-forced log p(sequence) for each row (0-padded after EOS)."""
  sequences = np.asarray(sequences, np.int32)
  decoder_inputs = np.zeros_like(sequences)
  decoder_inputs[:, 1:] = sequences[:, :-1]
  weights = np.zeros(sequences.shape, np.float32)
  for row, seq in enumerate(sequences):
    length = (list(seq).index(1) + 1) if 1 in seq else len(seq)
    weights[row, :length] = 1
  return model.score_batch(dict(
      encoder_input_tokens=np.repeat(encoder, len(sequences), axis=0),
      decoder_input_tokens=decoder_inputs, decoder_target_tokens=sequences,
      decoder_loss_weights=weights))


ENCODER = np.array([[5, 3, 7, 2, 6, 0]], np.int32)


def test_beam_search_finds_the_exhaustively_best_sequence():
  model = tiny_model()
  length, vocab = 4, 8
  # Every sequence that ends with EOS within `length` tokens.
  finished = []
  for n in range(1, length + 1):
    for prefix in itertools.product([t for t in range(vocab) if t != 1],
                                    repeat=n - 1):
      finished.append(list(prefix) + [1] + [0] * (length - n))
  scores = sequence_log_likelihood(model, ENCODER, finished)
  best = finished[int(np.argmax(scores))]
  # 2048 beams keep every prefix of length <= 3, so the search is exact.
  tokens, beam_scores = model.predict_batch(
      {'encoder_input_tokens': ENCODER}, max_length=length,
      return_scores=True,
      decoding=DecodingConfig('beam_search', num_decodes=2048, alpha=0.0))
  assert tokens[0].tolist() == best
  np.testing.assert_allclose(beam_scores[0], scores.max(), atol=1e-4)


def test_beam_ranking_follows_the_brevity_penalty():
  model = tiny_model(vocab_size=50, seed=4, eos_boost=2.0)
  encoder = np.random.default_rng(1).integers(2, 50, (6, 9)).astype(np.int32)
  alpha = 0.8
  tokens, scores = model.predict_batch(
      {'encoder_input_tokens': encoder}, max_length=7, return_scores=True,
      decoding=DecodingConfig('beam_search', num_decodes=4, alpha=alpha,
                              return_all_decodes=True))
  assert tokens.shape == (6, 4, 7)
  checked = 0
  for example in range(6):
    assert (np.diff(scores[example]) >= -1e-6).all()  # increasing
    for decode, score in zip(tokens[example], scores[example]):
      if 1 not in decode.tolist():
        continue  # an empty finished slot
      length = decode.tolist().index(1) + 1
      log_likelihood = sequence_log_likelihood(
          model, encoder[example:example + 1], [decode])[0]
      penalty = ((5 + length) / 6) ** alpha
      np.testing.assert_allclose(score, log_likelihood / penalty, atol=1e-4)
      checked += 1
  assert checked >= 12


def test_one_beam_decodes_as_greedy_unless_it_finds_better():
  model = tiny_model(vocab_size=50, seed=5, eos_boost=2.5)
  encoder = np.random.default_rng(2).integers(2, 50, (32, 9)).astype(np.int32)
  greedy = model.predict_batch({'encoder_input_tokens': encoder},
                               max_length=8)
  beam = model.predict_batch(
      {'encoder_input_tokens': encoder}, max_length=8,
      decoding=DecodingConfig('beam_search', num_decodes=1, alpha=0.0))
  same = (greedy == beam).all(axis=1)
  assert same.mean() >= 0.75
  # Where they differ, the single beam kept an EOS candidate that is more
  # likely than greedy's whole sequence (beam search's own rule, as T5X).
  for row in np.flatnonzero(~same):
    pair = sequence_log_likelihood(model, encoder[row:row + 1],
                                   [beam[row], greedy[row]])
    assert pair[0] > pair[1]


def greedy_reference():
  """(model, encoder tokens, their greedy decodes) for the sampling tests
  that must reduce to greedy."""
  model = tiny_model(vocab_size=50, seed=6, eos_boost=1.0)
  encoder = np.random.default_rng(3).integers(2, 50, (16, 9)).astype(np.int32)
  greedy = model.predict_batch({'encoder_input_tokens': encoder},
                               max_length=8)
  return model, encoder, greedy


def test_sampling_with_topk_1_is_greedy():
  model, encoder, greedy = greedy_reference()
  sampled = model.predict_batch(
      {'encoder_input_tokens': encoder}, max_length=8,
      decoding=DecodingConfig('temperature_sample', topk=1),
      rng=jax.random.PRNGKey(9))
  np.testing.assert_array_equal(sampled, greedy)


def test_sampling_at_temperature_0_is_greedy():
  model, encoder, greedy = greedy_reference()
  sampled = model.predict_batch(
      {'encoder_input_tokens': encoder}, max_length=8,
      decoding=DecodingConfig('temperature_sample', topk=0, temperature=0.0,
                              num_decodes=2, return_all_decodes=True),
      rng=jax.random.PRNGKey(9))
  np.testing.assert_array_equal(sampled[:, 0], greedy)
  np.testing.assert_array_equal(sampled[:, 1], greedy)


def test_max_decode_steps_stops_decoding_early():
  model = tiny_model(vocab_size=50, seed=6, eos_boost=0.0)
  encoder = np.random.default_rng(3).integers(2, 50, (8, 9)).astype(np.int32)
  batch = {'encoder_input_tokens': encoder}
  settings = dict(strategy='temperature_sample', topk=0)
  full = model.predict_batch(batch, max_length=8, rng=jax.random.PRNGKey(2),
                             decoding=DecodingConfig(**settings))
  capped = model.predict_batch(
      batch, max_length=8, rng=jax.random.PRNGKey(2),
      decoding=DecodingConfig(**settings, max_decode_steps=3))
  assert (full[:, 3:] != 0).any()  # without the cap, decoding goes on
  assert (capped[:, 3:] == 0).all()
  np.testing.assert_array_equal(capped[:, :3], full[:, :3])


@pytest.mark.parametrize('temperature', [1.0, 0.6])
def test_sampled_first_tokens_follow_the_softmax(temperature):
  model = tiny_model(vocab_size=8, seed=7, eos_boost=0.0)
  logits = np.asarray(model.module.apply(
      model.variables, ENCODER, np.zeros((1, 1), np.int32)))[0, 0]
  scaled = logits.astype(np.float64) / temperature
  expected = np.exp(scaled - scaled.max())
  expected /= expected.sum()
  samples = 6000
  tokens = model.predict_batch(
      {'encoder_input_tokens': ENCODER}, max_length=1,
      decoding=DecodingConfig('temperature_sample', topk=0,
                              temperature=temperature,
                              num_decodes=samples, return_all_decodes=True),
      rng=jax.random.PRNGKey(2026))
  counts = np.bincount(tokens[0, :, 0], minlength=8)
  result = stats.chisquare(counts, expected * counts.sum())
  assert result.pvalue > 0.001, (counts, expected * samples)


def test_nucleus_sampling_never_leaves_the_nucleus():
  model = tiny_model(vocab_size=8, seed=7, eos_boost=0.0)
  logits = np.asarray(model.module.apply(
      model.variables, ENCODER, np.zeros((1, 1), np.int32)))[0, 0]
  probs = np.exp(logits - logits.max())
  probs /= probs.sum()
  order = np.argsort(-probs)
  topp = 0.7
  nucleus = set(order[:int(np.searchsorted(np.cumsum(probs[order]), topp)) +
                      1].tolist())
  tokens = model.predict_batch(
      {'encoder_input_tokens': ENCODER}, max_length=1,
      decoding=DecodingConfig('temperature_sample', topk=0, topp=topp,
                              num_decodes=2000, return_all_decodes=True),
      rng=jax.random.PRNGKey(1))
  seen = set(np.unique(tokens[0, :, 0]).tolist())
  assert seen == nucleus, (seen, nucleus)


def test_same_key_same_samples_other_key_other_samples():
  model = tiny_model(vocab_size=50, seed=8, eos_boost=0.5)
  encoder = np.random.default_rng(4).integers(2, 50, (8, 9)).astype(np.int32)
  config = DecodingConfig('temperature_sample', topk=0, num_decodes=3,
                          return_all_decodes=True)
  batch = {'encoder_input_tokens': encoder}
  first = model.predict_batch(batch, max_length=8, decoding=config,
                              rng=jax.random.PRNGKey(5))
  again = model.predict_batch(batch, max_length=8, decoding=config,
                              rng=jax.random.PRNGKey(5))
  other = model.predict_batch(batch, max_length=8, decoding=config,
                              rng=jax.random.PRNGKey(6))
  np.testing.assert_array_equal(first, again)
  assert (first != other).any()


def test_topk_and_topp_together_are_refused():
  with pytest.raises(ValueError, match='only one of topk'):
    DecodingConfig('temperature_sample', topk=5, topp=0.9)
