"""Benchmark: the "nq-small-greedy" workload as a SeqIO task through Beam.

T5 1.1 small with random weights (an Orbax checkpoint written here), 1024
examples of 38 input tokens and 18-token targets in a SeqIO task, batch 32,
float32, greedy, DirectRunner (FnApiRunner, in memory). In the same process
it times the model core alone on the same fixed-shape batches, then the
pipeline, and prints both and their ratio. Not a test: run it by hand.

    .venv/bin/python bench/pipeline_nq_small.py [--examples 1024]
"""

import argparse
import json
import os
import shutil
import sys
import tempfile
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from model import runtime  # pylint: disable=g-import-not-at-top

runtime.configure_xla_cpu()  # before JAX starts

import numpy as np  # pylint: disable=g-import-not-at-top
import seqio
import tensorflow as tf
from apache_beam.options.pipeline_options import PipelineOptions

from model import checkpoints, config as config_lib, network
from pipeline import inference
from pipeline.run import run_inference
from pipeline.config import InferConfig

TASK = 'nq_small_greedy_bench'
LENGTHS = {'inputs': 38, 'targets': 18}


def register_task(num_examples: int, vocab_size: int):
  def dataset_fn(split, shuffle_files, seed=None):
    del split, shuffle_files, seed
    rng = np.random.default_rng(0)
    inputs = rng.integers(2, vocab_size, (num_examples, 37)).astype(np.int32)
    targets = rng.integers(2, vocab_size, (num_examples, 17)).astype(np.int32)
    return tf.data.Dataset.from_tensor_slices({'inputs': inputs,
                                               'targets': targets})
  vocabulary = seqio.PassThroughVocabulary(size=vocab_size, eos_id=1)
  features = {name: seqio.Feature(vocabulary, add_eos=True, dtype=tf.int32)
              for name in ('inputs', 'targets')}
  seqio.TaskRegistry.add(
      TASK, source=seqio.FunctionDataSource(dataset_fn, splits=['test']),
      preprocessors=[seqio.preprocessors.append_eos_after_trim],
      output_features=features)


def model_core_alone(spec: inference.ModelSpec):
  """(examples/s, startup seconds) of the model alone on the task's batches:
  the same load and batch runs the pipeline's workers use, no Beam."""
  start = time.perf_counter()
  loaded = inference.load_model(spec)
  startup = time.perf_counter() - start
  task_ds = seqio.get_mixture_or_task(TASK).get_dataset(
      LENGTHS, split='test', shuffle=False)
  examples = list(seqio.EncDecFeatureConverter(pack=False)(
      task_ds, LENGTHS).as_numpy_iterator())
  start = time.perf_counter()
  for begin in range(0, len(examples), spec.batch_size):
    loaded.run(inference.stack_batch(examples[begin:begin + spec.batch_size],
                                     spec.batch_size))
  return len(examples) / (time.perf_counter() - start), startup


def main():
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument('--examples', type=int, default=1024)
  parser.add_argument('--batch_size', type=int, default=32)
  args = parser.parse_args()
  model_config = config_lib.preset('t5_1_1_small')
  register_task(args.examples, model_config.vocab_size)
  workdir = tempfile.mkdtemp(prefix='t5beam-bench-')
  try:
    checkpoint = os.path.join(workdir, 'checkpoint')
    checkpoints.save_orbax(checkpoint, model_config,
                           network.init_params(model_config))
    spec = inference.ModelSpec(checkpoint, task_feature_lengths=LENGTHS,
                               batch_size=args.batch_size,
                               restore_dtype='float32')
    config = InferConfig(mixture_or_task_name=TASK,
                         output_dir=os.path.join(workdir, 'out'), model=spec)
    core, core_startup = model_core_alone(spec)
    start = time.perf_counter()
    result = run_inference(config, PipelineOptions(['--runner=FnApiRunner']))
    wall = time.perf_counter() - start
    this_run = result.manifests[TASK]['this_run']
    steady = this_run['examples_per_second']
    startup = result.counters['startup_milliseconds'] / 1000
    print(f'nq-small-greedy through Beam: {args.examples} examples, batch '
          f'{args.batch_size}, float32, FnApiRunner in memory')
    print(f'  model core alone : {core:6.1f} ex/s  (startup: load + compile '
          f'{core_startup:.1f} s)')
    print(f'  pipeline, steady : {steady:6.1f} ex/s  = {steady / core:.1%} of '
          f'the model core  ({this_run["tokens_per_second"]:.0f} tokens/s)')
    print(f'  pipeline, end to end: {args.examples / wall:6.1f} ex/s over '
          f'{wall:.1f} s, of which startup in the worker (load + compile) '
          f'{startup:.1f} s')
    print('  counters:', json.dumps(result.counters, sort_keys=True))
  finally:
    shutil.rmtree(workdir, ignore_errors=True)


if __name__ == '__main__':
  main()
