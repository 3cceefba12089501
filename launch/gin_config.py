"""The Gin surface users know from T5X, turned into one `InferConfig`.

Configurable names follow T5X where T5X has one: `infer.mode`,
`infer.checkpoint_period`, `DatasetConfig.split`, `DatasetConfig.batch_size`,
`RestoreCheckpointConfig.dtype`, and the macros MIXTURE_OR_TASK_NAME,
MIXTURE_OR_TASK_MODULE, TASK_FEATURE_LENGTHS, CHECKPOINT_PATH,
INFER_OUTPUT_DIR, MODEL and VOCABULARY. Objects T5X also has are registered
under T5X's module names (`t5x.utils.DatasetConfig`, `t5x.partitioning.
PjitPartitioner`, `t5x.decoding.beam_search`), so our short selectors and
T5X's (`utils.DatasetConfig`) both find them; launch.t5x_names serves the
rest of T5X's names from the same objects.
"""

import dataclasses
import os
from typing import Any, Callable, Dict, Mapping, Optional, Sequence, Union

import gin
import seqio

from model import checkpoints
from model import config as model_config_lib
from model import partitioning as partitioning_lib
from model.partitioning import Partitioning
from model.config import T5Config
from model.decoding import DecodingConfig
from pipeline import plan
from pipeline.config import AUTO_OUTPUT_SHARD_BYTES, InferConfig
from pipeline.inference import ModelSpec
from pipeline.file_tasks import FileTaskSpec

CONFIG_DIR = os.path.join(os.path.dirname(os.path.abspath(__file__)),
                          'configs')
REQUIRED_MACROS = ('MIXTURE_OR_TASK_NAME', 'TASK_FEATURE_LENGTHS',
                   'CHECKPOINT_PATH', 'INFER_OUTPUT_DIR')
# Required when the Gin file that defines them is included (DROPOUT_RATE:
# by T5X's model files).
OPTIONAL_REQUIRED = ('INFER_FILE_PATTERNS', 'DROPOUT_RATE')

for _vocabulary in (seqio.SentencePieceVocabulary, seqio.ByteVocabulary,
                    seqio.PassThroughVocabulary):
  gin.external_configurable(_vocabulary, module='seqio')


@dataclasses.dataclass(frozen=True)
class GinModel:
  """What a model Gin file gives: the architecture and the vocabularies.

  A model in T5X's form (launch.t5x_names) also carries what T5X configures
  on the model rather than on `infer`: the decoding (`decoding`, the
  DecodingConfig's fields), `return_intermediates` and the network's
  activation dtype. None leaves them to `infer`'s settings.
  """
  config: Optional[T5Config]
  vocabulary: Optional[seqio.Vocabulary]
  # The targets' vocabulary when it differs from the inputs'.
  output_vocabulary: Optional[seqio.Vocabulary] = None
  decoding: Optional[Mapping[str, Any]] = None
  return_intermediates: Optional[bool] = None
  activation_dtype: Optional[str] = None

  @property
  def targets_vocabulary(self) -> Optional[seqio.Vocabulary]:
    return self.output_vocabulary or self.vocabulary


def as_gin_model(model: Any) -> GinModel:
  """`MODEL` as a GinModel: t5beam.Model's, or a T5X-form model's (anything
  with a `gin_model()` method); no model gives one with nothing set."""
  if isinstance(model, GinModel):
    return model
  if hasattr(model, 'gin_model'):
    return model.gin_model()
  return GinModel(None, None)


@gin.configurable(module='t5beam')
def Model(architecture: Optional[str] = None,  # pylint: disable=invalid-name
          vocabulary: Optional[seqio.Vocabulary] = None,
          **overrides) -> GinModel:
  """A T5-family model: a preset name ('t5_1_1_small', 'mt5_base', ...),
  with T5Config fields overridden, or only fields."""
  if architecture is None and not overrides:
    return GinModel(None, vocabulary)
  if architecture is None:
    config = T5Config(**overrides)
  else:
    config = model_config_lib.preset(architecture, **overrides)
  return GinModel(config, vocabulary)


