"""A task's SeqIO metrics over the run's outputs, after the merge.

What `seqio.Evaluator` computes for the same predictions, without running
the model again: targets are the task's `targets_pretokenized` (else its
decoded `targets`), each passed through the task's `postprocess_fn` with
`is_target=True` and its example; predictions (the records' decoded
`prediction`) through it with `is_target=False`; then the task's metric
functions for the run's mode (predict: `predict_metric_fns`; score:
`score_metric_fns`; predict_with_aux: both predict kinds).

`postprocess_fn` and some metrics need each example whole, which the
records do not hold (they keep the `*_pretokenized` fields only): the
task's examples are read again, shard by shard as the run read them (so in
the records' order), through SeqIO with no inference. They are streamed
beside the output files; only what the metric functions take (postprocessed
targets and predictions, scores) is held, one entry per example. Metric
objects that are not metric functions (`seqio.Metric` subclasses given to
the Task) take the examples themselves, which are then held too.

The result goes to `{task}-{mode}.metrics.json` and the manifest's
`metrics`; optionally to TensorBoard at the checkpoint's step.
"""

import itertools
import json
import logging
import math
import os
from typing import Any, Dict, Iterator, List, Optional, Tuple

import apache_beam as beam
import numpy as np

from model import checkpoints, files, runtime
from pipeline import plan, read
from pipeline.config import InferConfig


class MetricError(Exception):
  """A metric function raised; the message names it and the task."""


def task_examples(config: InferConfig, task_name: str,
                  num_shards: int) -> Iterator[Dict[str, Any]]:
  """The task's examples as the run read them: shard by shard, in order,
  as numpy dicts."""
  import seqio  # pylint: disable=g-import-not-at-top
  task = seqio.get_mixture_or_task(task_name)
  for shard in range(num_shards):
    yield from read.task_dataset(config, task, shard,
                                 num_shards).as_numpy_iterator()


def output_records(output_dir: str, manifest: Dict[str, Any]
                   ) -> Iterator[Dict[str, Any]]:
  """The task's records, in order, streamed from its output files."""
  for output in manifest['files']:
    for line in files.read_lines(files.join(output_dir, output['name'])):
      yield json.loads(line)


def _metric_fns(task, mode: str) -> List[Tuple[str, Any]]:
  """(kind, function) of the task's metric functions the mode can feed."""
  kinds = {'predict': ('predict',), 'score': ('score',),
           'predict_with_aux': ('predict', 'predict_with_aux')}[mode]
  found = []
  for kind in kinds:
    found += [(kind, fn) for fn in getattr(task, f'{kind}_metric_fns')]
  return found


def _metric_objects(task, mode: str) -> List[Any]:
  """The task's own seqio.Metric objects (not wrapping metric functions)
  the mode can feed."""
  import seqio  # pylint: disable=g-import-not-at-top
  own = list(task.metric_objs)[:len(task.metric_objs) - len(task.metric_fns)]
  types = {'predict': ('PREDICTION',), 'score': ('SCORE',),
           'predict_with_aux': ('PREDICTION', 'PREDICTION_WITH_AUX')}[mode]
  wanted = {getattr(seqio.metrics.ModelOutputType, t) for t in types}
  return [m for m in own if m.model_output_type in wanted]


def _target(task, example: Dict[str, Any]) -> Any:
  if 'targets_pretokenized' in example:
    target = example['targets_pretokenized']
  else:
    target = task.output_features['targets'].vocabulary.decode(
        [int(t) for t in example['targets']])
  return target.decode('utf-8') if isinstance(target, bytes) else target


def _name(fn: Any) -> str:
  return getattr(fn, '__name__', None) or type(fn).__name__


