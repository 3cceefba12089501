"""Reading: one input shard of a SeqIO task -> its chunks.

A chunk (`chunk_size` consecutive examples of one input shard) is the
unit that travels from reading to inference (small ones a few to a Beam
element, EXAMPLES_PER_ELEMENT): its token ids stacked
(compactly: see `Chunk`), and each record's `inputs` already written as
JSON. SeqIO's datasets are read a chunk at a time (`Dataset.padded_batch`),
so the cost per example is tf.data's and numpy's, not Beam's; plain input
files (jsonl, TSV, TFRecord) are read without tf.data. Chunks an earlier
run finished are dropped here, before they travel.
"""

import dataclasses
import itertools
import json
from typing import (Any, Callable, Dict, Iterator, List, Mapping, Optional,
                    Sequence,
                    Tuple)

import apache_beam as beam
from apache_beam.metrics import Metrics
import numpy as np

from model import files
from model import runtime
from pipeline import file_tasks, plan
from pipeline.config import InferConfig
from pipeline.inference import NAMESPACE

SHARD_COUNTS = 'shard_counts'


class Truncation(dict):
  """feature -> [examples cut, longest length seen, examples filling the
  length whose text was not there to measure, examples with no token but
  EOS]: lengths before SeqIO trimmed them to TASK_FEATURE_LENGTHS, EOS
  counted as SeqIO counts it. Trimming inside a task's own preprocessors
  cannot be seen."""

  def add_lengths(self, feature: str, lengths, limit: int):
    """Untrimmed lengths (known for every example), EOS counted."""
    lengths = np.asarray(lengths, np.int64)
    entry = self.setdefault(feature, [0, 0, 0, 0])
    entry[0] += int(np.count_nonzero(lengths > limit))
    entry[1] = max(entry[1], int(lengths.max(initial=0)))
    entry[3] += int(np.count_nonzero(lengths <= 1))

  def add_trimmed(self, feature: str, tokens: np.ndarray, texts, limit: int,
                  vocabulary, add_eos: bool):
    """Trimmed token ids [examples, width] (0-padded): an example shorter
    than the limit was not cut; one that fills it is measured again from
    its `*_pretokenized` text (`texts`, None when the task has none)."""
    lengths = np.count_nonzero(tokens, axis=1)
    entry = self.setdefault(feature, [0, 0, 0, 0])
    entry[3] += int(np.count_nonzero(lengths <= int(add_eos)))
    longest = int(lengths.max(initial=0))
    for row in np.flatnonzero(lengths >= limit):
      if texts is None:
        entry[2] += 1
        continue
      text = texts[row]
      length = len(vocabulary.encode(
          text.decode('utf-8') if isinstance(text, bytes) else text)) + add_eos
      longest = max(longest, length)
      entry[0] += length > limit
    entry[1] = max(entry[1], longest)

  def merge(self, other: Mapping[str, Sequence[int]]):
    for feature, (cut, longest, unknown, empty) in other.items():
      entry = self.setdefault(feature, [0, 0, 0, 0])
      entry[0] += cut
      entry[1] = max(entry[1], longest)
      entry[2] += unknown
      entry[3] += empty
    return self


@dataclasses.dataclass
class Chunk:
  """One chunk's examples: `inputs[i]` is the JSON of example `first + i`'s
  record `inputs`. Its token ids travel compact (each example's inputs and
  targets, 0-padded to the chunk's longest, in uint16 when the ids fit):
  through a shuffle that is a fraction of the padded int32 model features,
  which `features` rebuilds."""
  first: int
  inputs: List[str]
  encoder_tokens: np.ndarray
  target_tokens: np.ndarray
  lengths: Tuple[int, int]  # TASK_FEATURE_LENGTHS inputs, targets

  def __len__(self) -> int:
    return len(self.inputs)

  @property
  def features(self) -> Dict[str, np.ndarray]:
    """The model features, [examples, length] int32 each."""
    encoder = _widen(self.encoder_tokens, self.lengths[0])
    targets = _widen(self.target_tokens, self.lengths[1])
    decoder_inputs = np.zeros_like(targets)
    decoder_inputs[:, 1:] = targets[:, :-1]
    return {'encoder_input_tokens': encoder,
            'decoder_input_tokens': decoder_inputs,
            'decoder_target_tokens': targets,
            'decoder_loss_weights': (targets != 0).astype(np.int32)}


