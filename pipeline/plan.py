"""Planning on the launcher, once per launch: which tasks, how many input
shards each, the run's fingerprint, and what an earlier run already finished
in the output directory. The result is one `RunPlan` that the pipeline
takes; file names come from `pipeline.layout`.
"""

import dataclasses
import datetime
import difflib
import hashlib
import importlib
import json
import logging
import re
from typing import Any, Dict, List, Optional, Sequence, Tuple

import seqio

from model import files
from pipeline import layout as layout_lib
from pipeline.config import FINGERPRINT_VERSION, InferConfig
from pipeline.layout import TaskLayout


class PlanError(ValueError):
  """A configuration or output directory the run cannot proceed with."""


@dataclasses.dataclass(frozen=True)
class TaskPlan:
  """One task of the run: its input shards, and the (input shard, chunk)
  pairs whose chunk files an earlier run already wrote."""
  name: str
  num_shards: int
  finished: frozenset = frozenset()


@dataclasses.dataclass(frozen=True)
class RunPlan:
  """The validated run: the config, every task (resolved once), and the
  fingerprint (computed once) that the output directory, the manifests and
  the workers' model cache all carry."""
  config: InferConfig
  tasks: Tuple[TaskPlan, ...]
  fingerprint: str
  settings: Dict[str, Any]
  # {task: {input file: 'size:version'}}; its digest is settings['inputs'].
  inputs: Dict[str, Dict[str, str]] = dataclasses.field(
      default_factory=dict)

  @property
  def task_names(self) -> List[str]:
    return [t.name for t in self.tasks]

  def layout(self, task_name: str) -> TaskLayout:
    return self.config.layout(task_name)


def fingerprint(settings: Dict[str, Any]) -> str:
  encoded = json.dumps(settings, sort_keys=True, default=str).encode()
  return hashlib.sha256(encoded).hexdigest()[:16]


def make_run_plan(config: InferConfig,
                  tasks: Optional[Sequence[seqio.Task]] = None) -> RunPlan:
  """The plan of `config`; `tasks` are its resolved tasks when the caller
  has them already (the launcher resolves them once, to check them)."""
  if tasks is None:
    tasks = resolve_tasks(config)
  settings = config.fingerprint_fields()
  source_files = {t.name: _source_files(t, config) for t in tasks}
  # What tells a resumed run that its input was replaced: each input file's
  # size and version, for the tasks read from files (seqio.FileDataSource,
  # plain input files). Other sources (TFDS, functions) say nothing.
  inputs = {name: files.versions(paths)
            for name, paths in source_files.items() if paths is not None}
  settings['inputs'] = fingerprint(inputs)
  return RunPlan(config,
                 tuple(TaskPlan(t.name, num_input_shards(
                     t, config, source_files[t.name])) for t in tasks),
                 fingerprint(settings), settings, inputs)


def _source_files(task: seqio.Task, config: InferConfig
                  ) -> Optional[List[str]]:
  """The input files of a task read from files (None for other sources,
  and for a split the source cannot list: its reader reports that)."""
  if not isinstance(task.source, seqio.FileDataSource):
    return None
  try:
    return list(task.source.list_shards(config.split))
  except Exception:  # pylint: disable=broad-except
    return None


def pending_tasks(run_plan: RunPlan,
                  complete: Optional[Dict[str, Optional[Dict]]] = None
                  ) -> List[TaskPlan]:
  """The tasks still to finish, each with its finished chunks (one listing
  of its chunk directory). `complete`: `complete_manifests(run_plan)`, when
  the caller has it."""
  if complete is None:
    complete = complete_manifests(run_plan)
  pending = []
  for task in run_plan.tasks:
    task_layout = run_plan.layout(task.name)
    if complete[task.name] is not None:
      logging.info('t5beam: %s is already complete in %s', task.name,
                   run_plan.config.output_dir)
      continue
    finished = frozenset(task_layout.finished_chunks(task.num_shards))
    if finished:
      logging.info('t5beam: %s: resuming, %d chunk(s) already finished',
                   task.name, len(finished))
    pending.append(dataclasses.replace(task, finished=finished))
  return pending


def import_task_module(module: Optional[str],
                       named: str = 'MIXTURE_OR_TASK_MODULE'):
  """Imports a module that registers the user's tasks (`named`: where the
  config names it, for the error)."""
  if not module:
    return
  try:
    importlib.import_module(module)
  except Exception as e:  # pylint: disable=broad-except
    raise PlanError(
        f'{named} {module!r} failed to import: '
        f'{type(e).__name__}: {e}; check that the module is on PYTHONPATH and '
        'imports on its own') from e


