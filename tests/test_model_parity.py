"""Our JAX T5 against Hugging Face transformers' PyTorch T5, float32, CPU.

Each reference model is random, saved with `save_pretrained` and read back
by our Hugging Face checkpoint reader, so the reader is under test too.
"""

import dataclasses

import jax
import numpy as np
import pytest
import torch
from transformers.models.t5 import modeling_t5

from model import batching as batching_lib
from model import checkpoints
from model.batching import Batching
from model.config import T5Config
from model.decoding import DecodingConfig
from model.inference import InferenceModel
from model.network import relative_position_buckets
from tests import reference as ref

BATCH = 64
INPUT_LENGTH = 40
TARGET_LENGTH = 12

CONFIGS = {
    # T5 1.0 style: ReLU, logits through the scaled shared embedding.
    't5_1_0_style': T5Config(
        vocab_size=300, d_model=64, num_heads=4, d_kv=16, d_ff=128,
        num_encoder_layers=2, num_decoder_layers=2, feed_forward='relu',
        logits_via_embedding=True),
    # T5 1.1 style: gated GELU, separate logits layer, other head count and
    # bucket settings, more encoder than decoder layers.
    't5_1_1_style': T5Config(
        vocab_size=384, d_model=48, num_heads=3, d_kv=8, d_ff=96,
        num_encoder_layers=3, num_decoder_layers=2, feed_forward='gated-gelu',
        logits_via_embedding=False, relative_attention_num_buckets=16,
        relative_attention_max_distance=20),
}
# Added to the EOS output row so sequences end at varied steps. The tied
# model's EOS row is also an input embedding, so it is left alone there.
EOS_BOOST = {'t5_1_0_style': 0.0, 't5_1_1_style': 0.5}


_PAIRS = {}
_PATHS = {}


def _make_pair(name, tmp_path_factory):
  """(reference torch model, our model read from its files, config, name)."""
  if name not in _PAIRS:
    config = CONFIGS[name]
    hf = ref.make_reference(config, seed=1, eos_boost=EOS_BOOST[name])
    with torch.no_grad():
      # A random pad embedding makes the tied model repeat token 0 forever.
      hf.shared.weight[0] = 0.0
    path = tmp_path_factory.mktemp(name)
    hf.save_pretrained(path)
    _PATHS[name] = str(path)
    _PAIRS[name] = (hf, InferenceModel.load(str(path), dtype='float32'), config, name)
  return _PAIRS[name]


@pytest.fixture(scope='module', params=sorted(CONFIGS))
def pair(request, tmp_path_factory):
  return _make_pair(request.param, tmp_path_factory)


@pytest.fixture(scope='module')
def inputs():
  rng = np.random.default_rng(7)
  encoder = ref.random_inputs(rng, BATCH, INPUT_LENGTH, 300)
  decoder_targets = ref.random_inputs(rng, BATCH, TARGET_LENGTH, 300)
  decoder_inputs = np.zeros_like(decoder_targets)
  decoder_inputs[:, 1:] = decoder_targets[:, :-1]
  return encoder, decoder_inputs, decoder_targets


def test_reader_recovers_the_architecture(pair):
  _, ours, config, _ = pair
  assert ours.config == config


def test_encoder_outputs_match(pair, inputs):
  hf, ours, _, _ = pair
  encoder, _, _ = inputs
  expected = ref.hf_encoder_output(hf, encoder)
  actual = np.asarray(ours.module.apply(ours.variables, encoder,
                                        method='encode'))
  real = encoder > 0  # padded positions are not defined outputs
  np.testing.assert_allclose(actual[real], expected[real], atol=1e-4, rtol=0)


def test_decoder_logits_match(pair, inputs):
  hf, ours, _, _ = pair
  encoder, decoder_inputs, _ = inputs
  expected = ref.hf_logits(hf, encoder, decoder_inputs)
  actual = np.asarray(ours.module.apply(ours.variables, encoder,
                                        decoder_inputs))
  np.testing.assert_allclose(actual, expected, atol=1e-4, rtol=0)


