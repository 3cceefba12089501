"""The whole run as one Beam transform, from the launcher's plan to the
final files:

    ListInputShards -> ReadShards (pipeline.read: chunks, a few to an element;
    starts loading the model) ->
    SpreadChunks ->
    InferChunks (pipeline.infer_chunks, writes chunk files) ->
    [with the shard counts] PlanMerge -> MergeOutputShards -> WriteManifest
    (pipeline.merge) -> Evaluate (pipeline.evaluate: the tasks' metrics)
    [-> ReleaseLock]

Each step's name is what the Dataflow UI shows. Every file is written
atomically and every step is idempotent, so Beam's retries and reruns of the
whole job never duplicate or lose a record.
"""

import logging
import time
from typing import Optional, Sequence

import apache_beam as beam

from pipeline import evaluate, lock, merge, plan
from pipeline.infer_chunks import InferChunk, ModelLoader
from pipeline.read import SHARD_COUNTS, ReadShard


class InferAndWrite(beam.PTransform):
  """The pipeline of one run: the plan's pending tasks to final files."""

  def __init__(self, run_plan: plan.RunPlan,
               pending: Sequence[plan.TaskPlan],
               started_at: Optional[float] = None,
               lock_ref: Optional[lock.LockRef] = None):
    super().__init__()
    self._run_plan = run_plan
    self._pending = list(pending)
    self._started_at = started_at or time.time()
    self._lock_ref = lock_ref

  def expand(self, pbegin):
    config = self._run_plan.config
    shards = [(p.name, shard, p.num_shards) for p in self._pending
              for shard in range(p.num_shards)]
    # Readers start loading the model the inference step will use.
    loader = ModelLoader(config, self._run_plan.fingerprint)
    infer = InferChunk(config, self._run_plan.fingerprint,
                       {p.name: p.num_shards for p in self._pending},
                       self._lock_ref, loader)
    read = (pbegin
            | 'ListInputShards' >> beam.Create(shards)
            | 'SpreadShards' >> beam.Reshuffle()
            | 'ReadShards' >> beam.ParDo(
                ReadShard(config, self._pending, loader))
            .with_outputs(SHARD_COUNTS, main='chunks'))
    stats = (read.chunks
             | 'SpreadChunks' >> beam.Reshuffle()
             | 'InferChunks' >> beam.ParDo(infer))
    planned = ({'counts': read[SHARD_COUNTS], 'stats': stats}
               | 'WaitForAllChunks' >> beam.CoGroupByKey()
               | 'PlanMerge' >> beam.ParDo(merge.PlanMerge(config))
               .with_outputs('summary', main='jobs'))
    outputs = (planned.jobs
               | 'SpreadMerges' >> beam.Reshuffle()
               | 'MergeOutputShards' >> beam.ParDo(
                   merge.MergeOutputShard(config)))
    manifests = ({'summary': planned.summary, 'outputs': outputs}
                 | 'WaitForAllOutputShards' >> beam.CoGroupByKey()
                 | 'WriteManifest' >> beam.ParDo(merge.WriteManifest(
                     config, self._run_plan.fingerprint,
                     self._run_plan.settings, self._started_at))
                 | 'Evaluate' >> beam.ParDo(evaluate.EvaluateTask(config)))
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