def prepare_tasks(config: InferConfig):
  """Registers what the config's tasks need, on the launcher and workers."""
  for module in config.task_modules:
    import_task_module(module, 'the Gin import')
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
  close = difflib.get_close_matches(name, known, n=1, cutoff=0.5)
  hint = f'; did you mean {close[0]!r}?' if close else ''
  where = (f' after importing {config.mixture_or_task_module!r}'
           if config.mixture_or_task_module else
           ' (set MIXTURE_OR_TASK_MODULE to the module that registers it)')
  raise PlanError(f'MIXTURE_OR_TASK_NAME {name!r} is not a registered SeqIO '
                  f'task or mixture{where}{hint}')


def num_input_shards(task: seqio.Task, config: InferConfig,
                     source_files: Optional[List[str]] = None) -> int:
  """The configured count, else one per source file, else 1.

  Each input shard is read by one worker. A file source splits by files, so
  it cannot have more shards than files (refused here, before any worker
  starts); other sources (TFDS, functions) split with `Dataset.shard`, so
  every reader reads every example and keeps its share (a warning).
  `source_files`: the task's files when the caller has listed them."""
  if source_files is None:
    source_files = _source_files(task, config)
  found = None if source_files is None else len(source_files)
  if config.num_input_shards is None:
    return max(1, found or 1)
  if found is not None and config.num_input_shards > found:
    raise PlanError(
        f'infer.num_input_shards = {config.num_input_shards} but task '
        f'{task.name!r} has {found} input file(s), and its shards are '
        'files; set infer.num_input_shards to at most that, or split the '
        'input into more files')
  if found is None and config.num_input_shards > 1:
    logging.warning(
        't5beam: task %s is not read from files, so each of its %d input '
        'shards scans every example and keeps 1 in %d; for read '
        'parallelism at scale, give the task file-based input (a '
        'FileDataSource) with at least as many files as shards',
        task.name, config.num_input_shards, config.num_input_shards)
  return config.num_input_shards


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
            f'CHECKPOINT_PATH {checkpoint_path!r} names no step '
            '(checkpoint_<step>, <step>, model.ckpt-<step>); remove the '
            'placeholder')
      return str(step)
    raise PlanError(
        f'INFER_OUTPUT_DIR {output_dir!r} has an unknown placeholder '
        f'{match.group(0)!r}; the placeholders are {{date}}, '
        '{date:FORMAT} and {checkpoint_step}')
  return _PLACEHOLDER.sub(fill, output_dir)


def is_task_complete(task_layout: TaskLayout, fingerprint: str) -> bool:
  return complete_manifest(task_layout, fingerprint) is not None


def complete_manifest(task_layout: TaskLayout,
                      fingerprint: str) -> Optional[Dict]:
  """The task's manifest when its output is complete for this fingerprint
  (every file the manifest lists has its marker), else None."""
  try:  # one read, no existence check first
    manifest = files.read_json(task_layout.manifest_path)
  except FileNotFoundError:
    return None
  if manifest.get('fingerprint') != fingerprint:
    return None
  # The number of output files is the manifest's ('auto' chose it there).
  names = [output['name'] for output in manifest.get('files', [])]
  if not names or (task_layout.num_output_shards is not None and
                   len(names) != task_layout.num_output_shards):
    return None
  present = set(files.list_names(task_layout.output_dir))
  if all(name + layout_lib.MARKER_SUFFIX in present for name in names):
    return manifest
  return None


def complete_manifests(run_plan: RunPlan) -> Dict[str, Optional[Dict]]:
  """task -> `complete_manifest` of each of the run's tasks. A mixture's
  tasks on a remote output directory are checked concurrently: each is a
  few round trips."""
  names = run_plan.task_names
  return dict(zip(names, files.map_concurrently(
      lambda name: complete_manifest(run_plan.layout(name),
                                     run_plan.fingerprint),
      names, files.is_remote(run_plan.config.output_dir))))


