"""One inference run: plan on the launcher, then the Beam pipeline.

    result = run_inference(config, PipelineOptions(['--runner=FnApiRunner']))

Rerunning with the same config resumes: finished chunks are not inferred
again; a finished output returns at once without loading the model or
taking the output directory's lock. A run refuses to start while another
live run holds that lock (pipeline.lock).
"""

import dataclasses
import json
import logging
import time
from typing import Any, Callable, Dict, List, Optional

import apache_beam as beam
from apache_beam.options.pipeline_options import PipelineOptions
from apache_beam.options.pipeline_options import StandardOptions
from apache_beam.options.pipeline_options import TestOptions

from model import files
from pipeline import lock, plan, transforms
from pipeline.config import InferConfig


@dataclasses.dataclass
class RunResult:
  """What a run did. `status`: 'completed', 'already_complete', 'submitted'
  (the job runs on without the launcher) or 'dry_run' (built, not run)."""
  status: str
  tasks: List[str]
  counters: Dict[str, int] = dataclasses.field(default_factory=dict)
  manifests: Dict[str, dict] = dataclasses.field(default_factory=dict)
  wall_seconds: float = 0.0
  # The runner's result; for 'dry_run', Dataflow's (its `job` is the job
  # description) or, on other runners, the pipeline proto.
  beam_result: Any = None


def plan_tasks(config: InferConfig) -> List[transforms.TaskPlan]:
  """The tasks still to finish, with their input shards and finished chunks."""
  task_plans = []
  fingerprint = config.fingerprint()
  for task in plan.resolve_tasks(config):
    task_layout = plan.layout(config, task.name)
    if plan.is_task_complete(task_layout, fingerprint):
      logging.info('t5beam: %s is already complete in %s', task.name,
                   config.output_dir)
      continue
    num_shards = plan.num_input_shards(task, config)
    finished = frozenset(plan.finished_chunks(task_layout, num_shards))
    if finished:
      logging.info('t5beam: %s: resuming, %d chunk(s) already finished',
                   task.name, len(finished))
    task_plans.append(transforms.TaskPlan(task.name, num_shards, finished))
  return task_plans


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


def run_inference(config: InferConfig,
                  options: Optional[PipelineOptions] = None,
                  on_claimed: Optional[Callable[[InferConfig], None]] = None
                  ) -> RunResult:
  """Runs (or resumes, or confirms) the inference `config` describes.

  `on_claimed` runs once this run holds the output directory (the launcher
  writes config.gin there). With Beam's `--dry_run=True` nothing is written:
  the pipeline is built (and handed to Dataflow's runner, which stops before
  submitting) and returned in `beam_result`.
  """
  started_at = time.time()
  options = options or PipelineOptions()
  task_names = [t.name for t in plan.resolve_tasks(config)]
  if options.view_as(TestOptions).dry_run:
    return _dry_run(config, options, task_names, started_at)
  fingerprint = config.fingerprint()
  if all(plan.is_task_complete(plan.layout(config, name), fingerprint)
         for name in task_names):
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
      description=f'{config.mixture_or_task_name} {config.mode}',
      bound_to_process=not job_holds_lock)
  lock_ref = dataclasses.replace(lock_ref, generation=generation)
  release = True
  try:
    plan.claim_output_dir(config, task_names)
    if on_claimed is not None:
      on_claimed(config)
    task_plans = plan_tasks(config)
    if not task_plans:
      return RunResult('already_complete', task_names,
                       wall_seconds=time.time() - started_at)
    pipeline = beam.Pipeline(options=options)
    _ = pipeline | 'T5Inference' >> transforms.InferAndWrite(
        config, task_plans, started_at, lock_ref)
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
    if counter.key.metric.namespace == transforms.NAMESPACE:
      name = counter.key.metric.name
      counters[name] = counters.get(name, 0) + counter.committed
  manifests = {}
  for name in task_names:
    manifest_path = plan.layout(config, name).manifest_path
    manifests[name] = json.loads(files.read_text(manifest_path))
  return RunResult('completed', task_names, counters, manifests,
                   time.time() - started_at, beam_result)


def _dry_run(config: InferConfig, options: PipelineOptions,
             task_names: List[str], started_at: float) -> RunResult:
  """Builds the whole pipeline from a read-only plan; writes nothing."""
  task_plans = plan_tasks(config)
  pipeline = beam.Pipeline(options=options)
  _ = pipeline | 'T5Inference' >> transforms.InferAndWrite(
      config, task_plans, started_at,
      _lock_ref(config, options, 'dry-run', 0))
  # Dataflow's runner honours --dry_run (it stops before staging and
  # submitting); for the others, translating the graph is the check.
  beam_result = (pipeline.run() if _is_dataflow(options) else
                 pipeline.to_runner_api())
  return RunResult('dry_run', task_names,
                   wall_seconds=time.time() - started_at,
                   beam_result=beam_result)