def _compact(tokens: np.ndarray) -> np.ndarray:
  """[examples, length] ids without their all-padding columns, in uint16
  when they fit."""
  used = np.flatnonzero(np.any(tokens != 0, axis=0))
  tokens = tokens[:, :used[-1] + 1 if len(used) else 0]
  if tokens.size and 0 <= tokens.min() and tokens.max() < 1 << 16:
    return tokens.astype(np.uint16)
  return tokens.astype(np.int32)


def _widen(tokens: np.ndarray, length: int) -> np.ndarray:
  out = np.zeros((tokens.shape[0], length), np.int32)
  out[:, :tokens.shape[1]] = tokens
  return out


def make_chunk(task_name: str, first: int, inputs_json: List[str],
               inputs: np.ndarray, targets: np.ndarray,
               lengths: Mapping[str, int]) -> Chunk:
  """A Chunk from its examples' 0-padded token ids (any width), checked
  against the feature lengths as SeqIO's converter checks them."""
  return Chunk(first, inputs_json,
               _compact(_padded(task_name, 'inputs', inputs,
                                int(lengths['inputs']))),
               _compact(_padded(task_name, 'targets', targets,
                                int(lengths['targets']))),
               (int(lengths['inputs']), int(lengths['targets'])))


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


def _keeps(config: Optional[InferConfig]):
  """Which task features go into a record's `inputs`, as T5X chooses them:
  the `*_pretokenized` features, or all (include_all_inputs), or the named
  fields and their `_pretokenized` forms (input_fields_to_include)."""
  if config is not None and config.include_all_inputs:
    return lambda k: True
  if config is not None and config.input_fields_to_include is not None:
    fields = set(config.input_fields_to_include)
    fields |= {f'{f}_pretokenized' for f in fields}
    return lambda k: k in fields
  return lambda k: k.endswith('_pretokenized')


def _inputs_json(columns: Dict[str, Any], count: int) -> List[str]:
  """The JSON `inputs` of each of `count` examples, from their fields'
  values stacked along the first axis."""
  names = sorted(columns)
  values = [[_json_value(v) for v in columns[name]] for name in names]
  return [json.dumps(dict(zip(names, row))) for row in zip(*values)] if names \
      else ['{}'] * count


def _padded(task_name: str, feature: str, tokens: np.ndarray,
            length: int) -> np.ndarray:
  """[examples, length] int32 token ids from a batch padded with 0 to its
  longest; as SeqIO's converter, an example longer than `length` is an
  error, not silently cut."""
  if tokens.ndim != 2 or tokens.dtype.kind not in 'iu':
    raise ValueError(
        f'task {task_name!r}: feature {feature!r} must hold int32 token ids '
        f'(rank 1 per example), got {tokens.dtype} of rank '
        f'{tokens.ndim - 1}; check the task\'s preprocessors')
  if tokens.shape[1] > length and np.any(tokens[:, length:]):
    longest = int(np.max(np.sum(tokens != 0, axis=1)))
    raise ValueError(
        f'task {task_name!r}: an example\'s {feature!r} has {longest} '
        f'tokens, over TASK_FEATURE_LENGTHS[{feature!r}] = {length}; raise '
        'it, or trim in the task (seqio.preprocessors.append_eos_after_trim)')
  out = np.zeros((tokens.shape[0], length), np.int32)
  width = min(length, tokens.shape[1])
  out[:, :width] = tokens[:, :width]
  return out


def _stack_rows(rows: Sequence[Sequence[int]]) -> np.ndarray:
  """Rank-1 token ids stacked into [examples, longest], 0-padded."""
  width = max([len(r) for r in rows] + [0])
  out = np.zeros((len(rows), width), np.int64)
  for i, row in enumerate(rows):
    out[i, :len(row)] = row
  return out


def measured_features(config: InferConfig) -> Tuple[str, ...]:
  """The features whose truncation is counted: the inputs, and in score
  mode the targets (which predictions do not read)."""
  return ('inputs', 'targets') if config.model.mode == 'score' else (
      'inputs',)