def claim_output_dir(run_plan: RunPlan) -> Dict:
  """Checks the output directory against this run and records the run.

  Returns the run record. Raises PlanError when the directory holds a
  different run, or one written by another version of t5beam's outputs
  (unless `overwrite`, which clears that run's files).
  """
  config = run_plan.config
  record = {'fingerprint': run_plan.fingerprint,
            'settings': run_plan.settings,
            'tasks': run_plan.task_names,
            'inputs': run_plan.inputs}
  run_path = layout_lib.run_file(config.output_dir)
  if files.exists(run_path):
    existing = files.read_json(run_path)
    if existing.get('fingerprint') != record['fingerprint']:
      old_settings = existing.get('settings', {})
      version = old_settings.get('fingerprint_version', 1)
      if version != FINGERPRINT_VERSION:
        what = (f'output written by another t5beam version (fingerprint '
                f'version {version}; this t5beam writes version '
                f'{FINGERPRINT_VERSION}, whose outputs differ for the same '
                'settings)')
      else:
        what = (f'a different run '
                f'({_differences(old_settings, record["settings"])})')
        same_settings = ({k: v for k, v in old_settings.items()
                          if k != 'inputs'} ==
                         {k: v for k, v in record['settings'].items()
                          if k != 'inputs'})
        changes = _changed_files(existing.get('inputs', {}),
                                 run_plan.inputs) if same_settings else []
        if changes and _only_fixed_files_changed(run_plan, changes):
          what = None  # the fixed files' shards are read and inferred again
        elif changes and not config.overwrite:
          task, path, _, how = changes[0]
          raise PlanError(
              f'INFER_OUTPUT_DIR {config.output_dir!r} holds a run over '
              f'other input: {path} (task {task}) {how}; restore that input, '
              'use a new directory, or set infer.overwrite=True')
      if what is not None:
        if not config.overwrite:
          raise PlanError(
              f'INFER_OUTPUT_DIR {config.output_dir!r} holds {what}; use a '
              'new output directory, or set infer.overwrite=True to replace '
              'it')
        logging.warning('Overwriting the run in %s: it holds %s',
                        config.output_dir, what)
        _clear_run(config, existing)
  files.makedirs(config.output_dir)
  files.write_json(run_path, record)
  return record


def _only_fixed_files_changed(run_plan: RunPlan,
                              changes: List[Tuple[str, str, str, str]]
                              ) -> bool:
  """Whether every changed input file (`changes`, from _changed_files) had
  bad records in the run in the directory (the user fixed them): then that
  run resumes, and the input shards holding those files lose their finished
  chunks, to be read and inferred again. Files gone or new are not fixes."""
  fixed = []  # (task layout, shard, number of shards)
  for task, path, kind, _ in changes:
    task_layout = run_plan.layout(task)
    shards = task_layout.shards_with_bad_records_of(path)
    if kind != 'changed' or not shards:
      return False
    fixed += [(task_layout, shard, count) for shard, count in shards]
  for task_layout, shard, count in fixed:
    task_layout.remove_shard_chunks(shard, count)
    logging.info('t5beam: %s: an input file with bad records changed; its '
                 'input shard %d of %d is read again', task_layout.task,
                 shard, count)
  return True


def _changed_files(old: Dict[str, Dict[str, str]],
                   new: Dict[str, Dict[str, str]]
                   ) -> List[Tuple[str, str, str, str]]:
  """(task, path, 'gone' | 'new' | 'changed', how) of every input file that
  differs, in order."""
  changes = []
  for task in sorted(set(old) | set(new)):
    before, after = old.get(task, {}), new.get(task, {})
    for path in sorted(set(before) | set(after)):
      if path not in after:
        changes.append((task, path, 'gone', 'is gone'))
      elif path not in before:
        changes.append((task, path, 'new', 'is new'))
      elif before[path] != after[path]:
        old_size, old_version = before[path].split(':', 1)
        new_size, new_version = after[path].split(':', 1)
        what = (f'size {old_size} -> {new_size}' if old_size != new_size
                else f'version {old_version} -> {new_version}')
        changes.append((task, path, 'changed', f'changed ({what})'))
  return changes


def _differences(old: Dict, new: Dict) -> str:
  keys = sorted(set(old) | set(new))
  changed = [f'{k}: {old.get(k)!r} -> {new.get(k)!r}' for k in keys
             if old.get(k) != new.get(k)]
  return '; '.join(changed) or 'unknown settings'


def _clear_run(config: InferConfig, existing: Dict):
  """Removes the files of the run `existing` (its run record) describes."""
  mode = existing.get('settings', {}).get('mode', '')
  tasks = existing.get('tasks', [])
  for name in files.list_names(config.output_dir):
    if any(layout_lib.owned_by_task(name, task, mode) for task in tasks):
      files.remove(files.join(config.output_dir, name))
