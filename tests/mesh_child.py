"""Run by tests/test_mesh.py in a child process with 8 forced CPU devices:
decodes and scores test models on every mesh shape and prints what the
test asserts, as JSON (one line, last)."""

import json
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from model import runtime  # pylint: disable=g-import-not-at-top

runtime.configure_xla_cpu()
os.environ['XLA_FLAGS'] = (os.environ.get('XLA_FLAGS', '') +
                           ' --xla_force_host_platform_device_count=8')

import jax  # pylint: disable=g-import-not-at-top,wrong-import-position
import numpy as np  # pylint: disable=g-import-not-at-top,wrong-import-position

from model import network, partitioning  # pylint: disable=wrong-import-position
from model.config import T5Config  # pylint: disable=wrong-import-position
from model.batching import Batching  # pylint: disable=wrong-import-position
from model.decoding import DecodingConfig  # pylint: disable=wrong-import-position
from model.inference import InferenceModel  # pylint: disable=wrong-import-position

MESHES = ((8, 1), (4, 2), (2, 4), (1, 8))
# The T5 1.0 style (logits from the shared embedding) on the meshes with a
# model axis of 2 and 8 only: the data axis alone and the other shapes are
# the same code paths as the 1.1 style's, and each mesh costs compilations.
STYLE_MESHES = {'t5_1_0': ((4, 2), (1, 8)), 't5_1_1': MESHES}
BATCH = 8


def style_config(style: str, **changes) -> T5Config:
  """A T5 1.0-style (ReLU, logits from the embedding) or 1.1-style (gated
  GELU, separate logits layer) model whose dimensions 8 divides."""
  settings = dict(vocab_size=256, d_model=32, num_heads=8, d_kv=4, d_ff=64,
                  num_encoder_layers=2, num_decoder_layers=2)
  if style == 't5_1_0':
    settings.update(feed_forward='relu', logits_via_embedding=True)
  settings.update(changes)
  return T5Config(**settings)


def batch_of(rng) -> dict:
  inputs = rng.integers(2, 256, (BATCH, 10)).astype(np.int32)
  inputs[:, 7:] = np.where(rng.random((BATCH, 3)) < 0.5, 0, inputs[:, 7:])
  targets = rng.integers(2, 256, (BATCH, 6)).astype(np.int32)
  return {'encoder_input_tokens': inputs,
          'decoder_input_tokens': np.concatenate(
              [np.zeros((BATCH, 1), np.int32), targets[:, :-1]], 1),
          'decoder_target_tokens': targets,
          'decoder_loss_weights': np.ones_like(targets)}


# Continuous beam search costs a compilation per mesh (about 10 s here):
# checked on one style, on a mesh with both axes.
BEAM_MESHES = ((4, 2),)


def outputs(model, batch, continuous_beams: bool = False) -> dict:
  beam_tokens, beam_scores = model.predict_batch(
      batch, decoding=DecodingConfig('beam_search', num_decodes=2,
                                     return_all_decodes=True),
      return_scores=True)
  greedy_tokens, greedy_scores = model.predict_batch(batch,
                                                     return_scores=True)
  keys = np.arange(2 * BATCH, dtype=np.uint32).reshape(BATCH, 2)
  samples, sample_scores = model.predict_batch(
      batch, decoding=DecodingConfig('temperature_sample', num_decodes=2,
                                     temperature=0.8, topk=0,
                                     return_all_decodes=True),
      return_scores=True, rng=keys)
  # Continuous batching over twice the batch (rows take new examples as
  # theirs end): the second half is the first reversed, so lengths vary.
  twice = np.concatenate([batch['encoder_input_tokens'],
                          batch['encoder_input_tokens'][::-1, ::-1]])
  continuous = model.predict_examples(
      twice, batch_size=BATCH, max_length=6,
      batching=Batching('continuous', refill_group=2))
  found = {}
  if continuous_beams:
    # Beam search in continuous batching: each slot holds one example's 2
    # beams (16 rows, split over the data axis by slot).
    slot_beams, slot_beam_scores = model.predict_examples(
        twice, batch_size=BATCH, max_length=6, return_scores=True,
        decoding=DecodingConfig('beam_search', num_decodes=2,
                                return_all_decodes=True),
        batching=Batching('continuous', refill_group=2))
    found = {'continuous_beams': slot_beams.tolist(),
             'continuous_beam_scores': slot_beam_scores.tolist()}
  return {**found,
          'samples': samples.tolist(), 'sample_scores': sample_scores.tolist(),
          'continuous': continuous.tolist(),
          'greedy': greedy_tokens.tolist(),
          'greedy_scores': greedy_scores.tolist(),
          'beam': beam_tokens.tolist(), 'beam_scores': beam_scores.tolist(),
          'score': model.score_batch(batch).tolist()}