@gin.configurable(module='t5x.utils')
@dataclasses.dataclass(frozen=True)
class DatasetConfig:
  """T5X's DatasetConfig; inference reads in order (no shuffling), uncached."""
  mixture_or_task_name: str = gin.REQUIRED
  task_feature_lengths: Mapping[str, int] = gin.REQUIRED
  split: str = 'test'
  batch_size: int = 32
  module: Optional[str] = None
  shuffle: bool = False
  seed: Optional[int] = 0
  use_cached: bool = False
  pack: bool = False
  # T5X's other fields, accepted as T5X files set them: none changes what
  # inference reads (caching, prefetching and packing ops are the reader's
  # business here).
  use_custom_packing_ops: bool = False
  use_memory_cache: bool = True
  trim_output_features: bool = True
  runtime_preprocessors: Optional[Sequence[Any]] = None
  num_prefetch_threads: Optional[int] = None
  num_workers: Optional[int] = 0

  def __post_init__(self):
    if not self.trim_output_features:
      raise ValueError('DatasetConfig.trim_output_features=False is not '
                       'supported: features are cut to TASK_FEATURE_LENGTHS; '
                       'set it to True')
    if self.runtime_preprocessors:
      raise ValueError('DatasetConfig.runtime_preprocessors (AirIO) is not '
                       'supported: use a SeqIO task')
    if self.shuffle:
      raise ValueError('DatasetConfig.shuffle=True is not supported for '
                       'inference: outputs are written in input order')
    if self.pack:
      raise ValueError('DatasetConfig.pack=True is not supported for '
                       'inference: set it to False')


@gin.configurable(module='t5x.utils')
@dataclasses.dataclass(frozen=True)
class RestoreCheckpointConfig:
  """T5X's RestoreCheckpointConfig: the checkpoint and the dtype to restore
  parameters in ('float32', 'bfloat16', 'float16'; by default
  model.config.DEFAULT_RESTORE_DTYPE)."""
  path: str = gin.REQUIRED
  mode: str = 'specific'
  dtype: Optional[str] = model_config_lib.DEFAULT_RESTORE_DTYPE
  # T5X's other fields. is_tensorflow (gone from today's T5X), strict and
  # restore_dataset change nothing here; the others would change what is
  # restored and are refused when set.
  is_tensorflow: bool = False
  strict: bool = True
  restore_dataset: bool = False
  assignment_map: Optional[Sequence[Any]] = None
  fallback_to_scratch: bool = False

  def __post_init__(self):
    if not isinstance(self.path, str):
      raise ValueError('RestoreCheckpointConfig.path must be one checkpoint '
                       'path; run once per checkpoint (see the README\'s '
                       'scheduled reruns)')
    if self.assignment_map:
      raise ValueError('RestoreCheckpointConfig.assignment_map is not '
                       'supported: restore a checkpoint whose parameter '
                       'names match the model')
    if self.fallback_to_scratch:
      raise ValueError('RestoreCheckpointConfig.fallback_to_scratch=True '
                       '(random weights when no checkpoint) is not supported '
                       'for inference; set it to False')
    if self.mode not in ('specific', 'latest'):
      raise ValueError(f"RestoreCheckpointConfig.mode {self.mode!r}: use "
                       "'specific' (the path as given) or 'latest' (the "
                       "newest checkpoint_<step> in the path)")


