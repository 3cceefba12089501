"""The Beam transforms of an inference run: read, group, infer, write, merge.

    ListShards -> ReadShards -> GroupIntoChunks -> InferChunks (writes chunk
    files) -> [with the shard counts] PlanMerge -> MergeOutputShards ->
    WriteManifest

Each step's name is what the Dataflow UI shows. Every file is written
atomically and every step is idempotent, so Beam's retries and reruns of the
whole job never duplicate or lose a record.
"""

import dataclasses
import json
import logging
import os
import threading
import time
import zlib
from typing import Any, Dict, List, Optional, Sequence, Tuple

import apache_beam as beam
from apache_beam.metrics import Metrics
from apache_beam.utils import shared
import numpy as np

from model import files
from pipeline import lock, plan
from pipeline.config import InferConfig

NAMESPACE = 't5beam'
_SHARD_COUNTS = 'shard_counts'
# Failure injection for tests of Beam's retries: "task:shard:chunk=marker"
# raises once, in the middle of that chunk's inference, unless `marker`
# exists (it is created when the fault fires).
FAULT_ONCE_ENV = 'T5BEAM_INJECT_FAULT_ONCE'


def _maybe_inject_fault(task_name: str, shard: int, chunk: int):
  spec = os.environ.get(FAULT_ONCE_ENV)
  if not spec:
    return
  target, marker = spec.split('=', 1)
  if target == f'{task_name}:{shard}:{chunk}' and not os.path.exists(marker):
    with open(marker, 'w') as f:
      f.write(str(os.getpid()))
    raise RuntimeError(f'{FAULT_ONCE_ENV}: injected fault in {target}')


@dataclasses.dataclass(frozen=True)
class TaskPlan:
  """What the launcher decided for one task."""
  name: str
  num_shards: int
  # (input shard, chunk) pairs whose chunk files already exist.
  finished: frozenset = frozenset()


@dataclasses.dataclass(frozen=True)
class ChunkStats:
  """What inferring one chunk took (chunks finished by an earlier run have
  none)."""
  shard: int
  chunk: int
  examples: int
  decoded_tokens: int
  seconds: float


@dataclasses.dataclass(frozen=True)
class MergeJob:
  """One output shard: records [start, end) of the task, in input order,
  read from `pieces`: (chunk path, first line, line count)."""
  index: int
  pieces: Tuple[Tuple[str, int, int], ...]


@dataclasses.dataclass(frozen=True)
class OutputFile:
  index: int
  name: str
  records: int
  bytes: int
  sha256: str
  # Records whose prediction equals their targets_pretokenized, of those
  # that have one (a quick check of a run; not a SeqIO metric).
  exact_matches: int = 0
  with_targets: int = 0


def hide_accelerators_from_tensorflow():
  """Keeps TensorFlow (SeqIO's tf.data) off GPUs and TPUs, which JAX owns:
  TensorFlow would otherwise reserve most of the GPU memory on first use."""
  import tensorflow as tf  # pylint: disable=g-import-not-at-top
  try:
    tf.config.set_visible_devices([], 'GPU')
    tf.config.set_visible_devices([], 'TPU')
  except (RuntimeError, ValueError):
    pass  # already initialised, or no such device type


def _counter(name: str):
  return Metrics.counter(NAMESPACE, name)


# --- reading ------------------------------------------------------------------


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
  """(task, input shard) -> (chunk key, (index, inputs, model features)).

  Examples of chunks an earlier run finished are dropped here, before any
  grouping or inference. Each shard's example count goes to the
  'shard_counts' output, so the merge knows every chunk it must find.
  """

  def __init__(self, config: InferConfig, task_plans: Sequence[TaskPlan]):
    self._config = config
    self._finished = {p.name: p.finished for p in task_plans}

  def setup(self):
    hide_accelerators_from_tensorflow()
    plan.prepare_tasks(self._config)

  def process(self, element: Tuple[str, int, int]):
    import seqio  # pylint: disable=g-import-not-at-top
    import tensorflow as tf  # pylint: disable=g-import-not-at-top
    task_name, shard, num_shards = element
    config = self._config
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
      chunk = index // config.chunk_size
      if (shard, chunk) in finished:
        skipped_chunks.add(chunk)
        continue
      features = {k: np.asarray(v, np.int32)
                  for k, v in model_features.items()}
      yield ((task_name, shard, chunk),
             (index, record_inputs(task_example, config), features))
    _counter('chunks_skipped').inc(len(skipped_chunks))
    _counter('examples_read').inc(count)
    # For progress reporting: the shard's size fixes its number of chunks.
    files.write_atomically(
        plan.layout(config, task_name).count_path(shard, num_shards),
        json.dumps({'examples': count}).encode())
    yield beam.pvalue.TaggedOutput(_SHARD_COUNTS, (task_name, (shard, count)))


