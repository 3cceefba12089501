"""Merge and finish: after every chunk of a task is written, its records
are merged in input order into `{task}-{mode}.jsonl-i-of-n`, then the
manifest and the .COMPLETED markers are written, last.
"""

import collections
import concurrent.futures
import dataclasses
import hashlib
import io
import itertools
import logging
import time
from typing import Any, Dict, Tuple

import apache_beam as beam

from model import files
from pipeline import read
from pipeline.config import InferConfig


@dataclasses.dataclass(frozen=True)
class MergeJob:
  """One output shard: records [start, end) of the task, in input order,
  read from `pieces`: (chunk path, first line, line count)."""
  index: int
  pieces: Tuple[Tuple[str, int, int], ...]
  num_files: int = 1


@dataclasses.dataclass(frozen=True)
class OutputFile:
  index: int
  name: str
  records: int
  bytes: int
  sha256: str


class PlanMerge(beam.DoFn):
  """(task, {shard counts, chunk stats}) -> one MergeJob per output shard.

  Runs after every chunk of the task is written. Checks that every chunk
  file the shard counts call for exists, then splits the task's records
  into `num_output_shards` contiguous ranges (with 'auto', as many as make
  files of about `output_shard_bytes`, from the listing's sizes). Also
  yields the task's summary to the 'summary' output.
  """

  def __init__(self, config: InferConfig):
    self._config = config

  def process(self, element):
    task_name, grouped = element
    config = self._config
    task_layout = config.layout(task_name)
    # (shard, examples, truncation, bad records)
    shards = list(grouped['counts'])
    counts = {shard: examples for shard, examples, _, _ in shards}
    truncation = read.Truncation()
    for _, _, cut, _ in shards:
      truncation.merge(cut)
    bad_records = sum(bad for _, _, _, bad in shards)
    num_shards = len(counts)
    summary = {
        'input_shards': num_shards,
        'bad_records': bad_records,
        'truncated': {
            feature: {'examples': cut, 'longest': longest,
                      'limit': int(config.task_feature_lengths[feature]),
                      'unmeasured_at_limit': unknown, 'empty': empty}
            for feature, (cut, longest, unknown, empty) in sorted(
                truncation.items())},
    }
    if 0 <= config.max_bad_records < bad_records:
      # Not merged: the run fails naming the first (WriteManifest writes the
      # errors file); every finished chunk is kept for the rerun.
      yield beam.pvalue.TaggedOutput('summary', (task_name, dict(
          summary, too_many_bad_records=True)))
      return
    if task_layout.num_output_shards is None:  # 'auto': sizes are needed
      finished = task_layout.chunk_file_sizes(num_shards)  # one listing
    else:
      finished = dict.fromkeys(task_layout.finished_chunks(num_shards), 0)
    chunks = []  # (path, records) in input order
    missing = []
    for shard in sorted(counts):
      for chunk, size in enumerate(task_layout.chunk_sizes(counts[shard])):
        path = task_layout.chunk_path(shard, num_shards, chunk)
        chunks.append((path, size))
        if (shard, chunk) not in finished:
          missing.append(path)
    if missing:
      raise RuntimeError(
          f'{task_name}: {len(missing)} chunk file(s) missing before the '
          f'merge, first {missing[0]}; rerun the same command to infer them')
    total = sum(size for _, size in chunks)
    if total == 0:
      logging.warning('t5beam: task %s split %r has no examples; writing an '
                      'empty output', task_name, config.split)
    n = task_layout.num_output_shards or min(max(1, total), max(1, -(-sum(
        finished.values()) // config.output_shard_bytes)))  # 'auto'
    for index, pieces in enumerate(_split(chunks, total, n)):
      yield task_name, MergeJob(index, tuple(pieces), n)
    stats = list(grouped['stats'])
    yield beam.pvalue.TaggedOutput('summary', (task_name, {
        **summary,
        'examples': total,
        'chunks': len(chunks),
        'chunks_inferred_this_run': sum(s.chunks for s in stats),
        'examples_inferred_this_run': sum(s.examples for s in stats),
        'decoded_tokens_this_run': sum(s.decoded_tokens for s in stats),
        'inference_seconds_this_run': sum(s.seconds for s in stats),
        'meshes_this_run': sorted({tuple(s.mesh) for s in stats}),
    }))


def _write_errors(task_layout, num_shards: int):
  """The input shards' bad records, in order, as the task's errors file
  (none when there are none)."""
  # One listing, not a check per input shard (thousands of them at scale).
  present = set(files.list_names(task_layout.chunk_dir))
  paths = [task_layout.errors_path(shard, num_shards)
           for shard in range(num_shards)]
  parts = [files.read_bytes(path) for path in paths
           if path.rsplit('/', 1)[-1] in present]
  data = b''.join(parts)
  if data:
    files.write_atomically(task_layout.errors_path(), data)
  elif files.exists(task_layout.errors_path()):
    files.remove(task_layout.errors_path())


# What the merge holds of an output file before writing it out.
MERGE_BUFFER_BYTES = 4 << 20
# Chunk files the merge fetches ahead of the one it copies, from a remote
# store: each is a round trip (tens of milliseconds on GCS) it would
# otherwise wait for, chunk after chunk of its output file. Memory: this
# many chunk files.
READ_AHEAD_CHUNKS = 8


def _chunk_lines(paths):
  """An iterator over each file's lines, in order. Local files are streamed;
  remote ones are each fetched in one request, READ_AHEAD_CHUNKS ahead on
  as many threads."""
  if not paths or not files.is_remote(paths[0]):
    for path in paths:
      yield files.read_lines(path)
    return
  remaining = iter(paths)
  with concurrent.futures.ThreadPoolExecutor(READ_AHEAD_CHUNKS) as pool:
    fetching = collections.deque(
        pool.submit(files.read_bytes, path)
        for path in itertools.islice(remaining, READ_AHEAD_CHUNKS))
    while fetching:
      data = fetching.popleft().result()
      for path in itertools.islice(remaining, 1):
        fetching.append(pool.submit(files.read_bytes, path))
      yield io.BytesIO(data)


def _split(chunks, total: int, n: int):
  """The pieces (chunk path, first line, line count) of each of `n`
  contiguous, near-equal ranges of the `total` records that `chunks`
  ((path, records), in order) hold; one pass over the chunks."""
  bounds = [total * i // n for i in range(n + 1)]
  pieces = [[] for _ in range(n)]
  index, offset = 0, 0
  for path, size in chunks:
    end = offset + size
    while index < n and bounds[index] < end:
      lo, hi = max(bounds[index], offset), min(bounds[index + 1], end)
      if lo < hi:
        pieces[index].append((path, lo - offset, hi - lo))
      if bounds[index + 1] > end:
        break
      index += 1
    offset = end
  return pieces


class MergeOutputShard(beam.DoFn):
  """(task, MergeJob) -> the output file, streamed from its chunk files in
  order into an atomic write; its checksum and counts are taken on the way.
  Memory stays within `buffer_bytes` (plus one line) whatever the file's
  size."""

  def __init__(self, config: InferConfig,
               buffer_bytes: int = MERGE_BUFFER_BYTES):
    self._config = config
    self._buffer_bytes = buffer_bytes

  def process(self, element):
    task_name, job = element
    task_layout = self._config.layout(task_name)
    digest = hashlib.sha256()
    records = size = 0
    buffer, buffered = [], 0
    with files.atomic_writer(task_layout.output_path(
        job.index, job.num_files)) as out:

      def flush():
        nonlocal buffer, buffered, size
        data = b''.join(buffer)
        out.write(data)
        digest.update(data)
        size += len(data)
        buffer, buffered = [], 0

      for (path, first, count), lines in zip(
          job.pieces, _chunk_lines([path for path, _, _ in job.pieces])):
        taken = 0
        for line in itertools.islice(lines, first, first + count):
          if not line.endswith(b'\n'):
            break  # a chunk file is written whole; this one is not
          taken += 1
          buffer.append(line)
          buffered += len(line)
          if buffered >= self._buffer_bytes:
            flush()
        if taken < count:
          raise RuntimeError(f'chunk file {path} has {first + taken} whole '
                             f'records, expected at least {first + count}')
        records += taken
      flush()
    yield task_name, OutputFile(job.index,
                                task_layout.output_name(job.index,
                                                        job.num_files),
                                records, size, digest.hexdigest())


class WriteManifest(beam.DoFn):
  """(task, {summary, outputs}) -> manifest, then the .COMPLETED markers,
  then the chunk directory is removed."""

  def __init__(self, config: InferConfig, fingerprint: str,
               settings: Dict[str, Any], started_at: float):
    self._config = config
    self._fingerprint = fingerprint
    self._settings = settings
    self._started_at = started_at

  def process(self, element):
    task_name, grouped = element
    config = self._config
    task_layout = config.layout(task_name)
    (summary,) = grouped['summary']
    if config.file_task is not None:
      _write_errors(task_layout, summary['input_shards'])
    if summary.get('too_many_bad_records'):
      yield task_name, {'too_many_bad_records': summary['bad_records']}
      return
    outputs = sorted(grouped['outputs'], key=lambda o: o.index)
    seconds = summary['inference_seconds_this_run']
    manifest = {
        'task': task_name,
        'mode': config.model.mode,
        'fingerprint': self._fingerprint,
        'settings': self._settings,
        'records': summary['examples'],
        'num_output_shards': len(outputs),
        'files': [dataclasses.asdict(o) for o in outputs],
        'input_shards': summary['input_shards'],
        'chunks': summary['chunks'],
        # Per feature: examples longer than TASK_FEATURE_LENGTHS before
        # SeqIO trimmed them, and the longest seen (EOS counted).
        'truncated': summary['truncated'],
        # Input records skipped as unreadable (listed in the errors file).
        'bad_records': summary['bad_records'],
        'this_run': {
            'chunks_inferred': summary['chunks_inferred_this_run'],
            'examples_inferred': summary['examples_inferred_this_run'],
            'decoded_tokens': summary['decoded_tokens_this_run'],
            'inference_seconds': round(seconds, 3),
            # The ('data', 'model') device meshes the chunks ran on.
            'meshes': [{'data': data, 'model': model}
                       for data, model in summary['meshes_this_run']],
            'examples_per_second': round(
                summary['examples_inferred_this_run'] / seconds, 2)
                                   if seconds else None,
            'tokens_per_second': round(
                summary['decoded_tokens_this_run'] / seconds, 2)
                                 if seconds else None,
            'wall_seconds': round(time.time() - self._started_at, 3),
        },
    }
    files.write_json(task_layout.manifest_path, manifest)
    for output in outputs:
      files.write_atomically(
          task_layout.marker_path(output.index, len(outputs)), b'')
    files.remove(task_layout.chunk_dir)
    yield task_name, manifest


