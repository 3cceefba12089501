"""SeqIO tasks for the pipeline tests, over TSV files the tests write.

The data directory comes from T5BEAM_TEST_DATA (set by the tests before
this module is imported, and inherited by Beam's worker processes). Byte
vocabularies need no vocabulary files.
"""

import os

import seqio
import tensorflow as tf

# The demo's TSV parser: "inputs<TAB>targets" lines.
from launch.demo.tasks import parse_tsv

DATA_DIR = os.environ.get('T5BEAM_TEST_DATA', '/nonexistent')
VOCABULARY = seqio.ByteVocabulary()


def _register(name: str, pattern: str, vocabulary=VOCABULARY):
  if name in seqio.TaskRegistry.names():
    return
  seqio.TaskRegistry.add(
      name,
      source=seqio.TextLineDataSource(
          {'test': os.path.join(DATA_DIR, pattern)}),
      preprocessors=[parse_tsv, seqio.preprocessors.tokenize,
                     seqio.preprocessors.append_eos_after_trim],
      output_features={
          'inputs': seqio.Feature(vocabulary, add_eos=True),
          'targets': seqio.Feature(vocabulary, add_eos=True)})


# Two files: two input shards by default.
_register('t5beam_test_two_files', 'two-*.tsv')
_register('t5beam_test_one_file', 'one.tsv')
_register('t5beam_test_empty', 'empty.tsv')
# A SentencePiece model trained by pipeline_helpers.write_data (loaded lazily).
_register('t5beam_test_sentencepiece', 'one.tsv',
          seqio.SentencePieceVocabulary(os.path.join(DATA_DIR, 'spm.model'),
                                        extra_ids=100))
if 't5beam_test_mixture' not in seqio.MixtureRegistry.names():
  seqio.MixtureRegistry.add('t5beam_test_mixture',
                            ['t5beam_test_two_files', 't5beam_test_one_file'],
                            default_rate=1.0)

# Token ids with no text: 12 examples of 3 to 20 ids below the test model's
# vocabulary of 260 (an identity vocabulary decodes to the ids themselves).
TOKEN_ID_VOCABULARY = seqio.PassThroughVocabulary(size=260, eos_id=1)


def _token_id_examples(split, shuffle_files, seed=None):
  del split, shuffle_files, seed
  import numpy as np  # pylint: disable=g-import-not-at-top
  rng = np.random.default_rng(12)
  lengths = rng.integers(3, 21, 12)
  inputs = [rng.integers(2, 260, n).astype(np.int32) for n in lengths]
  targets = [rng.integers(2, 260, 1 + n % 6).astype(np.int32)
             for n in lengths]
  return tf.data.Dataset.from_generator(
      lambda: ({'inputs': i, 'targets': t} for i, t in zip(inputs, targets)),
      output_signature={'inputs': tf.TensorSpec([None], tf.int32),
                        'targets': tf.TensorSpec([None], tf.int32)})


if 't5beam_test_token_ids' not in seqio.TaskRegistry.names():
  seqio.TaskRegistry.add(
      't5beam_test_token_ids',
      source=seqio.FunctionDataSource(_token_id_examples, splits=['test']),
      preprocessors=[seqio.preprocessors.append_eos_after_trim],
      output_features={
          name: seqio.Feature(TOKEN_ID_VOCABULARY, add_eos=True,
                              dtype=tf.int32)
          for name in ('inputs', 'targets')})
