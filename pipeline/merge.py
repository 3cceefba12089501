"""Merge and finish: after every chunk of a task is written, its records
are merged in input order into `{task}-{mode}.jsonl-i-of-n`, then the
manifest and the .COMPLETED markers are written, last.
"""

import dataclasses
import json
import logging
import time
from typing import Any, Dict, Sequence, Tuple

import apache_beam as beam

from model import files
from pipeline.config import InferConfig


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
    task_layout = config.layout(task_name)
    counts = dict(grouped['counts'])
    num_shards = len(counts)
    finished = task_layout.finished_chunks(num_shards)  # one listing
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
        'meshes_this_run': sorted({tuple(s.mesh) for s in stats}),
    }))


class MergeOutputShard(beam.DoFn):
  """(task, MergeJob) -> the output file, written atomically."""

  def __init__(self, config: InferConfig):
    self._config = config

  def process(self, element):
    task_name, job = element
    task_layout = self._config.layout(task_name)
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
    outputs = sorted(grouped['outputs'], key=lambda o: o.index)
    seconds = summary['inference_seconds_this_run']
    manifest = {
        'task': task_name,
        'mode': config.model.mode,
        'fingerprint': self._fingerprint,
        'settings': self._settings,
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
    files.write_atomically(
        task_layout.manifest_path,
        json.dumps(manifest, indent=2, sort_keys=True).encode('utf-8'))
    for output in outputs:
      files.write_atomically(task_layout.marker_path(output.index), b'')
    files.remove(task_layout.chunk_dir)
    yield task_name, manifest


