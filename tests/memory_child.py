"""Run by tests/test_memory.py in a child process with 8 forced CPU devices:
XLA's own memory analysis of compiled decoding and scoring next to
model.memory's estimate, printed as JSON (one line, last)."""

import json
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from model import runtime  # pylint: disable=g-import-not-at-top

# XLA's CPU memory analysis stands in for an accelerator's, and the estimate
# is checked against it with YNN kept to individual matmuls (closer to how
# GPU and TPU fuse), whatever this CPU's own choice: without the flag the
# CPU backend's analysis of 1x8 greedy at batch 256 came to 1.38x the
# estimate (an AMX Xeon; t5beam leaves the flag off by default).
os.environ[runtime.TUNING_ENV] = '1'
runtime.configure_xla_cpu()
os.environ['XLA_FLAGS'] = (os.environ.get('XLA_FLAGS', '') +
                           ' --xla_force_host_platform_device_count=8')

import jax  # pylint: disable=g-import-not-at-top,wrong-import-position
import numpy as np  # pylint: disable=g-import-not-at-top,wrong-import-position

from model import memory, network, partitioning  # pylint: disable=wrong-import-position
from model.config import T5Config  # pylint: disable=wrong-import-position
from model.decoding import DecodingConfig  # pylint: disable=wrong-import-position
from model.inference import InferenceModel  # pylint: disable=wrong-import-position

# (feed forward, (data, model), mode, decoding, batch, inputs, targets,
#  activation dtype; parameters are float32)
CASES = (
    ('gated-gelu', (2, 4), 'predict', DecodingConfig(), 256, 128, 64,
     'float32'),
    ('relu', (8, 1), 'predict', DecodingConfig(), 64, 64, 32, 'float32'),
    ('gated-gelu', (1, 8), 'predict',
     DecodingConfig('beam_search', num_decodes=4), 32, 64, 32, 'float32'),
    ('relu', (2, 4), 'predict',
     DecodingConfig('temperature_sample', topk=0, num_decodes=4), 32, 64, 32,
     'float32'),
    ('gated-gelu', (8, 1), 'score', DecodingConfig(), 64, 64, 64, 'float32'),
    ('relu', (1, 8), 'predict', DecodingConfig(), 256, 128, 64, 'float32'),
    # Fused kernels are stored in the activation dtype, the rest in
    # float32. (XLA's CPU backend computes bfloat16 in float32, so its
    # buffers are float32-sized: the test checks only the parameters here.)
    ('gated-gelu', (2, 4), 'predict', DecodingConfig(), 128, 128, 64,
     'bfloat16'),
)


def compiled_bytes(model, mode, decoding, batch, inputs, targets) -> int:
  """Arguments + outputs + temporaries - aliased, per device, as XLA's
  buffer assignment of the compiled program has them."""
  tokens = np.ones((batch, inputs), np.int32)
  with model._placement():  # pylint: disable=protected-access
    if mode == 'score':
      target = np.ones((batch, targets), np.int32)
      args = model._place_batch(tokens, target, target, target)  # pylint: disable=protected-access
      compiled = model._score.lower(model.variables, *args).compile()  # pylint: disable=protected-access
    else:
      args = model._place_batch(tokens, np.zeros((batch, 2), np.uint32))  # pylint: disable=protected-access
      compiled = model._decode.lower(  # pylint: disable=protected-access
          model.variables, *args, max_length=targets, eos_id=1,
          config=decoding, return_scores=decoding.strategy != 'greedy',
          argmax_screen=None).compile()
  analysis = compiled.memory_analysis()
  return (analysis.argument_size_in_bytes + analysis.output_size_in_bytes +
          analysis.temp_size_in_bytes - analysis.alias_size_in_bytes)


def main():
  results = []
  for feed_forward, (data, model_axis), mode, decoding, batch, inputs, \
      targets, activation in CASES:
    config = T5Config(vocab_size=4096, d_model=256, num_heads=8, d_kv=32,
                      d_ff=1024, num_encoder_layers=3, num_decoder_layers=3,
                      feed_forward=feed_forward, dtype=activation)
    model = InferenceModel(
        config, network.init_params(config, 1), concurrent_halves=False,
        partitioning=partitioning.Partitioning(num_partitions=model_axis))
    need = memory.estimate(
        config, batch_size=batch, input_length=inputs, target_length=targets,
        mode=mode, strategy=decoding.strategy,
        num_decodes=decoding.num_decodes, activation_dtype=activation,
        data=data, model=model_axis)
    results.append({
        'case': f'{feed_forward} {data}x{model_axis} {mode} '
                f'{decoding.strategy} batch {batch} {activation}',
        'xla': compiled_bytes(model, mode, decoding, batch, inputs, targets),
        'estimate': need.total,
        'activation_dtype': activation,
        'parameters_on_a_device': sum(
            leaf.addressable_shards[0].data.nbytes
            for leaf in jax.tree_util.tree_leaves(model.variables)),
        'estimated_parameters': need.parameters})
  print(json.dumps(results))


if __name__ == '__main__':
  main()
