"""A run's SeqIO metrics: computed over its outputs after the merge, equal
to what seqio.Evaluator computes on the same predictions and scores."""

import json
import os
import shutil

import numpy as np
import pytest
from apache_beam.options.pipeline_options import PipelineOptions

from tests import pipeline_helpers as helpers

MIXTURE = 't5beam_test_metrics_mixture'
SUBTASKS = ('t5beam_test_metrics_two_files', 't5beam_test_metrics_one_file')
LENGTHS = {'inputs': 24, 'targets': 8}


@pytest.fixture(scope='module')
def env(tmp_path_factory):
  return helpers.small_environment(tmp_path_factory)


def run(env, output, mode, name=MIXTURE, **settings):
  from pipeline.run import run_inference  # pylint: disable=g-import-not-at-top
  config = helpers.infer_config(
      mixture_or_task_name=name, task_feature_lengths=LENGTHS,
      checkpoint_path=settings.pop('checkpoint_path', env['checkpoint']),
      output_dir=str(output), mixture_or_task_module='tests.tasks',
      batch_size=4, checkpoint_period=2, mode=mode, output_ids=True,
      **settings)
  return run_inference(config, PipelineOptions(['--runner=FnApiRunner']))


@pytest.fixture(scope='module')
def predict_run(env):
  output = env['tmp'].mktemp('metrics_predict')
  return output, run(env, output, 'predict')


@pytest.fixture(scope='module')
def score_run(env):
  """Score mode, from a checkpoint path naming step 1234, with the metrics
  also written for TensorBoard."""
  root = env['tmp'].mktemp('metrics_score')
  checkpoint = str(root / 'checkpoint_1234')
  shutil.copytree(env['checkpoint'], checkpoint)
  output = root / 'out'
  return output, run(env, output, 'score', checkpoint_path=checkpoint,
                     metrics_tensorboard_dir=str(root / 'tensorboard'))


def _records_by_input(output, task, mode):
  """Our records of a task, keyed by their inputs text."""
  records = helpers.read_records(
      os.path.join(output, f'{task}-{mode}.jsonl-00000-of-00001'))
  return {r['inputs']['inputs_pretokenized']: r for r in records}


def evaluator_metrics(predict_output, score_output, name=MIXTURE,
                      tasks=SUBTASKS):
  """seqio.Evaluator's metrics for the mixture's sub-tasks (all kinds), its
  model functions answering from our predict and score runs' outputs
  (matched by input text: the Evaluator reads the task's files in its own
  order)."""
  import seqio  # pylint: disable=g-import-not-at-top
  evaluator = seqio.Evaluator(
      mixture_or_task_name=name,
      feature_converter=seqio.EncDecFeatureConverter(pack=False),
      eval_split='test', use_cached=False, sequence_length=LENGTHS,
      logger_cls=())
  vocabulary = seqio.ByteVocabulary()
  by_input = {'predict': {}, 'score': {}}
  for task in tasks:
    by_input['predict'].update(_records_by_input(predict_output, task,
                                                 'predict'))
    by_input['score'].update(_records_by_input(score_output, task, 'score'))

  def record_of(example, mode):
    tokens = example['encoder_input_tokens']
    return by_input[mode][vocabulary.decode([int(t) for t in tokens])]

  # The Evaluator's datasets are enumerated: (index, model features).
  def predict_fn(dataset):
    answers = []
    for index, example in dataset.as_numpy_iterator():
      ids = record_of(example, 'predict')['prediction_tokens']
      answers.append((index, np.pad(ids, (0, LENGTHS['targets'] - len(ids)))))
    return answers

  def score_fn(dataset):
    return [(index, record_of(example, 'score')['score'])
            for index, example in dataset.as_numpy_iterator()]

  metrics, _ = evaluator.evaluate(compute_metrics=True,
                                  predict_fn=predict_fn, score_fn=score_fn)
  computed = metrics.result()

  def plain(value):
    if isinstance(value, seqio.metrics.Scalar):
      return value.value
    if isinstance(value, seqio.metrics.Text):
      return str(value.textdata)
    return value
  return {task: {metric: plain(value)
                 for metric, value in computed[task].items()}
          for task in tasks}


