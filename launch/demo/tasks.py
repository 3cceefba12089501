"""The demo's SeqIO task: two-digit addition, as UTF-8 bytes.

    inputs "47 + 38"  ->  targets "85"

Splits 'train', 'validation' and 'test' are TSV files shipped beside this
module; the test split holds pairs the model never saw in training.
"""

import os

import seqio
import tensorflow as tf

TASK_NAME = 't5beam_demo_addition'
DATA_DIR = os.path.join(os.path.dirname(os.path.abspath(__file__)), 'data')
VOCABULARY = seqio.ByteVocabulary()


def exact_match(targets, predictions):
  """The percentage of predictions equal to their targets (a SeqIO metric
  function: the run computes it over its outputs)."""
  matches = sum(t == p for t, p in zip(targets, predictions))
  return {'exact_match': 100.0 * matches / max(1, len(targets))}


@seqio.map_over_dataset
def parse_tsv(line):
  inputs, targets = tf.io.decode_csv(line, record_defaults=['', ''],
                                     field_delim='\t', use_quote_delim=False)
  return {'inputs': inputs, 'targets': targets}


if TASK_NAME not in seqio.TaskRegistry.names():
  seqio.TaskRegistry.add(
      TASK_NAME,
      source=seqio.TextLineDataSource({
          split: os.path.join(DATA_DIR, f'{split}.tsv')
          for split in ('train', 'validation', 'test')}),
      preprocessors=[parse_tsv, seqio.preprocessors.tokenize,
                     seqio.preprocessors.append_eos_after_trim],
      output_features={
          'inputs': seqio.Feature(VOCABULARY, add_eos=True),
          'targets': seqio.Feature(VOCABULARY, add_eos=True),
      },
      metric_fns=[exact_match])
