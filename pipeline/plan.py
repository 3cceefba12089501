"""Planning on the launcher: which tasks, how many input shards, where every
file goes, and what an earlier run already finished in the output directory.

Layout of INFER_OUTPUT_DIR (one set per task; a Mixture gives one per
sub-task):

    t5beam-run.json                          the run's fingerprint, first
    tmp-{task}-{mode}/chunk-{S}-of-{N}-{C}.jsonl   finished chunks
    tmp-{task}-{mode}/count-{S}-of-{N}.json        examples per input shard
    {task}-{mode}.jsonl-{i:05d}-of-{n:05d}   merged records, input order
    {task}-{mode}.manifest.json              counts, checksums, fingerprint
    {task}-{mode}.jsonl-{i:05d}-of-{n:05d}.COMPLETED   markers, last
"""

import dataclasses
import datetime
import difflib
import importlib
import json
import logging
import re
from typing import Dict, List, Optional, Set, Tuple

import seqio

from model import files
from pipeline.config import InferConfig

RUN_FILE = 't5beam-run.json'
_CHUNK_RE = re.compile(r'^chunk-(\d{5})-of-(\d{5})-(\d{5})\.jsonl$')


class PlanError(ValueError):
  """A configuration or output directory the run cannot proceed with."""


@dataclasses.dataclass(frozen=True)
class TaskLayout:
  """File names of one task's outputs under the output directory."""
  output_dir: str
  task: str
  mode: str
  num_output_shards: int

  @property
  def stem(self) -> str:
    return f'{self.task}-{self.mode}'

  @property
  def chunk_dir(self) -> str:
    return files.join(self.output_dir, f'tmp-{self.stem}')

  def chunk_name(self, shard: int, num_shards: int, chunk: int) -> str:
    return f'chunk-{shard:05d}-of-{num_shards:05d}-{chunk:05d}.jsonl'

  def chunk_path(self, shard: int, num_shards: int, chunk: int) -> str:
    return files.join(self.chunk_dir, self.chunk_name(shard, num_shards, chunk))

  def count_path(self, shard: int, num_shards: int) -> str:
    """Written by the reader: the number of examples in one input shard."""
    return files.join(self.chunk_dir,
                      f'count-{shard:05d}-of-{num_shards:05d}.json')

  def output_name(self, index: int) -> str:
    return (f'{self.stem}.jsonl-{index:05d}-of-'
            f'{self.num_output_shards:05d}')

  def output_path(self, index: int) -> str:
    return files.join(self.output_dir, self.output_name(index))

  def marker_path(self, index: int) -> str:
    return self.output_path(index) + '.COMPLETED'

  @property
  def manifest_path(self) -> str:
    return files.join(self.output_dir, f'{self.stem}.manifest.json')


def import_task_module(module: Optional[str]):
  """Imports MIXTURE_OR_TASK_MODULE (which registers the user's tasks)."""
  if not module:
    return
  try:
    importlib.import_module(module)
  except Exception as e:  # pylint: disable=broad-except
    raise PlanError(
        f'MIXTURE_OR_TASK_MODULE {module!r} failed to import: '
        f'{type(e).__name__}: {e}; check that the module is on PYTHONPATH and '
        'imports on its own') from e


def prepare_tasks(config: InferConfig):
  """Registers what the config's tasks need, on the launcher and workers."""
  import_task_module(config.mixture_or_task_module)
  if config.file_task is not None:
    from pipeline import file_tasks  # pylint: disable=g-import-not-at-top
    try:
      file_tasks.register(config.file_task)
    except ValueError as e:
      raise PlanError(str(e)) from e


def resolve_tasks(config: InferConfig) -> List[seqio.Task]:
  """The Task, or the Mixture's sub-tasks, named by the config."""
  prepare_tasks(config)
  name = config.mixture_or_task_name
  if name in seqio.MixtureRegistry.names():
    return list(seqio.get_mixture_or_task(name).tasks)
  if name in seqio.TaskRegistry.names():
    return [seqio.get_mixture_or_task(name)]
  known = sorted(set(seqio.TaskRegistry.names()) |
                 set(seqio.MixtureRegistry.names()))
  close = difflib.get_close_matches(name, known, n=3, cutoff=0.5)
  hint = (f'; closest registered names: {close}' if close else
          '; no registered name is close')
  where = (f' after importing {config.mixture_or_task_module!r}'
           if config.mixture_or_task_module else
           ' (set MIXTURE_OR_TASK_MODULE to the module that registers it)')
  raise PlanError(f'MIXTURE_OR_TASK_NAME {name!r} is not a registered SeqIO '
                  f'task or mixture{where}{hint}')