def test_metrics_equal_seqio_evaluators(predict_run, score_run):
  """Each mode's run computes its kind of metrics (predict: the predict
  metric functions and seqio.Metric objects; score: the score ones), for
  each sub-task of the Mixture, as the Evaluator does."""
  expected = evaluator_metrics(predict_run[0], score_run[0])
  kinds = {'predict': {'class_accuracy', 'input_weighted_accuracy',
                       'first_prediction'}, 'score': {'mean_score'}}
  # The one-file task also has a seqio.Metric object, fed predicted ids.
  extra = {('predict', SUBTASKS[1]): {'long_predictions'}}
  for mode, (output, result) in (('predict', predict_run),
                                 ('score', score_run)):
    for task in SUBTASKS:
      metrics = json.loads((output / f'{task}-{mode}.metrics.json'
                            ).read_text())
      assert set(metrics) == kinds[mode] | extra.get((mode, task), set())
      for name, value in metrics.items():
        want = expected[task][name]
        assert value == (want if isinstance(want, str) else
                         pytest.approx(want, rel=1e-6)), name
      assert result.manifests[task]['metrics'] == metrics
  # Non-trivial: some length classes right, some wrong.
  accuracy = [json.loads((predict_run[0] / f'{t}-predict.metrics.json'
                          ).read_text())['class_accuracy'] for t in SUBTASKS]
  assert any(0 < a < 100 for a in accuracy), accuracy


def test_scalars_go_to_tensorboard_at_the_checkpoint_step(score_run):
  import tensorflow as tf  # pylint: disable=g-import-not-at-top
  output, result = score_run
  board = output.parent / 'tensorboard'
  for task in SUBTASKS:
    (events,) = list((board / task).iterdir())
    values = {}
    for event in tf.compat.v1.train.summary_iterator(str(events)):
      for value in event.summary.value:
        values[value.tag] = (event.step,
                             float(tf.make_ndarray(value.tensor)))
    expected = result.manifests[task]['metrics']['mean_score']
    assert values['eval/mean_score'][0] == 1234
    assert values['eval/mean_score'][1] == pytest.approx(expected, rel=1e-6)


def test_a_failing_metric_keeps_the_outputs_and_a_rerun_computes_only_it(
    env, tmp_path, monkeypatch):
  gin_file = tmp_path / 'broken.gin'
  gin_file.write_text(f"""include 'runs/infer.gin'
CHECKPOINT_PATH = '{env['checkpoint']}'
MIXTURE_OR_TASK_NAME = 't5beam_test_metrics_broken'
MIXTURE_OR_TASK_MODULE = 'tests.tasks'
TASK_FEATURE_LENGTHS = {{'inputs': 24, 'targets': 8}}
DatasetConfig.batch_size = 4
RestoreCheckpointConfig.dtype = 'float32'
""")
  output = tmp_path / 'out'
  argv = [f'--gin_file={gin_file}', f'--gin.INFER_OUTPUT_DIR="{output}"']
  monkeypatch.delenv('T5BEAM_TEST_METRIC_OK', raising=False)
  status, stderr = helpers.launch(argv)
  assert status == 1
  (line,) = [l for l in stderr.splitlines() if l.startswith('t5beam: error')]
  assert ('metric broken_unless_allowed of task t5beam_test_metrics_broken '
          'failed: ValueError: this metric was told to fail') in line
  helpers.assert_short_refusal(line)
  stem = output / 't5beam_test_metrics_broken-predict'
  outputs = helpers.output_files(output)
  assert (output / (stem.name + '.jsonl-00000-of-00001.COMPLETED')).exists()
  assert not (output / (stem.name + '.metrics.json')).exists()
  manifest = json.loads((output / (stem.name + '.manifest.json')).read_text())
  assert manifest['records'] == 11 and 'metrics' not in manifest
  monkeypatch.setenv('T5BEAM_TEST_METRIC_OK', '1')
  status, stderr = helpers.launch(argv)
  assert status == 0, stderr
  assert 'computed its metrics' in stderr
  metrics = json.loads((output / (stem.name + '.metrics.json')).read_text())
  assert 0 <= metrics['class_accuracy'] <= 100
  manifest = json.loads((output / (stem.name + '.manifest.json')).read_text())
  assert manifest['metrics'] == metrics and 'metrics_error' not in manifest
  assert helpers.output_files(output) == outputs and len(outputs) == 1


def test_a_tasks_metrics_equal_seqio_evaluators(env, tmp_path):
  """A Task run on its own (not through a Mixture), predict and score."""
  task = SUBTASKS[1]
  outputs = {mode: tmp_path / mode for mode in ('predict', 'score')}
  for mode, output in outputs.items():
    run(env, output, mode, name=task)
  expected = evaluator_metrics(outputs['predict'], outputs['score'],
                               name=task, tasks=(task,))[task]
  found = {}
  for mode, output in outputs.items():
    found.update(json.loads((output / f'{task}-{mode}.metrics.json'
                             ).read_text()))
  assert set(found) == set(expected)
  for metric, value in found.items():
    want = expected[metric]
    assert value == (want if isinstance(want, str) else
                     pytest.approx(want, rel=1e-6)), metric