# --- inference ----------------------------------------------------------------


class _LoadedModel:
  """The model one worker process shares across its threads."""

  def __init__(self, model, load_seconds: float, compile_seconds: float):
    self.model = model
    self.pid = os.getpid()
    self.load_seconds = load_seconds
    self.compile_seconds = compile_seconds
    self.lock = threading.Lock()
    self.load_reported = False


def warm_up_batch(config: InferConfig) -> Dict[str, np.ndarray]:
  """A batch of the one shape every chunk uses (for compiling up front)."""
  batch, inputs, targets = (config.batch_size,
                            config.task_feature_lengths['inputs'],
                            config.task_feature_lengths['targets'])
  tokens = np.ones((batch, targets), np.int32)
  return {'encoder_input_tokens': np.ones((batch, inputs), np.int32),
          'decoder_input_tokens': tokens, 'decoder_target_tokens': tokens,
          'decoder_loss_weights': tokens}


def batch_rng(config: InferConfig, chunk_key, batch_index: int):
  """The sampling key of one batch: derived from the chunk's identity, so a
  resumed, retried or multi-worker run samples exactly as a straight run."""
  import jax  # pylint: disable=g-import-not-at-top
  task_name, shard, chunk = chunk_key
  key = jax.random.PRNGKey(config.seed)
  for part in (zlib.crc32(task_name.encode()) & 0x7FFFFFFF, shard, chunk,
               batch_index):
    key = jax.random.fold_in(key, part)
  return key


def run_model(model, config: InferConfig, batch,
              rng=None) -> Dict[str, np.ndarray]:
  """{'tokens'} for predict mode, {'tokens', 'scores'} for predict_with_aux,
  {'scores', 'token_scores', 'weights'} for score mode."""
  if config.mode == 'predict':
    # Records carry no scores, and greedy decoding is faster without them
    # (model.screened_argmax).
    tokens = model.predict_batch(batch, decoding=config.decoding, rng=rng)
    return {'tokens': tokens}
  if config.mode == 'predict_with_aux':
    tokens, scores = model.predict_batch(batch, return_scores=True,
                                         decoding=config.decoding, rng=rng)
    return {'tokens': tokens, 'scores': scores}
  scores, token_scores = model.score_batch(batch, return_token_scores=True)
  return {'scores': scores, 'token_scores': token_scores,
          'weights': np.asarray(batch['decoder_loss_weights'])}


def load_model(config: InferConfig):
  """Loads the checkpoint named by `config` and compiles the batch shape
  (called once per worker process)."""
  from model.inference import InferenceModel  # pylint: disable=g-import-not-at-top
  start = time.perf_counter()
  model = InferenceModel.load(config.checkpoint_path, config.model_config,
                              dtype=config.restore_dtype,
                              activation_dtype=config.activation_dtype)
  loaded = time.perf_counter()
  run_model(model, config, warm_up_batch(config),
            batch_rng(config, ('warm-up', 0, 0), 0)
            if config.decoding.needs_rng else None)
  compiled = time.perf_counter()
  logging.info('t5beam: process %d loaded the model in %.1f s and compiled '
               'batch shape %d in %.1f s', os.getpid(), loaded - start,
               config.batch_size, compiled - loaded)
  return _LoadedModel(model, loaded - start, compiled - loaded)


def _batches(examples: List[Tuple[int, Dict, Dict]], batch_size: int):
  """Fixed-shape batches: the last is padded with copies of its first
  example. Yields (batch arrays, number of real examples)."""
  for begin in range(0, len(examples), batch_size):
    part = examples[begin:begin + batch_size]
    real = len(part)
    part = part + [part[0]] * (batch_size - real)
    batch = {name: np.stack([features[name] for _, _, features in part])
             for name in part[0][2]}
    yield batch, real