def _assert_token_identical(actual, expected):
  assert actual.shape == (BATCH, TARGET_LENGTH)
  mismatched = np.flatnonzero((actual != expected).any(axis=1))
  assert mismatched.size == 0, (
      f'examples {mismatched.tolist()} differ; first: ours '
      f'{actual[mismatched[0]].tolist()} vs {expected[mismatched[0]].tolist()}')
  # Not a degenerate comparison: outputs differ between examples.
  assert len({tuple(row) for row in actual}) > BATCH // 4


def test_greedy_decodes_are_token_identical(pair, inputs):
  hf, ours, _, _ = pair
  encoder, _, _ = inputs
  _assert_token_identical(
      ours.predict_batch({'encoder_input_tokens': encoder},
                         max_length=TARGET_LENGTH),
      ref.hf_greedy(hf, encoder, TARGET_LENGTH))


def test_screened_greedy_decodes_are_token_identical(pair, inputs):
  # The bfloat16-screened arg-max (on by default only for big vocabularies
  # on CPUs with bfloat16 dot instructions), forced on for these models.
  hf, _, _, name = pair
  encoder, _, _ = inputs
  screened = InferenceModel.load(_PATHS[name], screen_argmax=True, dtype='float32')
  assert screened.argmax_screen is not None
  _assert_token_identical(
      screened.predict_batch({'encoder_input_tokens': encoder},
                             max_length=TARGET_LENGTH),
      ref.hf_greedy(hf, encoder, TARGET_LENGTH))


def test_concurrent_halves_decode_exactly_as_one_batch(tmp_path_factory,
                                                      inputs):
  # On CPU a batch of 64 is decoded as two concurrent halves by default, so
  # the parity test above covers that path; here it must also give the
  # unsplit batch's tokens, for greedy and beam search. Scores agree to
  # float32 rounding: XLA's CPU kernels block the work by batch size.
  _, ours, _, _ = _make_pair('t5_1_1_style', tmp_path_factory)
  encoder, _, _ = inputs
  assert ours.concurrent_halves
  beam = DecodingConfig('beam_search', num_decodes=3, return_all_decodes=True)
  outputs = {}
  for halves in (True, False):
    ours.concurrent_halves = halves
    try:
      outputs[halves] = [
          ours.predict_batch({'encoder_input_tokens': encoder},
                             max_length=TARGET_LENGTH, return_scores=True,
                             decoding=decoding)
          for decoding in (None, beam)]
    finally:
      ours.concurrent_halves = True
  for (tokens, scores), (whole_tokens, whole_scores) in zip(outputs[True],
                                                            outputs[False]):
    np.testing.assert_array_equal(tokens, whole_tokens)
    np.testing.assert_allclose(scores, whole_scores, rtol=1e-5, atol=0)
  assert outputs[True][1][0].shape == (BATCH, 3, TARGET_LENGTH)


def test_greedy_stops_at_eos_and_writes_zeros_after(tmp_path_factory, inputs):
  # The T5 1.1-style reference has its EOS output row boosted.
  _, ours, _, _ = _make_pair('t5_1_1_style', tmp_path_factory)
  encoder, _, _ = inputs
  tokens = ours.predict_batch({'encoder_input_tokens': encoder},
                              max_length=TARGET_LENGTH)
  ended = (tokens == 1).any(axis=1)
  first_eos = np.argmax(tokens == 1, axis=1)
  assert ended.sum() >= BATCH // 4 and len(set(first_eos[ended])) >= 3
  for row, eos_at in zip(tokens[ended], first_eos[ended]):
    assert (row[eos_at + 1:] == 0).all()
    assert (row[:eos_at] != 0).all()


def test_scores_match(pair, inputs):
  hf, ours, _, _ = pair
  encoder, decoder_inputs, decoder_targets = inputs
  weights = (decoder_targets > 0).astype(np.float32)
  expected = ref.hf_scores(hf, encoder, decoder_inputs, decoder_targets,
                           weights)
  batch = dict(encoder_input_tokens=encoder,
               decoder_input_tokens=decoder_inputs,
               decoder_target_tokens=decoder_targets,
               decoder_loss_weights=weights)
  scores, token_scores = ours.score_batch(batch, return_token_scores=True)
  np.testing.assert_allclose(scores, expected, atol=1e-3, rtol=0)
  np.testing.assert_allclose(token_scores.sum(-1), scores, atol=1e-4)
  assert (token_scores[weights == 0] == 0).all()