def shard_fractions(model) -> dict:
  """Bytes on one device / bytes of the array, for a few parameters."""
  params = model.variables['params']
  prepared = model.variables['prepared']
  arrays = {
      'embedding': params['token_embedder']['embedding'],
      'mlp_wo': params['decoder']['layers_0']['mlp']['wo']['kernel'],
      'attention_out': params['encoder']['layers_0']['attention']['out'][
          'kernel'],
      'qkv': prepared['encoder']['layers_0']['attention']['qkv'],
      'norm': params['encoder']['encoder_norm']['scale'],
  }
  return {name: [shard.data.nbytes / array.nbytes
                 for shard in array.addressable_shards]
          for name, array in arrays.items()}


def refusal(make) -> str:
  try:
    make()
  except (partitioning.PartitioningError, ValueError) as e:
    return str(e)
  return ''


def calls_at_once(model, batch) -> dict:
  """Two threads running `pipeline.inference.LoadedModel.run` on `model`
  (two calls each, as the launcher's two worker threads do): whether any
  two calls overlapped, and whether every call's tokens equal a lone
  call's."""
  import threading  # pylint: disable=g-import-not-at-top
  import time  # pylint: disable=g-import-not-at-top
  from pipeline import inference  # pylint: disable=g-import-not-at-top
  spec = inference.ModelSpec('(in memory)', {'inputs': 10, 'targets': 6},
                             model_config=model.config, batch_size=BATCH,
                             restore_dtype='float32')
  loaded = inference.LoadedModel(spec, model, 0.0, 0.0)
  features = {'encoder_input_tokens': batch['encoder_input_tokens']}
  alone = loaded.run(features)['tokens']
  spans, same = [], []
  predict = model.predict_examples

  def timed_predict(*args, **kwargs):
    start = time.perf_counter()
    try:
      return predict(*args, **kwargs)
    finally:
      spans.append((start, time.perf_counter()))

  model.predict_examples = timed_predict

  def work():
    for _ in range(2):
      same.append(bool(np.array_equal(loaded.run(features)['tokens'],
                                      alone)))

  threads = [threading.Thread(target=work) for _ in range(2)]
  for thread in threads:
    thread.start()
  for thread in threads:
    thread.join()
  del model.predict_examples
  spans.sort()
  return {'overlapped': any(later[0] < earlier[1] for earlier, later
                            in zip(spans, spans[1:])),
          'calls': len(spans), 'all_equal': all(same) and len(same) == 4}


def main():
  report = {}
  rng = np.random.default_rng(0)
  for style in ('t5_1_0', 't5_1_1'):
    config = style_config(style)
    params = network.init_params(config, 3)
    batch = batch_of(rng)
    one = InferenceModel(config, params, concurrent_halves=False)
    beams = style == 't5_1_1'
    report[style] = {'one_device': outputs(one, batch, beams)}
    for data, model_axis in STYLE_MESHES[style]:
      model = InferenceModel(
          config, params,
          partitioning=partitioning.Partitioning(num_partitions=model_axis))
      report[style][f'{data}x{model_axis}'] = dict(
          outputs(model, batch, beams and (data, model_axis) in BEAM_MESHES),
          mesh=model.mesh_shape,
          shards=shard_fractions(model))
      if (style, data, model_axis) == ('t5_1_1', 4, 2):
        report['calls_at_once'] = calls_at_once(model, batch)
  six_heads = style_config('t5_1_1', num_heads=6)
  report['refusals'] = {
      'heads': refusal(lambda: InferenceModel(
          six_heads, network.init_params(six_heads),
          partitioning=partitioning.Partitioning(num_partitions=4))),
      'batch': refusal(lambda: InferenceModel(
          style_config('t5_1_1'), network.init_params(style_config('t5_1_1')),
          partitioning=partitioning.Partitioning(num_partitions=2))
                       .predict_batch({k: v[:6] for k, v in
                                       batch_of(rng).items()})),
      'devices': refusal(lambda: partitioning.Partitioning(
          num_partitions=16).make_mesh()),
      'halves': refusal(lambda: InferenceModel(
          style_config('t5_1_1'), network.init_params(style_config('t5_1_1')),
          partitioning=partitioning.Partitioning(), concurrent_halves=True)),
  }
  # One device given: the model lives there, not on the default device.
  config = style_config('t5_1_1')
  on_fourth = InferenceModel(config, network.init_params(config, 3),
                             devices=jax.devices()[3:4],
                             concurrent_halves=False)
  report['one_given_device'] = {
      'devices': sorted({str(d) for leaf in jax.tree_util.tree_leaves(
          on_fourth.variables) for d in leaf.devices()}),
      'fourth': str(jax.devices()[3]),
      'greedy': on_fourth.predict_batch(batch_of(np.random.default_rng(1)))
                .tolist(),
      'greedy_default': InferenceModel(
          config, network.init_params(config, 3), concurrent_halves=False)
                        .predict_batch(batch_of(np.random.default_rng(1)))
                        .tolist()}
  print(json.dumps(report))


if __name__ == '__main__':
  main()