@gin.configurable
def infer(*,  # pylint: disable=invalid-name
          model: Any = None,
          dataset_cfg: DatasetConfig = gin.REQUIRED,
          restore_checkpoint_cfg: RestoreCheckpointConfig = gin.REQUIRED,
          output_dir: str = gin.REQUIRED,
          mode: str = 'predict',
          checkpoint_period: int = 100,
          num_output_shards: Union[int, str] = 1,
          output_shard_bytes: int = AUTO_OUTPUT_SHARD_BYTES,
          num_input_shards: Optional[int] = None,
          activation_dtype: Optional[str] = None,
          output_ids: bool = False,
          include_all_inputs: bool = False,
          return_intermediates: bool = False,
          input_fields_to_include: Optional[Sequence[str]] = None,
          overwrite: bool = False,
          file_task: Optional[FileTaskSpec] = None,
          decode_fn: Optional[Callable[[], Dict[str, Any]]] = None,
          num_decodes: Optional[int] = None,
          return_all_decodes: Optional[bool] = None,
          seed: int = 0,
          partitioner: Optional[Partitioning] = None,
          lock_expiry_seconds: float = 900.0,
          lock_startup_seconds: float = 3600.0,
          wait_until_finish: bool = True,
          skip_memory_check: bool = False,
          compilation_cache_dir: Optional[str] = None,
          metrics_tensorboard_dir: Optional[str] = None,
          max_bad_records: int = 0,
          batching: str = 'continuous',
          length_buckets: Optional[Sequence[int]] = None,
          # T5X's infer() parameters (t5x/configs/runs/infer.gin binds some).
          shard_id: int = 0,
          num_shards: int = 1,
          merge_chunked_results: bool = True,
          checkpoint_ds_iter: bool = True,
          fallback_init_rng: Optional[int] = None,
          output_vocab_feature_name: str = 'targets',
          file_extension: str = 'jsonl',
          keep_aux_as_numpy: bool = False,
          use_orbax: bool = True) -> InferConfig:
  """Collects the run's settings (bound by runs/infer.gin, or by T5X's
  t5x/configs/runs/infer.gin as `infer_script.infer`) into InferConfig."""
  del checkpoint_ds_iter, keep_aux_as_numpy, use_orbax  # change nothing here
  _check_t5x_infer_settings(shard_id, num_shards, merge_chunked_results,
                            fallback_init_rng, output_vocab_feature_name,
                            file_extension)
  gin_model = as_gin_model(model)
  checkpoint = restore_checkpoint_cfg.path
  if '://' not in checkpoint:
    checkpoint = os.path.abspath(checkpoint)
  if restore_checkpoint_cfg.mode == 'latest':
    checkpoint = checkpoints.latest_checkpoint(checkpoint)
  output = output_dir if '://' in output_dir else os.path.abspath(output_dir)
  output = plan.expand_output_dir(output, checkpoint)
  if gin_model.decoding is not None:
    if (decode_fn, num_decodes, return_all_decodes) != (None, None, None):
      raise ValueError(
          'a T5X-form model sets its decoding on models.EncoderDecoderModel:'
          ' unset infer.decode_fn, infer.num_decodes and '
          'infer.return_all_decodes')
    decoding = DecodingConfig(**gin_model.decoding)
  else:
    settings = decode_fn() if decode_fn is not None else {}
    num_decodes = 1 if num_decodes is None else num_decodes
    if num_decodes > 1 and not settings:
      raise ValueError('infer.num_decodes > 1 needs a sampling or beam '
                       'decoder: set infer.decode_fn = @decoding.'
                       'temperature_sample or @decoding.beam_search')
    decoding = DecodingConfig(num_decodes=num_decodes,
                              return_all_decodes=bool(return_all_decodes),
                              **settings)
  return_intermediates = return_intermediates or bool(
      gin_model.return_intermediates)
  activation_dtype = activation_dtype or gin_model.activation_dtype
  task_name = dataset_cfg.mixture_or_task_name
  if file_task is not None:
    task_name = file_task.task_name
  spec = ModelSpec(
      checkpoint_path=checkpoint,
      task_feature_lengths=dict(dataset_cfg.task_feature_lengths),
      model_config=gin_model.config,
      batch_size=dataset_cfg.batch_size,
      restore_dtype=(restore_checkpoint_cfg.dtype or
                     model_config_lib.DEFAULT_RESTORE_DTYPE),
      activation_dtype=activation_dtype,
      mode=mode,
      decoding=decoding,
      output_ids=output_ids,
      return_intermediates=return_intermediates,
      seed=seed,
      partitioning=partitioner or Partitioning(),
      batching=batching,
      length_buckets=(tuple(length_buckets) if length_buckets is not None
                      else None),
      compilation_cache_dir=compilation_cache_dir)
  return InferConfig(
      mixture_or_task_name=task_name,
      output_dir=output,
      model=spec,
      mixture_or_task_module=dataset_cfg.module,
      split=dataset_cfg.split,
      checkpoint_period=checkpoint_period,
      num_input_shards=num_input_shards,
      num_output_shards=num_output_shards,
      output_shard_bytes=output_shard_bytes,
      include_all_inputs=include_all_inputs,
      input_fields_to_include=(tuple(input_fields_to_include)
                               if input_fields_to_include is not None
                               else None),
      overwrite=overwrite,
      metrics_tensorboard_dir=metrics_tensorboard_dir,
      max_bad_records=max_bad_records,
      file_task=file_task,
      lock_expiry_seconds=lock_expiry_seconds,
      lock_startup_seconds=lock_startup_seconds,
      wait_until_finish=wait_until_finish,
      skip_memory_check=skip_memory_check)


