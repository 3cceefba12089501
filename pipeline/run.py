"""One inference run: plan on the launcher, then the Beam pipeline.

    result = run_inference(config, PipelineOptions(['--runner=FnApiRunner']))

`run_inference` takes an InferConfig, or the RunPlan the launcher made of
one (tasks resolved and fingerprint computed once, before any worker
starts).

Rerunning with the same config resumes: finished chunks are not inferred
again; a finished output returns at once without loading the model or
taking the output directory's lock. A run refuses to start while another
live run holds that lock (pipeline.lock).
"""

import dataclasses
import json
import logging
import time
from typing import Any, Callable, Dict, List, Optional, Union

import apache_beam as beam
from apache_beam.options.pipeline_options import PipelineOptions
from apache_beam.options.pipeline_options import StandardOptions
from apache_beam.options.pipeline_options import TestOptions

from model import files
from pipeline import evaluate, lock, plan
from pipeline.config import InferConfig
from pipeline.infer_and_write import InferAndWrite
from pipeline.inference import NAMESPACE


@dataclasses.dataclass
class RunResult:
  """What a run did. `status`: 'completed', 'already_complete', 'metrics'
  (the outputs were complete; only their metrics were computed, in
  `manifests`), 'submitted' (the job runs on without the launcher) or
  'dry_run' (built, not run)."""
  status: str
  tasks: List[str]
  counters: Dict[str, int] = dataclasses.field(default_factory=dict)
  manifests: Dict[str, dict] = dataclasses.field(default_factory=dict)
  wall_seconds: float = 0.0
  # task -> why it has no outputs (more bad input records than allowed).
  failures: Dict[str, str] = dataclasses.field(default_factory=dict)
  # The runner's result; for 'dry_run', Dataflow's (its `job` is the job
  # description) or, on other runners, the pipeline proto.
  beam_result: Any = None


def _is_dataflow(options: PipelineOptions) -> bool:
  runner = options.view_as(StandardOptions).runner or ''
  return 'dataflow' in str(runner).lower()


def _lock_ref(config: InferConfig, options: PipelineOptions, owner: str,
              generation: int) -> lock.LockRef:
  """The run's lock as the job sees it. A job on a remote runner, or one the
  launcher does not wait for, releases the lock in its own last step."""
  return lock.LockRef(
      config.output_dir, owner, generation, config.lock_expiry_seconds,
      release_at_end=_is_dataflow(options) or not config.wait_until_finish,
      startup_seconds=config.lock_startup_seconds)