def read_chunks(config: InferConfig, task_name: str, shard: int,
                num_shards: int, skip: Sequence[int] = (),
                truncation: Optional[Truncation] = None,
                bad: Optional[Callable[[file_tasks.BadRecord], None]] = None
                ) -> Iterator[Tuple[int, int, Optional[Chunk]]]:
  """(chunk, examples in it, Chunk) for every chunk of one input shard, in
  order; the Chunk is None for chunks in `skip` (read, never converted).
  `truncation` (if given) counts every example's cut features, skipped
  chunks' too. Bad records of input files go to `bad` and are skipped
  (by default: ValueError naming the first).

  Plain input files (infer.file_task: jsonl, TSV, TFRecord) are read and
  tokenized in Python a chunk at a time; a registered SeqIO task through
  its tf.data pipeline. Both give the same chunks."""
  truncation = Truncation() if truncation is None else truncation
  file_task = config.file_task
  if file_task is not None and task_name == file_task.task_name:
    return _file_chunks(config, shard, num_shards, skip, truncation, bad)
  return _task_chunks(config, task_name, shard, num_shards, skip, truncation)


def _file_chunks(config: InferConfig, shard: int, num_shards: int,
                 skip: Sequence[int], truncation: Truncation, bad=None):
  """read_chunks of plain input files, without tf.data: the same fields
  and token ids as the file task's SeqIO pipeline."""
  spec = config.file_task
  lengths = config.task_feature_lengths
  keep = _keeps(config)
  size = config.chunk_size
  skip = frozenset(skip)
  measured = measured_features(config)
  texts = file_tasks.shard_texts(spec, shard, num_shards, bad)
  for chunk in itertools.count():
    rows = list(itertools.islice(texts, size))
    if not rows:
      return
    inputs = [i for i, _ in rows]
    targets = [t for _, t in rows]
    tokens = {}
    for feature, values in (('inputs', inputs), ('targets', targets)):
      if chunk in skip and feature not in measured:
        continue
      tokens[feature], untrimmed = file_tasks.tokenize(spec, values,
                                                       lengths[feature])
      if feature in measured:
        truncation.add_lengths(feature, untrimmed, lengths[feature])
    if chunk in skip:
      yield chunk, len(rows), None
      continue
    fields = {'inputs': tokens['inputs'], 'inputs_pretokenized': inputs,
              'targets': tokens['targets'], 'targets_pretokenized': targets}
    yield chunk, len(rows), make_chunk(
        spec.task_name, chunk * size,
        _inputs_json({k: v for k, v in fields.items() if keep(k)}, len(rows)),
        _stack_rows(tokens['inputs']), _stack_rows(tokens['targets']),
        lengths)


def task_dataset(config: InferConfig, task, shard: int, num_shards: int):
  """One input shard of a SeqIO task's examples, in order, as the run
  reads them."""
  import seqio  # pylint: disable=g-import-not-at-top
  return task.get_dataset(
      sequence_length=dict(config.task_feature_lengths), split=config.split,
      shuffle=False, num_epochs=1,
      shard_info=seqio.ShardInfo(shard, num_shards), use_cached=False, seed=0)


def _task_chunks(config: InferConfig, task_name: str, shard: int,
                 num_shards: int, skip: Sequence[int],
                 truncation: Truncation):
  """read_chunks of a SeqIO task: its dataset is read once (the record
  fields and the token ids come from the same example), batched a chunk at
  a time."""
  import seqio  # pylint: disable=g-import-not-at-top
  task = seqio.get_mixture_or_task(task_name)
  lengths = dict(config.task_feature_lengths)
  task_ds = task_dataset(config, task, shard, num_shards)
  spec = task_ds.element_spec
  for feature in ('inputs', 'targets'):
    if feature not in spec:
      raise ValueError(f'task {task_name!r} has no {feature!r} feature (it '
                       f'has {sorted(spec)}); an encoder-decoder model needs '
                       'both')
  keep = _keeps(config)
  kept = sorted(k for k in spec if keep(k))
  size = config.chunk_size
  skip = frozenset(skip)
  measured = measured_features(config)
  texts = {f: f'{f}_pretokenized' for f in measured
           if f'{f}_pretokenized' in spec}

  def chunk_of(chunk, columns, inputs, targets):
    for feature, tokens in (('inputs', inputs), ('targets', targets)):
      if feature in measured:
        output = task.output_features[feature]
        truncation.add_trimmed(
            feature, tokens, columns[texts[feature]] if feature in texts
            else None, lengths[feature], output.vocabulary, output.add_eos)
    if chunk in skip:
      return None
    return make_chunk(task_name, chunk * size,
                      _inputs_json({k: columns[k] for k in kept},
                                   len(inputs)),
                      inputs, targets, lengths)

  if all(spec[k].shape.is_fully_defined() for k in kept):
    # One tf.data batch per chunk; token ids padded to the chunk's longest.
    needed = sorted(set(kept) | {'inputs', 'targets'} | set(texts.values()))
    batches = (task_ds.map(lambda ex: {k: ex[k] for k in needed})
               .padded_batch(size).prefetch(1).as_numpy_iterator())
    for chunk, columns in enumerate(batches):
      yield chunk, len(columns['inputs']), chunk_of(
          chunk, columns, columns['inputs'], columns['targets'])
    return
  # Record fields of varying shape (token ids, with include_all_inputs): read
  # example by example, converted a chunk at a time.
  rows, chunk = [], 0
  for example in task_ds.as_numpy_iterator():
    rows.append(example)
    if len(rows) == size:
      yield chunk, size, chunk_of(chunk, *_columns(rows))
      rows, chunk = [], chunk + 1
  if rows:
    yield chunk, len(rows), chunk_of(chunk, *_columns(rows))