def test_greedy_scores_equal_scoring_the_decoded_tokens(pair, inputs):
  _, ours, _, _ = pair
  encoder, _, _ = inputs
  tokens, scores = ours.predict_batch({'encoder_input_tokens': encoder},
                                      max_length=TARGET_LENGTH,
                                      return_scores=True)
  decoder_inputs = np.zeros_like(tokens)
  decoder_inputs[:, 1:] = tokens[:, :-1]
  rescored = ours.score_batch(
      dict(encoder_input_tokens=encoder, decoder_input_tokens=decoder_inputs,
           decoder_target_tokens=tokens,
           decoder_loss_weights=(tokens > 0).astype(np.float32)))
  np.testing.assert_allclose(scores, rescored, atol=1e-4)


@pytest.mark.parametrize('bidirectional', [True, False])
@pytest.mark.parametrize('num_buckets,max_distance',
                         [(32, 128), (16, 20), (8, 16), (64, 512)])
def test_relative_position_buckets_match_transformers(bidirectional,
                                                      num_buckets,
                                                      max_distance):
  length = 700
  ours = relative_position_buckets(length, length, bidirectional=bidirectional,
                                   num_buckets=num_buckets,
                                   max_distance=max_distance)
  offsets = torch.arange(length)[None, :] - torch.arange(length)[:, None]
  theirs = modeling_t5.T5Attention._relative_position_bucket(
      offsets, bidirectional=bidirectional, num_buckets=num_buckets,
      max_distance=max_distance).numpy()
  np.testing.assert_array_equal(ours, theirs)


def test_prepared_variables_compute_what_the_plain_params_do(pair, inputs,
                                                             tmp_path):
  hf, ours, config, _ = pair
  encoder, decoder_inputs, _ = inputs
  hf.save_pretrained(tmp_path)
  _, params = checkpoints.load_checkpoint(str(tmp_path))
  plain = ours.module.apply({'params': params}, encoder, decoder_inputs)
  prepared = ours.module.apply(ours.variables, encoder, decoder_inputs)
  np.testing.assert_allclose(np.asarray(prepared), np.asarray(plain),
                             atol=1e-5, rtol=0)
  # The fused kernels replaced the ones they were made from.
  self_attention = ours.variables['params']['decoder']['layers_0'][
      'self_attention']
  assert set(self_attention) == {'out'}
  cross = ours.variables['params']['decoder']['layers_0'][
      'encoder_decoder_attention']
  assert set(cross) == {'query', 'out'}


@pytest.mark.parametrize('dtype', ['bfloat16', 'float32'])
def test_every_product_accumulates_in_float32(dtype):
  """In the jitted network (the full teacher-forced pass and a decoding
  step's output layer), every dot's result is float32, its operands the
  activation dtype: bfloat16 operands with float32 sums, as on TPUs; and
  float32 mode has no bfloat16 product at all."""
  import re  # pylint: disable=g-import-not-at-top
  import jax  # pylint: disable=g-import-not-at-top
  import jax.numpy as jnp  # pylint: disable=g-import-not-at-top
  from model import network  # pylint: disable=g-import-not-at-top
  config = T5Config(vocab_size=64, d_model=16, num_heads=2, d_kv=8, d_ff=32,
                    num_encoder_layers=1, num_decoder_layers=1, dtype=dtype)
  params = jax.tree.map(lambda x: x.astype(dtype),
                        network.init_params(config, 0))
  module = network.Transformer(config)
  tokens = jnp.ones((2, 5), jnp.int32)
  text = jax.jit(lambda p, e, d: module.apply({'params': p}, e, d)).lower(
      params, tokens, tokens).as_text()
  dots = re.findall(r'stablehlo.dot_general.*?: \((.*?)\) -> (\S+)', text)
  assert len(dots) >= 10, text[:2000]
  short = {'bfloat16': 'bf16', 'float32': 'f32'}[dtype]
  for operands, result in dots:
    assert result.endswith('xf32>'), (operands, result)
    assert operands.count(f'x{short}>') == 2, (operands, result)
  # The gated GELU reads the float32 sums: computed in float32 and rounded
  # to the activation dtype once, not at each of its steps.
  tanhs = re.findall(r'stablehlo.tanh .*?: tensor<(\S+)>', text)
  assert tanhs and all(t.endswith('xf32') for t in tanhs), tanhs