def evaluate(config: InferConfig, task_name: str, manifest: Dict[str, Any]
             ) -> Tuple[Optional[Dict[str, Any]], str]:
  """(metric name -> value, '') for the task's outputs, or (None, why none
  were computed). MetricError when a metric function raises."""
  import seqio  # pylint: disable=g-import-not-at-top
  task = seqio.get_mixture_or_task(task_name)
  mode = config.model.mode
  fns = _metric_fns(task, mode)
  objects = _metric_objects(task, mode)
  if not fns and not objects:
    return None, f'task {task_name} has no metric functions for mode {mode}'
  examples = task_examples(config, task_name, manifest['input_shards'])
  first = next(examples, None)
  if first is None:
    return None, f'task {task_name} split {config.split} has no examples'
  if 'targets' not in first and 'targets_pretokenized' not in first:
    return None, f'task {task_name} split {config.split} has no targets'
  targets, predictions, scores, aux = [], [], [], {}
  # The examples and predicted ids, for seqio.Metric objects only.
  held_examples, held_tokens = [], []
  records = output_records(config.output_dir, manifest)
  for example, record in itertools.zip_longest(
      itertools.chain([first], examples), records):
    if example is None or record is None:
      raise MetricError(
          f'task {task_name}: the outputs hold {manifest["records"]} records '
          f'but the task now reads {"fewer" if example is None else "more"} '
          'examples; its input changed since the run')
    targets.append(task.postprocess_fn(_target(task, example),
                                       example=example, is_target=True))
    if mode == 'score':
      scores.append(record['score'])
    else:
      predictions.append(task.postprocess_fn(record['prediction'],
                                             example=example,
                                             is_target=False))
      for key, value in record.get('aux', {}).items():
        aux.setdefault(key, []).append(value)
    if objects:
      held_examples.append(example)
      held_tokens.append(record.get('prediction_tokens'))
  results: Dict[str, Any] = {}
  for kind, fn in fns:
    arguments = {'score': lambda: (targets, np.asarray(scores)),
                 'predict': lambda: (targets, predictions),
                 'predict_with_aux': lambda: (
                     targets, predictions,
                     {k: np.asarray(v) for k, v in aux.items()})}[kind]()
    _add(results, _call(task_name, _name(fn), fn, *arguments), task_name)
  for metric in objects:
    _add(results, _metric_object(
        task, metric, (held_examples, scores, held_tokens, aux)), task_name)
  return {name: _json_value(value) for name, value in results.items()}, ''


def _call(task_name: str, name: str, fn, *arguments) -> Dict[str, Any]:
  try:
    return fn(*arguments)
  except Exception as e:  # pylint: disable=broad-except
    message = ' '.join(str(e).split())[:200]
    raise MetricError(f'metric {name} of task {task_name} failed: '
                      f'{type(e).__name__}: {message}') from e


def _metric_object(task, metric, held) -> Dict[str, Any]:
  """A seqio.Metric object's values. It takes token ids: the records hold
  them in score mode (scores) and, for predictions, with infer.output_ids
  (`prediction_tokens`); without them it is skipped, with a warning."""
  import seqio  # pylint: disable=g-import-not-at-top
  name = type(metric).__name__
  examples, scores, tokens, aux = held
  types = seqio.metrics.ModelOutputType
  if metric.model_output_type == types.SCORE:
    model_output = np.asarray(scores)
  else:
    if any(t is None or (t and isinstance(t[0], list)) for t in tokens):
      logging.warning('t5beam: metric %s of task %s takes the predicted '
                      'token ids of one decode per example: set '
                      'infer.output_ids=True (and one decode) to compute it',
                      name, task.name)
      return {}
    model_output = np.zeros((len(tokens), max(map(len, tokens), default=0)),
                            np.int32)
    for row, ids in enumerate(tokens):
      model_output[row, :len(ids)] = ids
    if metric.model_output_type == types.PREDICTION_WITH_AUX:
      model_output = (model_output, {k: np.asarray(v) for k, v in aux.items()})

  def compute():
    instance = metric.from_model_output(examples, model_output,
                                        task.output_features, 'targets')
    if isinstance(instance, seqio.metrics.CollectingMetric):
      return instance.actual_compute(examples, task.output_features,
                                     'targets')[0]
    return instance.compute()
  return _call(task.name, name, compute)


def _add(results: Dict[str, Any], values: Dict[str, Any], task_name: str):
  for name, value in values.items():
    if name in results:
      raise MetricError(f'task {task_name}: two metrics are named {name!r}; '
                        'rename one')
    results[name] = value