def _columns(rows: Sequence[Dict[str, Any]]):
  """(each field's values, inputs and targets token ids stacked)."""
  columns = {k: [row[k] for row in rows] for k in rows[0]}
  return (columns, _stack_rows(columns['inputs']),
          _stack_rows(columns['targets']))


# Small chunks travel together: an element carries consecutive chunks of one
# shard until it holds this many examples (a chunk of this size or more
# travels alone). Beam's cost per element (the shuffle's encoding, the
# runner's bookkeeping, about 0.3 ms on the DirectRunner) is then paid once
# per thousand examples rather than once per chunk; each chunk is still
# inferred, written and resumed on its own.
EXAMPLES_PER_ELEMENT = 1024


class ReadShard(beam.DoFn):
  """(task, input shard, shard count) -> ((task, shard), [(chunk, Chunk),
  ...]) for the chunks still to infer, a few at a time
  (EXAMPLES_PER_ELEMENT).

  Each shard's example count goes to the 'shard_counts' output (and to a
  count file, for the progress line), so the merge knows every chunk it
  must find. Given the inference step's `model_loader` (an
  `infer_chunks.ModelLoader`), it starts loading the model once it reads a
  chunk still to infer, and reads on while the model loads (a worker whose
  shards an earlier run finished loads nothing).
  """

  def __init__(self, config: InferConfig,
               task_plans: Sequence[plan.TaskPlan], model_loader=None):
    self._config = config
    self._finished = {p.name: p.finished for p in task_plans}
    self._model_loader = model_loader

  def setup(self):
    runtime.keep_tensorflow_off_accelerators()
    plan.prepare_tasks(self._config)
    # The model being loaded, held until teardown so that it outlives the
    # reading.
    self._loading = None

  def process(self, element: Tuple[str, int, int]):
    task_name, shard, num_shards = element
    finished = self._finished.get(task_name, frozenset())
    skip = [chunk for s, chunk in finished if s == shard]
    count = skipped = in_group = 0
    group = []
    truncation = Truncation()
    bad = []
    for chunk, examples, data in read_chunks(self._config, task_name, shard,
                                             num_shards, skip, truncation,
                                             bad.append):
      count += examples
      if data is None:
        skipped += 1
        continue
      if self._loading is None and self._model_loader is not None:
        self._loading = self._model_loader.start()
      group.append((chunk, data))
      in_group += examples
      if in_group >= EXAMPLES_PER_ELEMENT:
        yield (task_name, shard), group
        group, in_group = [], 0
    if group:
      yield (task_name, shard), group
    Metrics.counter(NAMESPACE, 'chunks_skipped').inc(skipped)
    Metrics.counter(NAMESPACE, 'examples_read').inc(count)
    task_layout = self._config.layout(task_name)
    files.write_atomically(
        task_layout.count_path(shard, num_shards),
        json.dumps({'examples': count}).encode())
    if self._config.file_task is not None:  # only files have bad records
      # The shard's bad records (rewritten whole each time it is read, so a
      # fixed file leaves none), for the task's errors file.
      files.write_atomically(
          task_layout.errors_path(shard, num_shards),
          ''.join(b.to_json() + '\n' for b in bad).encode())
    Metrics.counter(NAMESPACE, 'bad_records').inc(len(bad))
    yield beam.pvalue.TaggedOutput(SHARD_COUNTS, (task_name, (
        shard, count, dict(truncation), len(bad))))