def test_bfloat16_greedy_agrees_with_float32(pair, inputs):
  """The same checkpoint restored in bfloat16 (activations follow) decodes
  the float32 model's sequences but for a few: measured 63 of 64 (T5
  1.0-style) and 62 of 64 (T5 1.1-style) equal token for token; the rest
  part at a near-tie and go their own way."""
  _, ours, config, name = pair
  encoder, _, _ = inputs
  bf16 = InferenceModel.load(_PATHS[name], dtype='bfloat16')
  assert bf16.config.dtype == 'bfloat16'
  assert all(leaf.dtype == jax.numpy.bfloat16 for leaf in
             jax.tree.leaves(bf16.variables['params']))
  expected = ours.predict_batch({'encoder_input_tokens': encoder},
                                max_length=TARGET_LENGTH)
  actual = bf16.predict_batch({'encoder_input_tokens': encoder},
                              max_length=TARGET_LENGTH)
  equal = (actual == expected).all(axis=1).mean()
  assert 0.9 <= equal, (config, equal)


# --- batching: length-aware and continuous against static and transformers --


def _examples_in_varied_order(inputs):
  """The parity inputs shuffled, so lengths are not in order and a model
  call that loses the given order shows."""
  encoder, _, _ = inputs
  return encoder[np.random.default_rng(3).permutation(len(encoder))]


@pytest.mark.parametrize('mode', ['static', 'length', 'continuous'])
def test_every_batching_mode_decodes_as_transformers(pair, inputs, mode):
  # 64 examples through 16 rows: continuous batching refills rows as their
  # sequences end (the T5 1.1-style model ends them at varied steps).
  hf, ours, _, _ = pair
  encoder = _examples_in_varied_order(inputs)
  tokens, scores = ours.predict_examples(
      encoder, batch_size=16, max_length=TARGET_LENGTH, return_scores=True,
      batching=Batching(mode))
  _assert_token_identical(tokens, ref.hf_greedy(hf, encoder, TARGET_LENGTH))
  static_tokens, static_scores = ours.predict_batch(
      {'encoder_input_tokens': encoder}, max_length=TARGET_LENGTH,
      return_scores=True)
  np.testing.assert_array_equal(tokens, static_tokens)
  np.testing.assert_allclose(scores, static_scores, rtol=1e-5, atol=0)


def test_beam_search_and_scoring_equal_static_in_every_mode(
    tmp_path_factory, inputs):
  # Continuous: 64 examples through 16 slots of 3 beams each, a slot taking
  # the next example when its search ends.
  hf, ours, _, _ = _make_pair('t5_1_1_style', tmp_path_factory)
  encoder = _examples_in_varied_order(inputs)
  beam = DecodingConfig('beam_search', num_decodes=3, return_all_decodes=True)
  results = {
      mode: ours.predict_examples(encoder, batch_size=16,
                                  max_length=TARGET_LENGTH,
                                  return_scores=True, decoding=beam,
                                  batching=Batching(mode))
      for mode in ('static', 'length', 'continuous')}
  assert results['static'][0].shape == (BATCH, 3, TARGET_LENGTH)
  for mode in ('length', 'continuous'):
    np.testing.assert_array_equal(results[mode][0], results['static'][0])
    np.testing.assert_allclose(results[mode][1], results['static'][1],
                               rtol=1e-5, atol=0)
  # The searches end at varied lengths (so slots are refilled unevenly).
  best_lengths = batching_lib.used_lengths(results['static'][0][:, -1])
  assert len(set(best_lengths.tolist())) > 3

  _, decoder_inputs, decoder_targets = inputs
  weights = (decoder_targets > 0).astype(np.int32)
  features = dict(encoder_input_tokens=encoder,
                  decoder_input_tokens=decoder_inputs,
                  decoder_target_tokens=decoder_targets,
                  decoder_loss_weights=weights)
  scored = {mode: ours.score_examples(features, batch_size=16,
                                      batching=Batching(mode))
            for mode in ('static', 'length')}
  np.testing.assert_allclose(scored['length'][0], scored['static'][0],
                             rtol=1e-5, atol=0)
  np.testing.assert_allclose(scored['length'][1], scored['static'][1],
                             rtol=1e-5, atol=1e-6)
  np.testing.assert_allclose(
      scored['length'][0],
      ref.hf_scores(hf, encoder, decoder_inputs, decoder_targets, weights),
      atol=1e-3, rtol=0)


