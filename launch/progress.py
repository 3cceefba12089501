"""What a person watching a local run sees: a progress line while the
pipeline runs (chunks done of total, examples/s, ETA), and a summary."""

import sys
import threading
import time
from typing import List

from model import files
from pipeline.config import InferConfig


class ProgressReporter:
  """Polls the output directory's chunk files from a background thread."""

  def __init__(self, config: InferConfig, task_names: List[str],
               interval: float = 2.0, stream=None):
    self._config = config
    self._layouts = [config.layout(name) for name in task_names]
    self._interval = interval
    self._stream = stream or sys.stderr
    self._stop = threading.Event()
    self._thread = threading.Thread(target=self._loop, daemon=True,
                                    name='t5beam-progress')
    self._first = None  # (time, examples done) when inference was first seen
    self._last_line = ''

  def start(self):
    self._thread.start()

  def stop(self):
    self._stop.set()
    if self._thread.ident is not None:  # started
      self._thread.join(timeout=5)
    if self._last_line and self._stream.isatty():
      self._stream.write('\n')

  def _loop(self):
    wait = self._interval
    while not self._stop.wait(wait):
      started = time.perf_counter()
      try:
        line = self.line()
      except (OSError, ValueError):
        continue  # files moving under us; try again next time
      finally:
        # Listing a large chunk directory takes time from the run: poll
        # less often, so that polling stays under 5% of one core.
        wait = max(self._interval, 20 * (time.perf_counter() - started))
      if line and line != self._last_line:
        end = '\r' if self._stream.isatty() else '\n'
        self._stream.write(line + end)
        self._stream.flush()
        self._last_line = line

  def snapshot(self):
    """(chunks done, total chunks or None, examples done, total examples)."""
    done = total = examples_done = examples_total = 0
    known = True
    for task_layout in self._layouts:
      num_shards, counts = task_layout.shard_counts()
      if num_shards is None or len(counts) < num_shards:
        known = False
        continue
      sizes = {shard: task_layout.chunk_sizes(count)
               for shard, count in counts.items()}
      total += sum(len(chunks) for chunks in sizes.values())
      examples_total += sum(counts.values())
      for shard, chunk in task_layout.finished_chunks(num_shards):
        if chunk < len(sizes.get(shard, ())):
          done += 1
          examples_done += sizes[shard][chunk]
    return done, (total if known else None), examples_done, examples_total

  def line(self) -> str:
    done, total, examples_done, examples_total = self.snapshot()
    if total is None:
      return 't5beam: reading input shards...'
    now = time.time()
    if self._first is None:
      self._first = (now, examples_done)
    elapsed = now - self._first[0]
    rate = (examples_done - self._first[1]) / elapsed if elapsed > 0 else 0
    eta = ''
    if rate > 0 and examples_done < examples_total:
      eta = f', ETA {_duration((examples_total - examples_done) / rate)}'
    speed = f', {rate:.1f} examples/s' if rate > 0 else ''
    return (f't5beam: {done}/{total} chunks, {examples_done}/'
            f'{examples_total} examples{speed}{eta}')


def _duration(seconds: float) -> str:
  seconds = int(seconds)
  if seconds >= 3600:
    return f'{seconds // 3600}h{seconds % 3600 // 60:02d}m'
  if seconds >= 60:
    return f'{seconds // 60}m{seconds % 60:02d}s'
  return f'{seconds}s'


def summary(config: InferConfig, result, wall_seconds: float) -> str:
  """The end-of-run summary: examples, time, throughput, files, metrics."""
  if result.status == 'already_complete':
    return (f't5beam: {config.output_dir} already holds this run\'s complete '
            'output; nothing to do.')
  if result.status == 'metrics':
    lines = [f't5beam: {config.output_dir} holds this run\'s complete output;'
             f' computed its metrics in {wall_seconds:.1f} s']
    for task, manifest in sorted(result.manifests.items()):
      lines.append(f'  {task}: {manifest["records"]} examples')
      lines.extend(_metrics_lines(manifest))
    return '\n'.join(lines)
  lines = [f't5beam: done in {_duration(wall_seconds)} '
           f'({wall_seconds:.1f} s)']
  for task, manifest in sorted(result.manifests.items()):
    this_run = manifest['this_run']
    rate = this_run['examples_per_second']
    tokens = this_run['tokens_per_second']
    lines.append(
        f'  {task}: {manifest["records"]} examples; this run inferred '
        f'{this_run["examples_inferred"]} in '
        f'{this_run["inference_seconds"]:.1f} s of model time'
        + (f' ({rate:.1f} examples/s, {tokens:.0f} tokens/s)'
           if rate else ''))
    lines.extend(_metrics_lines(manifest))
    lines.extend(_truncation_lines(manifest))
    for output in manifest['files']:
      lines.append(f'    {files.join(config.output_dir, output["name"])} '
                   f'({output["records"]} records)')
  return '\n'.join(lines)


def _truncation_lines(manifest) -> List[str]:
  """A warning per feature whose examples were cut to their length."""
  lines = []
  for feature, cut in sorted(manifest.get('truncated', {}).items()):
    if cut['examples']:
      lines.append(
          f'    warning: {cut["examples"]} example(s) had {feature} longer '
          f'than {cut["limit"]} tokens (the longest {cut["longest"]}) and '
          f'were cut; raise TASK_FEATURE_LENGTHS[{feature!r}] to keep them')
    if cut.get('empty'):
      lines.append(
          f'    warning: {cut["empty"]} example(s) had empty {feature} (no '
          'token but EOS) after the task\'s preprocessors')
    if cut['unmeasured_at_limit']:
      lines.append(
          f'    note: {cut["unmeasured_at_limit"]} example(s) fill {feature}\'s'
          f' {cut["limit"]} tokens and have no {feature}_pretokenized text '
          'to tell whether they were cut')
  return lines


def _metrics_lines(manifest) -> List[str]:
  """The task's metrics (numbers; other values are in the metrics file)."""
  metrics = manifest.get('metrics')
  if not metrics:
    return []
  shown = ', '.join(f'{name} {value:.4g}' for name, value in
                    sorted(metrics.items()) if isinstance(value, float))
  return [f'    metrics: {shown or "(none numeric)"}']