def run_inference(run: Union[InferConfig, plan.RunPlan],
                  options: Optional[PipelineOptions] = None,
                  on_claimed: Optional[Callable[[InferConfig], None]] = None
                  ) -> RunResult:
  """Runs (or resumes, or confirms) the inference `run` describes.

  `on_claimed` runs once this run holds the output directory (the launcher
  writes config.gin there). With Beam's `--dry_run=True` nothing is written:
  the pipeline is built (and handed to Dataflow's runner, which stops before
  submitting) and returned in `beam_result`.
  """
  started_at = time.time()
  options = options or PipelineOptions()
  run_plan = run if isinstance(run, plan.RunPlan) else plan.make_run_plan(run)
  config = run_plan.config
  task_names = run_plan.task_names
  if options.view_as(TestOptions).dry_run:
    return _dry_run(run_plan, options, started_at)
  complete = plan.complete_manifests(run_plan)
  if (all(m is not None for m in complete.values()) and
      not _metrics_pending(complete)):
    logging.info('t5beam: every output in %s is already complete; nothing '
                 'to do', config.output_dir)
    return RunResult('already_complete', task_names,
                     wall_seconds=time.time() - started_at)
  # A job on a remote runner, or one the launcher does not wait for,
  # outlives its launcher (killed, interrupted, or returned): its workers
  # keep the lock alive and its last step releases it, and until its first
  # worker heartbeats the lock lasts lock_startup_seconds. A local waited-for
  # run lives and dies with the launcher's process.
  lock_ref = _lock_ref(config, options, lock.new_owner(), generation=0)
  job_holds_lock = lock_ref.release_at_end
  generation = lock.acquire(
      config.output_dir, lock_ref.owner, lock_ref.startup_expiry_seconds,
      description=f'{config.mixture_or_task_name} {config.model.mode}',
      bound_to_process=not job_holds_lock)
  lock_ref = dataclasses.replace(lock_ref, generation=generation)
  release = True
  try:
    plan.claim_output_dir(run_plan)
    if on_claimed is not None:
      on_claimed(config)
    # Read again now that this run holds the directory.
    complete = plan.complete_manifests(run_plan)
    evaluated = {name: evaluate.finish(config, name, manifest)
                 for name, manifest in _metrics_pending(complete).items()}
    pending = plan.pending_tasks(run_plan, complete)
    if not pending:
      return RunResult('metrics' if evaluated else 'already_complete',
                       task_names, manifests=evaluated,
                       wall_seconds=time.time() - started_at)
    pipeline = beam.Pipeline(options=options)
    _ = pipeline | 'T5Inference' >> InferAndWrite(run_plan, pending,
                                                  started_at, lock_ref)
    with lock.Heartbeat(lock_ref):
      beam_result = pipeline.run()
      if not config.wait_until_finish:
        release = False  # the job's last step releases the lock
        return RunResult('submitted', task_names,
                         wall_seconds=time.time() - started_at,
                         beam_result=beam_result)
      try:
        beam_result.wait_until_finish()
      except KeyboardInterrupt:
        release = not job_holds_lock  # a remote job runs on and holds it
        raise
  finally:
    if release:
      lock.release(config.output_dir, lock_ref.owner, generation)
  counters = {}
  for counter in beam_result.metrics().query()['counters']:
    if counter.key.metric.namespace == NAMESPACE:
      name = counter.key.metric.name
      counters[name] = counters.get(name, 0) + counter.committed
  manifests, failures = {}, {}
  for name in task_names:
    layout = run_plan.layout(name)
    if files.exists(layout.manifest_path):
      manifests[name] = files.read_json(layout.manifest_path)
    else:
      failures[name] = _bad_records_failure(config, layout)
  return RunResult('completed', task_names, counters, manifests,
                   time.time() - started_at, failures=failures,
                   beam_result=beam_result)


def _bad_records_failure(config: InferConfig, layout) -> str:
  """The line saying why a task was not merged: its bad input records."""
  from pipeline import file_tasks  # pylint: disable=g-import-not-at-top
  lines = list(files.read_lines(layout.errors_path()))
  entry = json.loads(lines[0])
  # The problem's details (a parser's message) are in the errors file.
  first = file_tasks.BadRecord(entry['file'], entry['number'],
                               entry['problem'].split(' (')[0])
  return (f'{layout.task}: {len(lines)} bad input record(s), over '
          f'infer.max_bad_records = {config.max_bad_records}; first: '
          f'{first.describe(config.file_task.file_type)}; all in '
          f'{layout.errors_path()}')


def _metrics_pending(complete: Dict[str, Optional[dict]]) -> Dict[str, dict]:
  """task -> manifest of each complete output (`complete`: as
  plan.complete_manifests gives them) whose metrics are still to compute
  (an earlier run's metric failed, or was stopped before them)."""
  return {name: manifest for name, manifest in complete.items()
          if manifest is not None and evaluate.metrics_pending(manifest)}


def _dry_run(run_plan: plan.RunPlan, options: PipelineOptions,
             started_at: float) -> RunResult:
  """Builds the whole pipeline from a read-only plan; writes nothing."""
  pipeline = beam.Pipeline(options=options)
  _ = pipeline | 'T5Inference' >> InferAndWrite(
      run_plan, plan.pending_tasks(run_plan), started_at,
      _lock_ref(run_plan.config, options, 'dry-run', 0))
  # Dataflow's runner honours --dry_run (it stops before staging and
  # submitting); for the others, translating the graph is the check.
  beam_result = (pipeline.run() if _is_dataflow(options) else
                 pipeline.to_runner_api())
  return RunResult('dry_run', run_plan.task_names,
                   wall_seconds=time.time() - started_at,
                   beam_result=beam_result)