class InferChunk(beam.DoFn):
  """(chunk key, examples) -> the chunk's jsonl file; yields ChunkStats.

  The model is loaded in `setup`, once per worker process, and shared by the
  DoFn instances of that process's threads.
  """

  def __init__(self, config: InferConfig, model_handle: shared.Shared,
               num_shards: Dict[str, int],
               lock_ref: Optional[lock.LockRef] = None):
    self._config = config
    self._model_handle = model_handle
    self._num_shards = dict(num_shards)  # input shards of each task
    self._lock_ref = lock_ref
    self._vocabularies = {}

  def setup(self):
    hide_accelerators_from_tensorflow()
    plan.prepare_tasks(self._config)
    tag = f'{self._config.checkpoint_path}:{self._config.fingerprint()}'
    self._loaded = self._model_handle.acquire(
        lambda: load_model(self._config), tag=tag)
    lock.worker_heartbeat(self._lock_ref)

  def _vocabulary(self, task_name: str):
    if task_name not in self._vocabularies:
      import seqio  # pylint: disable=g-import-not-at-top
      task = seqio.get_mixture_or_task(task_name)
      self._vocabularies[task_name] = task.output_features['targets'].vocabulary
    return self._vocabularies[task_name]

  def process(self, element):
    (task_name, shard, chunk), examples = element
    config = self._config
    with self._loaded.lock:
      if not self._loaded.load_reported:
        self._loaded.load_reported = True
        _counter('model_loads').inc()
        _counter('startup_milliseconds').inc(int(
            1000 * (self._loaded.load_seconds + self._loaded.compile_seconds)))
    examples = sorted(examples, key=lambda e: e[0])
    path = plan.layout(config, task_name).chunk_path(
        shard, self._num_shards[task_name], chunk)
    if files.exists(path):
      # A retried or duplicated bundle: the chunk is already complete.
      _counter('chunks_already_written').inc()
      return
    start = time.perf_counter()
    lines, decoded_tokens = self._infer(task_name, examples,
                                        (task_name, shard, chunk))
    seconds = time.perf_counter() - start
    files.write_atomically(path, ''.join(lines).encode('utf-8'))
    lock.worker_heartbeat(self._lock_ref)
    num_batches = -(-len(examples) // config.batch_size)
    _counter('examples_inferred').inc(len(examples))
    _counter('batches').inc(num_batches)
    _counter('chunks_inferred').inc()
    _counter('decoded_tokens').inc(decoded_tokens)
    logging.info('t5beam: %s shard %d chunk %d: %d examples in %.2f s '
                 '(%.1f examples/s)', task_name, shard, chunk, len(examples),
                 seconds, len(examples) / max(seconds, 1e-9))
    yield task_name, ChunkStats(shard, chunk, len(examples), decoded_tokens,
                                seconds)

  def _infer(self, task_name: str, examples,
             chunk_key) -> Tuple[List[str], int]:
    config = self._config
    model = self._loaded.model
    vocabulary = self._vocabulary(task_name)
    lines = []
    decoded_tokens = 0
    for index, (batch, real) in enumerate(_batches(examples,
                                                   config.batch_size)):
      batch_examples = examples[len(lines):len(lines) + real]
      rng = (batch_rng(config, chunk_key, index)
             if config.decoding.needs_rng else None)
      outputs = {k: v[:real] for k, v in run_model(model, config, batch,
                                                      rng).items()}
      _maybe_inject_fault(*chunk_key)
      for i, (_, inputs, _) in enumerate(batch_examples):
        record = {'inputs': inputs}
        if 'tokens' in outputs:
          record.update(_prediction_fields(
              config, vocabulary, outputs['tokens'][i],
              outputs['scores'][i] if 'scores' in outputs else None))
          decoded_tokens += int(np.sum(outputs['tokens'][i] > 0))
        else:
          record['score'] = float(outputs['scores'][i])
          if config.return_intermediates:
            real_tokens = outputs['weights'][i] > 0
            record['aux'] = {'token_scores': [
                float(x) for x in outputs['token_scores'][i][real_tokens]]}
        lines.append(json.dumps(record) + '\n')
    return lines, decoded_tokens


def _prediction_fields(config: InferConfig, vocabulary, tokens: np.ndarray,
                       scores) -> Dict[str, Any]:
  """`prediction` (+ `prediction_tokens`, `aux`) of one example; lists of
  all decodes (increasing score) when return_all_decodes. `scores` (None in
  predict mode) go to `aux` in predict_with_aux mode."""
  def cut(ids):
    ids = ids.tolist()
    return ids[:ids.index(0)] if 0 in ids else ids

  if tokens.ndim == 2:
    ids = [cut(row) for row in tokens]
    fields = {'prediction': [vocabulary.decode(i) for i in ids]}
  else:
    ids = cut(tokens)
    fields = {'prediction': vocabulary.decode(ids)}
  if config.output_ids:
    fields['prediction_tokens'] = ids
  if config.mode == 'predict_with_aux':
    fields['aux'] = {'scores': np.asarray(scores, np.float64).tolist()}
  return fields


# --- merge and finish ---------------------------------------------------------


class PlanMerge(beam.DoFn):
  """(task, {shard counts, chunk stats}) -> one MergeJob per output shard.

  Runs after every chunk of the task is written. Checks that every chunk
  file the shard counts call for exists, then splits the task's records
  into `num_output_shards` contiguous ranges. Also yields the task's summary
  to the 'summary' output.
  """

  def __init__(self, config: InferConfig):
    self._config = config

  def process(self, element):
    task_name, grouped = element
    config = self._config
    task_layout = plan.layout(config, task_name)
    counts = dict(grouped['counts'])
    num_shards = len(counts)
    chunks = []  # (path, records) in input order
    for shard in sorted(counts):
      remaining = counts[shard]
      chunk = 0
      while remaining > 0:
        size = min(config.chunk_size, remaining)
        chunks.append((task_layout.chunk_path(shard, num_shards, chunk), size))
        remaining -= size
        chunk += 1
    missing = [path for path, _ in chunks if not files.exists(path)]
    if missing:
      raise RuntimeError(
          f'{task_name}: {len(missing)} chunk file(s) missing before the '
          f'merge, first {missing[0]}; rerun the same command to infer them')
    total = sum(size for _, size in chunks)
    if total == 0:
      logging.warning('t5beam: task %s split %r has no examples; writing an '
                      'empty output', task_name, config.split)
    n = config.num_output_shards
    bounds = [total * i // n for i in range(n + 1)]
    for index in range(n):
      start, end = bounds[index], bounds[index + 1]
      pieces = []
      offset = 0
      for path, size in chunks:
        lo, hi = max(start, offset), min(end, offset + size)
        if lo < hi:
          pieces.append((path, lo - offset, hi - lo))
        offset += size
      yield task_name, MergeJob(index, tuple(pieces))
    stats = list(grouped['stats'])
    yield beam.pvalue.TaggedOutput('summary', (task_name, {
        'examples': total,
        'input_shards': num_shards,
        'chunks': len(chunks),
        'chunks_inferred_this_run': len(stats),
        'examples_inferred_this_run': sum(s.examples for s in stats),
        'decoded_tokens_this_run': sum(s.decoded_tokens for s in stats),
        'inference_seconds_this_run': sum(s.seconds for s in stats),
    }))


class MergeOutputShard(beam.DoFn):
  """(task, MergeJob) -> the output file, written atomically."""

  def __init__(self, config: InferConfig):
    self._config = config

  def process(self, element):
    task_name, job = element
    task_layout = plan.layout(self._config, task_name)
    parts = []
    for path, first, count in job.pieces:
      lines = files.read_text(path).splitlines(keepends=True)
      if len(lines) < first + count:
        raise RuntimeError(f'chunk file {path} has {len(lines)} records, '
                           f'expected at least {first + count}')
      parts.extend(lines[first:first + count])
    data = ''.join(parts).encode('utf-8')
    files.write_atomically(task_layout.output_path(job.index), data)
    matches, with_targets = _exact_matches(parts)
    yield task_name, OutputFile(job.index, task_layout.output_name(job.index),
                                len(parts), len(data), files.sha256(data),
                                matches, with_targets)


def _exact_matches(lines: Sequence[str]) -> Tuple[int, int]:
  matches = with_targets = 0
  for line in lines:
    record = json.loads(line)
    target = record.get('inputs', {}).get('targets_pretokenized')
    if isinstance(target, str) and 'prediction' in record:
      with_targets += 1
      matches += record['prediction'] == target
  return matches, with_targets


class WriteManifest(beam.DoFn):
  """(task, {summary, outputs}) -> manifest, then the .COMPLETED markers,
  then the chunk directory is removed."""

  def __init__(self, config: InferConfig, started_at: float):
    self._config = config
    self._started_at = started_at

  def process(self, element):
    task_name, grouped = element
    config = self._config
    task_layout = plan.layout(config, task_name)
    (summary,) = grouped['summary']
    outputs = sorted(grouped['outputs'], key=lambda o: o.index)
    seconds = summary['inference_seconds_this_run']
    manifest = {
        'task': task_name,
        'mode': config.mode,
        'fingerprint': config.fingerprint(),
        'settings': config.fingerprint_fields(),
        'records': summary['examples'],
        'files': [dataclasses.asdict(o) for o in outputs],
        'exact_match': {
            'matches': sum(o.exact_matches for o in outputs),
            'of': sum(o.with_targets for o in outputs),
        },
        'input_shards': summary['input_shards'],
        'chunks': summary['chunks'],
        'this_run': {
            'chunks_inferred': summary['chunks_inferred_this_run'],
            'examples_inferred': summary['examples_inferred_this_run'],
            'decoded_tokens': summary['decoded_tokens_this_run'],
            'inference_seconds': round(seconds, 3),
            'examples_per_second': round(
                summary['examples_inferred_this_run'] / seconds, 2)
                                   if seconds else None,
            'tokens_per_second': round(
                summary['decoded_tokens_this_run'] / seconds, 2)
                                 if seconds else None,
            'wall_seconds': round(time.time() - self._started_at, 3),
        },
    }
    files.write_atomically(
        task_layout.manifest_path,
        json.dumps(manifest, indent=2, sort_keys=True).encode('utf-8'))
    for output in outputs:
      files.write_atomically(task_layout.marker_path(output.index), b'')
    files.remove(task_layout.chunk_dir)
    yield task_name, manifest


# --- the whole run --------------------------------------------------------------


class InferAndWrite(beam.PTransform):
  """The pipeline of one run, from the launcher's plan to final files."""

  def __init__(self, config: InferConfig, task_plans: Sequence[TaskPlan],
               started_at: Optional[float] = None,
               lock_ref: Optional[lock.LockRef] = None):
    super().__init__()
    self._config = config
    self._task_plans = list(task_plans)
    self._started_at = started_at or time.time()
    self._lock_ref = lock_ref

  def expand(self, pbegin):
    config = self._config
    shards = [(p.name, shard, p.num_shards) for p in self._task_plans
              for shard in range(p.num_shards)]
    infer = InferChunk(config, shared.Shared(),
                       {p.name: p.num_shards for p in self._task_plans},
                       self._lock_ref)
    read = (pbegin
            | 'ListInputShards' >> beam.Create(shards)
            | 'SpreadShards' >> beam.Reshuffle()
            | 'ReadShards' >> beam.ParDo(ReadShard(config, self._task_plans))
            .with_outputs(_SHARD_COUNTS, main='examples'))
    stats = (read.examples
             | 'GroupIntoChunks' >> beam.GroupByKey()
             | 'InferChunks' >> beam.ParDo(infer))
    planned = ({'counts': read[_SHARD_COUNTS], 'stats': stats}
               | 'WaitForAllChunks' >> beam.CoGroupByKey()
               | 'PlanMerge' >> beam.ParDo(PlanMerge(config)).with_outputs(
                   'summary', main='jobs'))
    outputs = (planned.jobs
               | 'SpreadMerges' >> beam.Reshuffle()
               | 'MergeOutputShards' >> beam.ParDo(MergeOutputShard(config)))
    manifests = ({'summary': planned.summary, 'outputs': outputs}
                 | 'WaitForAllOutputShards' >> beam.CoGroupByKey()
                 | 'WriteManifest' >> beam.ParDo(
                     WriteManifest(config, self._started_at)))
    if self._lock_ref is None or not self._lock_ref.release_at_end:
      return manifests
    return (manifests
            | 'WaitForAllManifests' >> beam.combiners.Count.Globally()
            | 'ReleaseLock' >> beam.Map(_release_lock, self._lock_ref))


def _release_lock(num_manifests: int, ref: lock.LockRef) -> int:
  lock.release(ref.output_dir, ref.owner, ref.generation)
  logging.info('t5beam: wrote %d manifest(s); released the run lock',
               num_manifests)
  return num_manifests
