"""The plain configuration object the pipeline takes (the launcher builds it
from Gin), and the settings its run fingerprint is made of."""

import dataclasses
from typing import Any, Dict, Mapping, Optional, Tuple, Union

from pipeline.inference import ModelSpec
from pipeline.layout import TaskLayout

# Raised whenever a change alters the outputs of the same settings, so that
# an output directory written by an older t5beam is recognised and refused
# instead of silently mixed. 1: sampling keys per batch; 2: one key per
# example, from (seed, task, input shard, index in shard); 3: the input's
# identity (its files' names, sizes and versions) is part of the fingerprint,
# and a shard of several plain input files reads them one after another;
# 4: products accumulate in float32 with bfloat16 activations (their
# outputs were bfloat16 sums before), and bad input records are skipped;
# 5: continuous or length-aware batching by default (a chunk's examples run
# in other batch shapes: near-ties may differ); 6: with bfloat16
# activations the feed-forward activation is computed in float32 from the
# products' float32 sums and rounded once (it was rounded at every step).
FINGERPRINT_VERSION = 6

# num_output_shards='auto' aims at output files of this size.
AUTO_OUTPUT_SHARD_BYTES = 1 << 30


@dataclasses.dataclass(frozen=True)
class InferConfig:
  """Everything one inference run needs; validated on construction.

  `model` says what to run (checkpoint, feature lengths, batch size, mode,
  decoding: the same spec T5ModelHandler takes). A chunk is
  `checkpoint_period` batches of one input shard: the unit of work, retry
  and resume.
  """
  mixture_or_task_name: str
  output_dir: str
  model: ModelSpec
  mixture_or_task_module: Optional[str] = None
  # More modules that register tasks, imported before resolving them (on
  # the launcher and on workers): those the Gin files import.
  task_modules: Tuple[str, ...] = ()
  split: str = 'test'
  checkpoint_period: int = 100
  # None: one per source file when the task reads files, else 1.
  num_input_shards: Optional[int] = None
  # Output files per task, or 'auto': as many as make files of about
  # output_shard_bytes, chosen at merge time from the chunk files' sizes (the
  # manifest records the number).
  num_output_shards: Union[int, str] = 1
  output_shard_bytes: int = AUTO_OUTPUT_SHARD_BYTES
  # The record's `inputs`: by default the task's *_pretokenized features;
  # include_all_inputs puts every task feature there (token ids as lists);
  # input_fields_to_include names fields (with their _pretokenized forms).
  include_all_inputs: bool = False
  input_fields_to_include: Optional[Tuple[str, ...]] = None
  # Replace whatever a different run left in output_dir.
  overwrite: bool = False
  # Bad records of input files (infer.file_task) are skipped and listed in
  # `{task}-{mode}.errors.jsonl`; a task with more than this many is not
  # merged and the run fails (-1: no limit). Not in the fingerprint: the
  # outputs never hold bad records, whatever the limit.
  max_bad_records: int = 0
  # Where the tasks' metrics also go as TensorBoard scalars (a folder per
  # task, at the checkpoint's step); None: only the metrics files.
  metrics_tensorboard_dir: Optional[str] = None
  # Plain input files instead of a registered task (pipeline.file_tasks);
  # mixture_or_task_name is then the task registered from it.
  file_task: Optional[Any] = None
  # A live run holds the output directory's lock (pipeline.lock); a lock
  # whose heartbeat is older than this is a dead run's, and is taken over.
  lock_expiry_seconds: float = 900.0
  # A job that outlives its launcher (Dataflow, or not waited for) keeps its
  # lock this long after submission before any worker has heartbeated:
  # starting VMs, pulling the image and loading the model can take longer
  # than lock_expiry_seconds, and the directory must not look free then.
  lock_startup_seconds: float = 3600.0
  # False: submit the job and return (a Flex Template launch); the job then
  # keeps the lock alive from its workers and releases it at its end.
  wait_until_finish: bool = True
  # Run even when the launcher's memory estimate says the model will not
  # fit the workers' accelerators (it is an estimate).
  skip_memory_check: bool = False

  def __post_init__(self):
    if self.num_output_shards != 'auto' and (
        not isinstance(self.num_output_shards, int) or
        self.num_output_shards < 1):
      raise ValueError(f"infer.num_output_shards must be a positive integer "
                       f"or 'auto', got {self.num_output_shards!r}")
    for name in ('checkpoint_period', 'output_shard_bytes'):
      if getattr(self, name) < 1:
        raise ValueError(f'{name} must be at least 1, got '
                         f'{getattr(self, name)}')
    if self.num_input_shards is not None and self.num_input_shards < 1:
      raise ValueError('num_input_shards must be at least 1, got '
                       f'{self.num_input_shards}')
    for name in ('lock_expiry_seconds', 'lock_startup_seconds'):
      if getattr(self, name) <= 0:
        raise ValueError(f'infer.{name} must be positive, got '
                         f'{getattr(self, name)}')
    if self.include_all_inputs and self.input_fields_to_include is not None:
      raise ValueError('infer.include_all_inputs and '
                       'infer.input_fields_to_include cannot both be set; '
                       'choose one')

  @property
  def task_feature_lengths(self) -> Mapping[str, int]:
    return self.model.task_feature_lengths

  @property
  def chunk_size(self) -> int:
    """Examples per chunk."""
    return self.model.batch_size * self.checkpoint_period

  def layout(self, task_name: str) -> TaskLayout:
    """Where `task_name`'s files go (see pipeline.layout)."""
    return TaskLayout(self.output_dir, task_name, self.model.mode,
                      (None if self.num_output_shards == 'auto' else
                       self.num_output_shards), self.chunk_size)

  def fingerprint_fields(self) -> Dict[str, Any]:
    """The settings that decide what the outputs contain, with the
    fingerprint's version. A run whose fields differ must not reuse another
    run's chunk files."""
    return {
        'fingerprint_version': FINGERPRINT_VERSION,
        **self.model.fingerprint_fields(),
        'mixture_or_task_name': self.mixture_or_task_name,
        'split': self.split,
        'checkpoint_period': self.checkpoint_period,
        'num_input_shards': self.num_input_shards,
        'num_output_shards': self.num_output_shards,
        'output_shard_bytes': (self.output_shard_bytes
                               if self.num_output_shards == 'auto' else None),
        'include_all_inputs': self.include_all_inputs,
        'input_fields_to_include': (list(self.input_fields_to_include)
                                    if self.input_fields_to_include is not None
                                    else None),
        'input_files': (list(self.file_task.file_patterns)
                        if self.file_task else None),
    }
