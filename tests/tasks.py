"""SeqIO tasks for the pipeline tests, over TSV files the tests write.

The data directory comes from T5BEAM_TEST_DATA (set by the tests before
this module is imported, and inherited by Beam's worker processes). Byte
vocabularies need no vocabulary files.
"""

import os

import flax
import seqio
import tensorflow as tf

# The demo's TSV parser: "inputs<TAB>targets" lines.
from launch.demo.tasks import parse_tsv

DATA_DIR = os.environ.get('T5BEAM_TEST_DATA', '/nonexistent')
VOCABULARY = seqio.ByteVocabulary()


def _register(name: str, pattern: str, vocabulary=VOCABULARY, **metrics):
  """A TSV task over `pattern` in the data directory; `metrics`: the
  Task's postprocess_fn and metric_fns."""
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
          'targets': seqio.Feature(vocabulary, add_eos=True)},
      **metrics)


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


# Tasks with SeqIO metrics (tests/test_metrics.py): a postprocess_fn that
# uses the example, predict metric functions (one of them reading what the
# postprocess took from the example, one giving Text) and a score metric.
def _length_class(output, example=None, is_target=False):
  """A prediction or target as its length class, with the example's input
  length (so a metric can use the example)."""
  del is_target
  text = output.decode() if isinstance(output, bytes) else output
  return {'class': 'long' if len(text.strip()) > 2 else 'short',
          'input_length': int(len(example['inputs']))}


def class_accuracy(targets, predictions):
  right = [t['class'] == p['class'] for t, p in zip(targets, predictions)]
  return {'class_accuracy': seqio.metrics.Scalar(100.0 * sum(right) /
                                                 len(right))}


def input_weighted_accuracy(targets, predictions):
  weights = [t['input_length'] for t in targets]
  right = [w * (t['class'] == p['class'])
           for w, t, p in zip(weights, targets, predictions)]
  return {'input_weighted_accuracy': sum(right) / sum(weights),
          'first_prediction': seqio.metrics.Text(str(predictions[0]))}


def mean_score(targets, scores):
  return {'mean_score': float(sum(scores)) / len(targets)}


def broken_unless_allowed(targets, predictions):
  """Raises unless T5BEAM_TEST_METRIC_OK is set (a metric that fails)."""
  if not os.environ.get('T5BEAM_TEST_METRIC_OK'):
    raise ValueError('this metric was told to fail')
  return class_accuracy(targets, predictions)


@flax.struct.dataclass
class LongPredictions(seqio.metrics.Metric):
  """A seqio.Metric object (not a metric function): how many predictions
  are longer than 2 characters, from the predicted token ids."""
  count: int = 0

  @classmethod
  def from_model_output(cls, inputs, model_output, features,
                        target_field_name='targets', mask=None,
                        indices_2d=None):
    del inputs, mask, indices_2d
    vocabulary = features[target_field_name].vocabulary
    count = sum(len(vocabulary.decode([int(t) for t in row])) > 2
                for row in model_output)
    return cls(model_output_type=seqio.metrics.ModelOutputType.PREDICTION,
               count=count)

  def compute(self):
    return {'long_predictions': self.count}


_METRICS = [class_accuracy, input_weighted_accuracy, mean_score]
_register('t5beam_test_metrics_two_files', 'two-*.tsv',
          postprocess_fn=_length_class, metric_fns=_METRICS)
_register('t5beam_test_metrics_one_file', 'one.tsv',
          postprocess_fn=_length_class, metric_fns=_METRICS,
          metric_objs=[LongPredictions(
              model_output_type=seqio.metrics.ModelOutputType.PREDICTION)])
_register('t5beam_test_metrics_broken', 'one.tsv',
          postprocess_fn=_length_class, metric_fns=[broken_unless_allowed])
if 't5beam_test_metrics_mixture' not in seqio.MixtureRegistry.names():
  seqio.MixtureRegistry.add('t5beam_test_metrics_mixture',
                            ['t5beam_test_metrics_two_files',
                             't5beam_test_metrics_one_file'],
                            default_rate=1.0)
