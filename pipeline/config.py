"""The plain configuration object the pipeline takes (the launcher builds it
from Gin), and the run fingerprint derived from it."""

import dataclasses
import hashlib
import json
from typing import Any, Dict, Mapping, Optional, Tuple

from model.config import T5Config
from model.decoding import DecodingConfig

MODES = ('predict', 'score', 'predict_with_aux')


@dataclasses.dataclass(frozen=True)
class InferConfig:
  """Everything one inference run needs; validated on construction.

  A chunk is `checkpoint_period` batches of `batch_size` examples of one
  input shard: the unit of work, retry and resume.
  """
  mixture_or_task_name: str
  task_feature_lengths: Mapping[str, int]
  checkpoint_path: str
  output_dir: str
  mixture_or_task_module: Optional[str] = None
  split: str = 'test'
  mode: str = 'predict'
  batch_size: int = 32
  checkpoint_period: int = 100
  # None: one per source file when the task reads files, else 1.
  num_input_shards: Optional[int] = None
  num_output_shards: int = 1
  # The architecture; None takes it from the checkpoint (Hugging Face
  # config.json, or our Orbax checkpoint's t5_config.json).
  model_config: Optional[T5Config] = None
  restore_dtype: str = 'float32'
  # None: the same as restore_dtype.
  activation_dtype: Optional[str] = None
  output_ids: bool = False
  # The record's `inputs`: by default the task's *_pretokenized features;
  # include_all_inputs puts every task feature there (token ids as lists);
  # input_fields_to_include names fields (with their _pretokenized forms).
  # Score mode: also write each target token's log-likelihood as aux.
  return_intermediates: bool = False
  include_all_inputs: bool = False
  input_fields_to_include: Optional[Tuple[str, ...]] = None
  # How to decode (greedy by default); recorded in the fingerprint.
  decoding: DecodingConfig = DecodingConfig()
  # Seed of the sampling keys; each chunk folds in its own identity.
  seed: int = 0
  # Replace whatever a different run left in output_dir.
  overwrite: bool = False
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

  def __post_init__(self):
    if self.mode not in MODES:
      raise ValueError(f'infer.mode {self.mode!r} is not one of {MODES}')
    for name in ('batch_size', 'checkpoint_period', 'num_output_shards'):
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
    for feature in ('inputs', 'targets'):
      if feature not in self.task_feature_lengths:
        raise ValueError(
            f'TASK_FEATURE_LENGTHS {dict(self.task_feature_lengths)} lacks '
            f'{feature!r}; an encoder-decoder model needs both inputs and '
            'targets lengths')

  @property
  def chunk_size(self) -> int:
    """Examples per chunk."""
    return self.batch_size * self.checkpoint_period

  def fingerprint_fields(self) -> Dict[str, Any]:
    """The settings that decide what the outputs contain.

    A run whose fields differ must not reuse another run's chunk files.
    """
    return {
        'checkpoint_path': self.checkpoint_path,
        'mixture_or_task_name': self.mixture_or_task_name,
        'split': self.split,
        'task_feature_lengths': dict(sorted(self.task_feature_lengths.items())),
        'mode': self.mode,
        'decoding': dataclasses.asdict(self.decoding),
        'seed': self.seed,
        'batch_size': self.batch_size,
        'checkpoint_period': self.checkpoint_period,
        'num_input_shards': self.num_input_shards,
        'num_output_shards': self.num_output_shards,
        'model_config': (self.model_config.to_dict()
                         if self.model_config else None),
        'restore_dtype': self.restore_dtype,
        'activation_dtype': self.activation_dtype or self.restore_dtype,
        'output_ids': self.output_ids,
        'include_all_inputs': self.include_all_inputs,
        'return_intermediates': self.return_intermediates,
        'input_fields_to_include': (list(self.input_fields_to_include)
                                    if self.input_fields_to_include is not None
                                    else None),
        'input_files': (list(self.file_task.file_patterns)
                        if self.file_task else None),
    }

  def fingerprint(self) -> str:
    encoded = json.dumps(self.fingerprint_fields(), sort_keys=True,
                         default=str).encode()
    return hashlib.sha256(encoded).hexdigest()[:16]


@dataclasses.dataclass(frozen=True)
class ChunkId:
  """Where a chunk's examples come from: (task, input shard, chunk number)."""
  task: str
  shard: int
  num_shards: int
  chunk: int

  def key(self) -> Tuple[str, int, int]:
    return (self.task, self.shard, self.chunk)