def _check_t5x_infer_settings(shard_id, num_shards, merge_chunked_results,
                              fallback_init_rng, output_vocab_feature_name,
                              file_extension):
  """T5X's infer() settings that t5beam does not honour are refused."""
  if num_shards != 1 or shard_id != 0:
    raise ValueError(
        f'infer.num_shards = {num_shards} (shard_id {shard_id}) splits a T5X '
        'run across jobs; t5beam splits the work across Beam workers in one '
        'job: set infer.num_shards = 1 and infer.shard_id = 0')
  if not merge_chunked_results:
    raise ValueError('infer.merge_chunked_results=False is not supported: '
                     'chunk files are always merged; set it to True')
  if fallback_init_rng is not None:
    raise ValueError('infer.fallback_init_rng (random weights without a '
                     'checkpoint) is not supported; set it to None')
  if output_vocab_feature_name != 'targets':
    raise ValueError(f'infer.output_vocab_feature_name '
                     f'{output_vocab_feature_name!r}: predictions are decoded '
                     "with the 'targets' feature's vocabulary; set 'targets'")
  if file_extension != 'jsonl':
    raise ValueError(f'infer.file_extension {file_extension!r}: outputs are '
                     "jsonl; set 'jsonl'")


@gin.configurable(module='t5beam')
def FileTask(file_patterns=gin.REQUIRED,  # pylint: disable=invalid-name
             file_type: str = 'jsonl', inputs_key: str = 'inputs',
             targets_key: Optional[str] = None,
             model: Any = None) -> FileTaskSpec:
  """Input files read as a task, tokenized with the model's vocabulary."""
  vocabulary = as_gin_model(model).vocabulary
  if vocabulary is None:
    raise ValueError('runs/infer_from_files.gin tokenizes with the model\'s '
                     'VOCABULARY: include a model Gin file that sets it')
  if isinstance(file_patterns, str):
    file_patterns = (file_patterns,)
  patterns = tuple(p if '://' in p else os.path.abspath(p)
                   for p in file_patterns)
  return FileTaskSpec(patterns, file_type, inputs_key, vocabulary,
                      targets_key)


REPO_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@gin.configurable(module='t5beam')
def package_path(relative: str = gin.REQUIRED) -> str:
  """A path inside the installed t5beam (for the shipped demo checkpoint)."""
  return os.path.join(REPO_ROOT, relative)


@gin.configurable(module='t5x.partitioning')
def PjitPartitioner(num_partitions: Optional[int] = None,  # pylint: disable=invalid-name
                    model_parallel_submesh: Optional[Sequence[int]] = None,
                    params_on_devices: bool = True,
                    backend: Optional[str] = None,
                    ici_mesh_shape: Optional[Sequence[int]] = None,
                    dcn_mesh_shape: Optional[Sequence[int]] = None,
                    logical_axis_rules: Optional[Sequence] = None
                    ) -> Partitioning:
  """T5X's PjitPartitioner: the model axis size (num_partitions, or the
  product of model_parallel_submesh) and the logical axis rules. The data
  axis is every other device of the worker."""
  if ici_mesh_shape is not None or dcn_mesh_shape is not None:
    raise ValueError('partitioning.PjitPartitioner.ici_mesh_shape and '
                     'dcn_mesh_shape describe multi-host meshes; t5beam '
                     'workers are single hosts: set num_partitions instead')
  if not params_on_devices:
    raise ValueError('partitioning.PjitPartitioner.params_on_devices=False '
                     '(parameters kept in host memory) is not supported; '
                     'set num_partitions so the parameters fit the devices')
  del backend  # the worker's default backend
  return Partitioning(
      num_partitions=num_partitions,
      model_parallel_submesh=(tuple(model_parallel_submesh)
                              if model_parallel_submesh else None),
      logical_axis_rules=(tuple(tuple(rule) for rule in logical_axis_rules)
                          if logical_axis_rules is not None else
                          partitioning_lib.STANDARD_RULES))