def _json_value(value: Any) -> Any:
  """A metric's value for JSON: SeqIO's Scalar (and plain numbers) as a
  number, other values (Text, ...) as a string."""
  import seqio  # pylint: disable=g-import-not-at-top
  if isinstance(value, seqio.metrics.Scalar):
    value = value.value
  if isinstance(value, seqio.metrics.Text):
    return str(value.textdata)
  if isinstance(value, (int, float, np.number)) and not isinstance(
      value, bool):
    number = float(value)
    return number if math.isfinite(number) else str(number)
  if isinstance(value, np.ndarray) and value.size == 1:
    return _json_value(value.item())
  return str(value)


def scalars(metrics: Dict[str, Any]) -> Dict[str, float]:
  return {k: v for k, v in metrics.items() if isinstance(v, float)}


def write_tensorboard(directory: str, task_name: str, metrics: Dict[str, Any],
                      checkpoint_path: str) -> int:
  """The scalars as a TensorBoard event file under directory/task, at the
  checkpoint's step (0 for a checkpoint without one); returns the step."""
  import tensorflow as tf  # pylint: disable=g-import-not-at-top
  step = checkpoints.checkpoint_step(checkpoint_path)
  if step is None:
    logging.info('t5beam: %s names no training step; metrics go to '
                 'TensorBoard at step 0', checkpoint_path)
    step = 0
  # TensorBoard's scalar format, written with TensorFlow's own summary op
  # (tf.summary.scalar needs the tensorboard package, which we do not need).
  from tensorflow.core.framework import summary_pb2  # pylint: disable=g-import-not-at-top
  metadata = summary_pb2.SummaryMetadata()
  metadata.plugin_data.plugin_name = 'scalars'
  writer = tf.summary.create_file_writer(os.path.join(directory, task_name))
  with writer.as_default():
    for name, value in scalars(metrics).items():
      tf.summary.write(f'eval/{name}', tf.constant(value, tf.float32),
                       step=step, metadata=metadata.SerializeToString())
  writer.close()
  return step


def metrics_pending(manifest: Dict[str, Any]) -> bool:
  """Whether a complete output's metrics are still to compute (never tried,
  or failed)."""
  return 'metrics' not in manifest and 'metrics_skipped' not in manifest


def finish(config: InferConfig, task_name: str, manifest: Dict[str, Any]
           ) -> Dict[str, Any]:
  """Computes a complete output's metrics and records them (metrics file,
  manifest, TensorBoard); returns the manifest as rewritten. A failure is
  recorded in the manifest's `metrics_error`, never raised: the outputs
  stay complete, and a rerun computes only the metrics."""
  layout = config.layout(task_name)
  manifest = {k: v for k, v in manifest.items()
              if k not in ('metrics', 'metrics_skipped', 'metrics_error')}
  try:
    metrics, why = evaluate(config, task_name, manifest)
    if metrics is not None and config.metrics_tensorboard_dir:
      manifest['metrics_step'] = write_tensorboard(
          config.metrics_tensorboard_dir, task_name, metrics,
          config.model.checkpoint_path)
  except MetricError as e:
    manifest['metrics_error'] = str(e)
  except Exception as e:  # pylint: disable=broad-except
    message = ' '.join(str(e).split())[:200]
    manifest['metrics_error'] = (f'metrics of task {task_name} failed: '
                                 f'{type(e).__name__}: {message}')
  else:
    if metrics is None:
      logging.info('t5beam: %s; no metrics written', why)
      manifest['metrics_skipped'] = why
    else:
      files.write_json(layout.metrics_path, metrics)
      manifest['metrics'] = metrics
  if 'metrics_error' in manifest:
    logging.error('t5beam: %s', manifest['metrics_error'])
  files.write_json(layout.manifest_path, manifest)
  return manifest


class EvaluateTask(beam.DoFn):
  """(task, manifest) -> (task, manifest with its metrics), after the
  manifest and markers are written."""

  def __init__(self, config: InferConfig):
    self._config = config

  def setup(self):
    runtime.keep_tensorflow_off_accelerators()
    plan.prepare_tasks(self._config)

  def process(self, element):
    task_name, manifest = element
    if 'too_many_bad_records' in manifest:  # not merged: nothing to measure
      yield task_name, manifest
      return
    yield task_name, finish(self._config, task_name, manifest)