def num_input_shards(task: seqio.Task, config: InferConfig) -> int:
  """The configured count, else one per source file, else 1."""
  if config.num_input_shards is not None:
    return config.num_input_shards
  source = task.source
  if isinstance(source, seqio.FileDataSource):
    try:
      return max(1, len(source.list_shards(config.split)))
    except Exception:  # pylint: disable=broad-except
      return 1
  return 1


_PLACEHOLDER = re.compile(r'\{([^{}:]*)(?::([^{}]*))?\}')


def expand_output_dir(output_dir: str, checkpoint_path: str,
                      now: Optional[datetime.datetime] = None) -> str:
  """Fills INFER_OUTPUT_DIR's placeholders at launch.

  `{date}` is the launch date in UTC (`2026-11-25`; `{date:%Y%m%d}` takes a
  strftime format), `{checkpoint_step}` the step the checkpoint path names
  (`checkpoint_1000000` -> 1000000). A scheduled rerun on the same day and
  checkpoint lands in the same directory, where it finds the finished run.
  """
  def fill(match: re.Match) -> str:
    name, spec = match.group(1), match.group(2)
    if name == 'date':
      moment = now or datetime.datetime.now(datetime.timezone.utc)
      return moment.strftime(spec or '%Y-%m-%d')
    if name == 'checkpoint_step' and not spec:
      from model import checkpoints  # pylint: disable=g-import-not-at-top
      step = checkpoints.checkpoint_step(checkpoint_path)
      if step is None:
        raise PlanError(
            f'INFER_OUTPUT_DIR {output_dir!r} uses {{checkpoint_step}} but '
            f'CHECKPOINT_PATH {checkpoint_path!r} names no step (expected '
            '.../checkpoint_<step>, an Orbax .../<step> directory or a '
            'TensorFlow model.ckpt-<step>); remove the placeholder')
      return str(step)
    raise PlanError(
        f'INFER_OUTPUT_DIR {output_dir!r} has an unknown placeholder '
        f'{match.group(0)!r}; the placeholders are {{date}}, '
        '{date:FORMAT} and {checkpoint_step}')
  return _PLACEHOLDER.sub(fill, output_dir)


def layout(config: InferConfig, task_name: str) -> TaskLayout:
  return TaskLayout(config.output_dir, task_name, config.mode,
                    config.num_output_shards)


def finished_chunks(task_layout: TaskLayout,
                    num_shards: int) -> Set[Tuple[int, int]]:
  """(input shard, chunk) of every complete chunk file already written."""
  done = set()
  for name in files.list_names(task_layout.chunk_dir):
    match = _CHUNK_RE.match(name)
    if match and int(match.group(2)) == num_shards:
      done.add((int(match.group(1)), int(match.group(3))))
  return done


def is_task_complete(task_layout: TaskLayout, fingerprint: str) -> bool:
  if not files.exists(task_layout.manifest_path):
    return False
  manifest = json.loads(files.read_text(task_layout.manifest_path))
  if manifest.get('fingerprint') != fingerprint:
    return False
  return all(files.exists(task_layout.marker_path(i))
             for i in range(task_layout.num_output_shards))


def claim_output_dir(config: InferConfig, task_names: List[str]) -> Dict:
  """Checks the output directory against this run and records the run.

  Returns the run record. Raises PlanError when the directory holds a
  different run (unless `config.overwrite`, which clears that run's files).
  """
  record = {'fingerprint': config.fingerprint(),
            'settings': config.fingerprint_fields(),
            'tasks': task_names}
  run_path = files.join(config.output_dir, RUN_FILE)
  if files.exists(run_path):
    existing = json.loads(files.read_text(run_path))
    if existing.get('fingerprint') != record['fingerprint']:
      if not config.overwrite:
        differences = _differences(existing.get('settings', {}),
                                   record['settings'])
        raise PlanError(
            f'INFER_OUTPUT_DIR {config.output_dir!r} holds a different run '
            f'({differences}); use a new output directory, or set '
            'infer.overwrite=True to replace it')
      logging.warning('Overwriting the run in %s (%s)', config.output_dir,
                      _differences(existing.get('settings', {}),
                                   record['settings']))
      _clear_run(config.output_dir, existing)
  files.makedirs(config.output_dir)
  files.write_atomically(run_path, json.dumps(record, indent=2,
                                              sort_keys=True).encode())
  return record


def _differences(old: Dict, new: Dict) -> str:
  keys = sorted(set(old) | set(new))
  changed = [f'{k}: {old.get(k)!r} -> {new.get(k)!r}' for k in keys
             if old.get(k) != new.get(k)]
  return '; '.join(changed) or 'unknown settings'


def _clear_run(output_dir: str, existing: Dict):
  mode = existing.get('settings', {}).get('mode', '')
  for task in existing.get('tasks', []):
    stem = f'{task}-{mode}'
    for name in files.list_names(output_dir):
      if name == f'tmp-{stem}' or name.startswith(f'{stem}.'):
        files.remove(files.join(output_dir, name))
