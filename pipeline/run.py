"""One inference run: plan on the launcher, then the Beam pipeline.

    result = run_inference(config, PipelineOptions(['--runner=FnApiRunner']))

Rerunning with the same config resumes: finished chunks are not inferred
again; a finished output returns at once without loading the model.
"""

import dataclasses
import json
import logging
import time
from typing import Dict, List, Optional

import apache_beam as beam
from apache_beam.options.pipeline_options import PipelineOptions

from pipeline import files, plan, transforms
from pipeline.config import InferConfig


@dataclasses.dataclass
class RunResult:
  """What a run did. `status`: 'completed' or 'already_complete'."""
  status: str
  tasks: List[str]
  counters: Dict[str, int] = dataclasses.field(default_factory=dict)
  manifests: Dict[str, dict] = dataclasses.field(default_factory=dict)
  wall_seconds: float = 0.0


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


def run_inference(config: InferConfig,
                  options: Optional[PipelineOptions] = None) -> RunResult:
  """Runs (or resumes, or confirms) the inference `config` describes."""
  started_at = time.time()
  task_names = [t.name for t in plan.resolve_tasks(config)]
  plan.claim_output_dir(config, task_names)
  task_plans = plan_tasks(config)
  if not task_plans:
    logging.info('t5beam: every output in %s is already complete; nothing '
                 'to do', config.output_dir)
    return RunResult('already_complete', task_names,
                     wall_seconds=time.time() - started_at)
  pipeline = beam.Pipeline(options=options or PipelineOptions())
  _ = pipeline | 'T5Inference' >> transforms.InferAndWrite(
      config, task_plans, started_at)
  beam_result = pipeline.run()
  beam_result.wait_until_finish()
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
                   time.time() - started_at)