def test_a_slot_left_empty_for_long_takes_its_next_example_cleanly(
    tmp_path_factory, inputs):
  # 4 slots refilled 4 at a time, no EOS (every search runs 12 steps): the
  # first 4 short examples end together, the fifth (the last of its length
  # bucket) runs alone while 3 slots stay empty for 12 steps, past the
  # cache's length, then the 4 long examples enter those slots. What an
  # empty slot computes must not reach its next example.
  _, ours, _, _ = _make_pair('t5_1_1_style', tmp_path_factory)
  encoder, _, _ = inputs
  short, long = encoder[1:6], encoder[30:34]  # 2..6 tokens; 31..34
  queue = np.concatenate([short, long])
  beam = DecodingConfig('beam_search', num_decodes=2, return_all_decodes=True)
  results = {
      mode: ours.predict_examples(
          queue, batch_size=4, max_length=TARGET_LENGTH, return_scores=True,
          decoding=beam, stop_at_eos=False,
          batching=Batching(mode, length_buckets=(8,), refill_group=4))
      for mode in ('static', 'continuous')}
  np.testing.assert_array_equal(results['continuous'][0],
                                results['static'][0])
  np.testing.assert_allclose(results['continuous'][1], results['static'][1],
                             rtol=1e-5, atol=0)


def test_samples_do_not_depend_on_batching(tmp_path_factory, inputs):
  _, ours, _, _ = _make_pair('t5_1_1_style', tmp_path_factory)
  encoder = _examples_in_varied_order(inputs)
  keys = np.asarray(jax.random.split(jax.random.PRNGKey(5), BATCH))
  sampling = DecodingConfig('temperature_sample', temperature=1.0, topk=0)
  samples = {mode: ours.predict_examples(
      encoder, batch_size=16, max_length=TARGET_LENGTH, decoding=sampling,
      rng=keys, batching=Batching(mode))
             for mode in ('static', 'length', 'continuous')}
  np.testing.assert_array_equal(samples['length'], samples['static'])
  np.testing.assert_array_equal(samples['continuous'], samples['static'])
  greedy = ours.predict_batch({'encoder_input_tokens': encoder},
                              max_length=TARGET_LENGTH)
  assert (samples['static'] != greedy).any(axis=1).mean() > 0.5
  # Several samples per example: in continuous batching each is a sequence
  # of its own, in any row; the same samples and scores, in the same order.
  several = dataclasses.replace(sampling, num_decodes=3,
                                return_all_decodes=True)
  samples = {mode: ours.predict_examples(
      encoder, batch_size=16, max_length=TARGET_LENGTH, decoding=several,
      rng=keys, return_scores=True, batching=Batching(mode))
             for mode in ('static', 'continuous')}
  assert samples['static'][0].shape == (BATCH, 3, TARGET_LENGTH)
  np.testing.assert_array_equal(samples['continuous'][0],
                                samples['static'][0])
  np.testing.assert_allclose(samples['continuous'][1], samples['static'][1],
                             rtol=1e-5, atol=0)
  assert (samples['static'][0][:, 0] != samples['static'][0][:, 1]).any(
      axis=1).mean() > 0.5


def test_compilations_are_bounded_by_the_buckets(tmp_path_factory, inputs):
  # Inputs of every length 1..40: default buckets 8, 16, 24 and 40.
  _make_pair('t5_1_1_style', tmp_path_factory)
  model = InferenceModel.load(_PATHS['t5_1_1_style'], dtype='float32')
  encoder = _examples_in_varied_order(inputs)
  assert Batching('length').buckets(INPUT_LENGTH) == (8, 16, 24, 40)
  for count in (BATCH, BATCH - 5):
    model.predict_examples(encoder[:count], batch_size=16,
                           max_length=TARGET_LENGTH,
                           batching=Batching('length'))
  assert model._decode._cache_size() == 4  # pylint: disable=protected-access
  # Continuous: one program for every queue of up to 64 (4 x 16 rows).
  for count in (BATCH, BATCH - 5, 49):
    model.predict_examples(encoder[:count], batch_size=16,
                           max_length=TARGET_LENGTH)
  assert model._continuous._cache_size() == 1  # pylint: disable=protected-access