@gin.configurable(module='t5x.partitioning')
def standard_logical_axis_rules(activation_partitioning_dims: int = 1,
                                parameter_partitioning_dims: int = 1,
                                additional_rules: Optional[Sequence] = None):
  """T5X's default rules (batch on 'data'; vocab, mlp, heads, joined_kv on
  'model'), then `additional_rules`: a rule is used for a logical axis only
  when no earlier one applies."""
  if activation_partitioning_dims != 1 or parameter_partitioning_dims != 1:
    raise ValueError(
        'partitioning.standard_logical_axis_rules: only 1-D partitioning '
        '(both *_partitioning_dims = 1) is supported; write 2-D rules in '
        'PjitPartitioner.logical_axis_rules')
  return partitioning_lib.STANDARD_RULES + tuple(
      tuple(rule) for rule in (additional_rules or ()))


@gin.configurable(module='t5x.decoding')
def temperature_sample(temperature: float = 1.0, topk: int = 1,
                       topp: float = 0.0,
                       max_decode_steps: Optional[int] = None,
                       max_decode_steps_hard_limit: Optional[int] = None,
                       rescale_log_probs: bool = True,
                       num_decodes: Optional[int] = None) -> Dict[str, Any]:
  """T5X's temperature sampling settings (its defaults: topk=1 is greedy;
  set topk=0 for plain sampling, or topk=0 and topp=p for nucleus).

  As in T5X, the sample count comes from the caller (infer.num_decodes, or
  a T5X-form model's predict_batch_with_aux.num_decodes), not from
  `num_decodes` here."""
  del num_decodes
  if not rescale_log_probs:
    raise ValueError('decoding.temperature_sample.rescale_log_probs=False is '
                     'not supported: scores are the tempered log '
                     'probabilities; set it to True')
  if max_decode_steps_hard_limit is not None:
    max_decode_steps = min(max_decode_steps or max_decode_steps_hard_limit,
                           max_decode_steps_hard_limit)
  return dict(strategy='temperature_sample', temperature=temperature,
              topk=topk, topp=topp, max_decode_steps=max_decode_steps)


@gin.configurable(module='t5x.decoding')
def beam_search(alpha: float = 0.6,
                max_decode_steps: Optional[int] = None,
                num_decodes: Optional[int] = None,
                max_decode_len: Optional[int] = None) -> Dict[str, Any]:
  """T5X's beam search settings; the beam count is infer.num_decodes (a
  T5X-form model's predict_batch_with_aux.num_decodes), as in T5X, where
  `num_decodes` bound here is overridden by the caller. `max_decode_len`
  (T5X: the decoded length, by default the targets length) caps the steps
  as max_decode_steps does."""
  del num_decodes
  if max_decode_len is not None:
    max_decode_steps = min(max_decode_steps or max_decode_len, max_decode_len)
  return dict(strategy='beam_search', alpha=alpha,
              max_decode_steps=max_decode_steps)


def bound_model() -> GinModel:
  """The model `infer.model` is bound to (MODEL in both dialects), built as
  the run builds it; nothing set when it is unbound or None."""
  try:
    model = gin.query_parameter('infer.model')
  except ValueError:
    return GinModel(None, None)
  if isinstance(model, gin.config.ConfigurableReference):
    model = model.scoped_configurable_fn()
  return as_gin_model(model)
