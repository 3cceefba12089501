"""Reading: one input shard of a SeqIO task -> its examples, keyed by chunk.

Each example travels as (index in shard, the record's `inputs`, model
features). Examples of chunks an earlier run finished are dropped here,
before any grouping or inference.
"""

import json
from typing import Any, Dict, Optional, Sequence, Tuple

import apache_beam as beam
from apache_beam.metrics import Metrics
import numpy as np

from model import files
from model import runtime
from pipeline import plan
from pipeline.config import InferConfig
from pipeline.inference import NAMESPACE

SHARD_COUNTS = 'shard_counts'


def _json_value(value: Any) -> Any:
  """T5X's JSON conversions: bytes -> str, arrays -> lists, integer scalars
  -> float, other numpy scalars -> Python numbers."""
  if isinstance(value, bytes):
    return value.decode('utf-8', errors='replace')
  if isinstance(value, np.ndarray):
    if value.dtype.kind in ('S', 'O'):
      return [_json_value(v) for v in value.tolist()]
    return value.tolist()
  if isinstance(value, np.integer):
    return float(value)  # as T5X writes integer scalars
  if isinstance(value, np.generic):
    return value.item()
  return value


def record_inputs(task_example: Dict[str, Any],
                  config: Optional[InferConfig] = None) -> Dict[str, Any]:
  """The record's `inputs`, as T5X writes them: the `*_pretokenized`
  features, or all features (include_all_inputs), or the named fields and
  their `_pretokenized` forms (input_fields_to_include)."""
  if config is not None and config.include_all_inputs:
    keep = lambda k: True
  elif config is not None and config.input_fields_to_include is not None:
    fields = set(config.input_fields_to_include)
    fields |= {f'{f}_pretokenized' for f in fields}
    keep = lambda k: k in fields
  else:
    keep = lambda k: k.endswith('_pretokenized')
  return {k: _json_value(v) for k, v in sorted(task_example.items())
          if keep(k)}


class ReadShard(beam.DoFn):
  """(task, input shard, shard count) -> (chunk key, (index, inputs, model
  features)) for every example of a chunk still to infer.

  Each shard's example count goes to the 'shard_counts' output (and to a
  count file, for the progress line), so the merge knows every chunk it
  must find.
  """

  def __init__(self, config: InferConfig,
               task_plans: Sequence[plan.TaskPlan]):
    self._config = config
    self._finished = {p.name: p.finished for p in task_plans}

  def setup(self):
    runtime.keep_tensorflow_off_accelerators()
    plan.prepare_tasks(self._config)

  def process(self, element: Tuple[str, int, int]):
    import seqio  # pylint: disable=g-import-not-at-top
    import tensorflow as tf  # pylint: disable=g-import-not-at-top
    task_name, shard, num_shards = element
    config = self._config
    task_layout = config.layout(task_name)
    task = seqio.get_mixture_or_task(task_name)
    lengths = dict(config.task_feature_lengths)
    task_ds = task.get_dataset(
        sequence_length=lengths, split=config.split, shuffle=False,
        num_epochs=1, shard_info=seqio.ShardInfo(shard, num_shards),
        use_cached=False, seed=0)
    model_ds = seqio.EncDecFeatureConverter(pack=False)(task_ds, lengths)
    finished = self._finished.get(task_name, frozenset())
    skipped_chunks = set()
    count = 0
    for index, (task_example, model_features) in enumerate(
        tf.data.Dataset.zip((task_ds, model_ds)).as_numpy_iterator()):
      count += 1
      chunk = task_layout.chunk_of(index)
      if (shard, chunk) in finished:
        skipped_chunks.add(chunk)
        continue
      features = {k: np.asarray(v, np.int32)
                  for k, v in model_features.items()}
      yield ((task_name, shard, chunk),
             (index, record_inputs(task_example, config), features))
    Metrics.counter(NAMESPACE, 'chunks_skipped').inc(len(skipped_chunks))
    Metrics.counter(NAMESPACE, 'examples_read').inc(count)
    files.write_atomically(task_layout.count_path(shard, num_shards),
                           json.dumps({'examples': count}).encode())
    yield beam.pvalue.TaggedOutput(SHARD_COUNTS, (task_name, (shard, count)))
