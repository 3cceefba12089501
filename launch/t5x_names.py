"""T5X's Gin names, provided by t5beam so T5X's own Gin files run unchanged.

T5X's files say `from t5x import models, partitioning, utils`,
`from t5x.examples.t5 import network` and `import __main__ as infer_script`
under `from __gin__ import dynamic_registration`. Gin imports those modules
and registers what the files name on them. t5beam never imports T5X: while
the launcher runs (`provided()`), these module paths are stand-ins in
`sys.modules` holding t5beam's own objects, and `__main__.infer` is
`launch.gin_config.infer`. Where our dialect already has the thing
(`DatasetConfig`, `RestoreCheckpointConfig`, `PjitPartitioner`, the decoding
functions) the T5X name is that same object, so Gin sees one configurable
per thing. Nothing here reaches the workers: the launcher turns the parsed
config into an InferConfig first.

What T5X's model files build (`models.EncoderDecoderModel` around
`network.Transformer(config=network.T5Config(...))`) becomes a
`gin_config.GinModel`: the architecture, the vocabularies, and the decoding
T5X configures on the model. Training-only settings (optimizer, losses,
dropout) are accepted and ignored; a setting that would change results and
that t5beam cannot honour is refused with one line naming it.
"""

import contextlib
import dataclasses
import sys
import types
from typing import Any, Dict, Iterator, Optional, Sequence

import gin

from launch import gin_config
from model import config as model_config_lib

# T5X's `mlp_activations` -> our feed_forward.
FEED_FORWARD = {
    ('relu',): 'relu',
    ('gelu', 'linear'): 'gated-gelu',
    ('relu', 'linear'): 'gated-relu',
    ('silu', 'linear'): 'gated-silu',
    ('swish', 'linear'): 'gated-silu',
}


def _dtype_name(dtype: Any) -> str:
  """'bfloat16' for 'bfloat16', jnp.bfloat16 or np.dtype('bfloat16')."""
  if isinstance(dtype, str):
    return dtype
  return str(getattr(dtype, 'dtype', None) or getattr(dtype, '__name__',
                                                       dtype))


@dataclasses.dataclass(frozen=True)
class T5Config:
  """t5x.examples.t5.network.T5Config: T5X's field names for our T5Config."""
  vocab_size: int = gin.REQUIRED
  dtype: Any = 'float32'
  emb_dim: int = 512
  num_heads: int = 8
  num_encoder_layers: int = 6
  num_decoder_layers: int = 6
  head_dim: int = 64
  mlp_dim: int = 2048
  mlp_activations: Sequence[str] = ('relu',)
  dropout_rate: float = 0.1  # training only
  logits_via_embedding: bool = False
  # Our attention always takes its softmax in float32, as this asks; False
  # (bfloat16 logits in T5X) is accepted: the difference is rounding.
  float32_attention_logits: bool = False

  def __post_init__(self):
    name = 'network.T5Config'
    activations = tuple(self.mlp_activations)
    if activations not in FEED_FORWARD:
      raise ValueError(
          f'{name}.mlp_activations {activations} is not supported; use one '
          f'of {sorted(FEED_FORWARD)}')
    if _dtype_name(self.dtype) not in ('float32', 'bfloat16', 'float16'):
      raise ValueError(f"{name}.dtype {self.dtype!r}: use 'float32', "
                       "'bfloat16' or 'float16'")

  def to_t5config(self) -> model_config_lib.T5Config:
    return model_config_lib.T5Config(
        vocab_size=self.vocab_size, d_model=self.emb_dim,
        num_heads=self.num_heads, d_kv=self.head_dim, d_ff=self.mlp_dim,
        num_encoder_layers=self.num_encoder_layers,
        num_decoder_layers=self.num_decoder_layers,
        feed_forward=FEED_FORWARD[tuple(self.mlp_activations)],
        logits_via_embedding=self.logits_via_embedding)

  @property
  def activation_dtype(self) -> str:
    return _dtype_name(self.dtype)


@dataclasses.dataclass(frozen=True)
class ScalableT5Config(T5Config):
  """t5x.examples.scalable_t5.network.T5Config: adds layer scanning, whose
  stacked parameters t5beam does not read (refused), and rematerialisation
  (training only)."""
  float32_attention_logits: bool = False
  remat_policy: str = 'none'
  scan_layers: bool = True
  param_scan_axis: int = 1

  def __post_init__(self):
    super().__post_init__()
    if self.scan_layers:
      raise ValueError(
          'scalable_t5 network.T5Config.scan_layers=True (stacked layer '
          'parameters) is not supported: set it to False, with an unscanned '
          'checkpoint')


@dataclasses.dataclass(frozen=True)
class GpuT5Config(T5Config):
  """t5x.contrib.gpu.t5.network.T5Config: adds scale_attn_logits, which
  changes the network's numbers (refused when True)."""
  scale_attn_logits: bool = False

  def __post_init__(self):
    super().__post_init__()
    if self.scale_attn_logits:
      raise ValueError(
          'network.T5Config.scale_attn_logits=True (attention scaled by '
          '1/sqrt(head_dim)) is not supported: T5 checkpoints expect False')


class Transformer:
  """T5X's network.Transformer: here only the holder of its config."""

  def __init__(self, config: T5Config = gin.REQUIRED):
    if not isinstance(config, T5Config):
      raise ValueError('network.Transformer.config must be '
                       '@network.T5Config()')
    self.config = config


@dataclasses.dataclass(frozen=True)
class DecoderParams:
  """T5X's models.DecoderParams (its default_decoder_params)."""
  return_all_decodes: bool = False
  num_decodes: int = 1


_DECODERS = (gin_config.beam_search, gin_config.temperature_sample)


class EncoderDecoderModel:
  """T5X's models.EncoderDecoderModel, read for what inference uses.

  The decoding is T5X's: `decode_fn` (default: beam search, alpha 0.6),
  `num_decodes` and `return_all_decodes` from `predict_batch_with_aux`'s
  bindings, else from `default_decoder_params` (one decode, the best);
  `decoder_params` are decode_fn's keyword arguments. `score_batch`'s
  `return_intermediates` is honoured."""

  def __init__(self, module: Transformer = gin.REQUIRED,
               input_vocabulary: Any = gin.REQUIRED,
               output_vocabulary: Any = gin.REQUIRED,
               optimizer_def: Any = None,
               decode_fn: Any = None,
               feature_converter_cls: Any = None,
               label_smoothing: float = 0.0,
               z_loss: float = 0.0,
               loss_normalizing_factor: Optional[float] = None,
               default_decoder_params: Optional[DecoderParams] = None):
    del optimizer_def, label_smoothing, z_loss, loss_normalizing_factor
    if not isinstance(module, Transformer):
      raise ValueError('models.EncoderDecoderModel.module must be '
                       '@network.Transformer()')
    name = getattr(feature_converter_cls, '__name__', None)
    if feature_converter_cls is not None and name != 'EncDecFeatureConverter':
      raise ValueError(f'models.EncoderDecoderModel.feature_converter_cls '
                       f'{name}: only seqio.EncDecFeatureConverter is '
                       'supported; unset it')
    if decode_fn is not None and not any(
        decode_fn is f or getattr(decode_fn, '__wrapped__', None) is f
        for f in _DECODERS):
      raise ValueError('models.EncoderDecoderModel.decode_fn must be '
                       '@decoding.beam_search or @decoding.temperature_sample')
    self.module = module
    self.input_vocabulary = input_vocabulary
    self.output_vocabulary = output_vocabulary
    self.decode_fn = decode_fn or gin_config.beam_search
    self.default_decoder_params = default_decoder_params or DecoderParams()

  def predict_batch_with_aux(self, params=None, batch=None, rng=None,
                             decoder_params: Optional[Dict[str, Any]] = None,
                             return_all_decodes: Optional[bool] = None,
                             num_decodes: Optional[int] = None,
                             prompt_with_targets: bool = False):
    """The decoding settings bound on T5X's method (params, batch and rng
    are the run's own)."""
    del params, batch, rng
    return dict(decoder_params=decoder_params,
                return_all_decodes=return_all_decodes,
                num_decodes=num_decodes,
                prompt_with_targets=prompt_with_targets)

  def score_batch(self, params=None, batch=None,
                  return_intermediates: bool = False):
    """The scoring settings bound on T5X's method."""
    del params, batch
    return dict(return_intermediates=return_intermediates)

  def gin_model(self) -> gin_config.GinModel:
    predict = self.predict_batch_with_aux()
    if predict['prompt_with_targets']:
      raise ValueError('models.EncoderDecoderModel.predict_batch_with_aux.'
                       'prompt_with_targets=True is not supported; unset it')
    try:
      settings = self.decode_fn(**(predict['decoder_params'] or {}))
    except TypeError as e:
      raise ValueError(f'models.EncoderDecoderModel.predict_batch_with_aux.'
                       f'decoder_params: {e}') from e
    defaults = self.default_decoder_params
    num_decodes = predict['num_decodes']
    return_all = predict['return_all_decodes']
    settings.update(
        num_decodes=defaults.num_decodes if num_decodes is None
        else num_decodes,
        return_all_decodes=bool(defaults.return_all_decodes
                                if return_all is None else return_all))
    config = self.module.config
    output_vocabulary = (self.output_vocabulary
                         if self.output_vocabulary != self.input_vocabulary
                         else None)
    return gin_config.GinModel(
        config=config.to_t5config(), vocabulary=self.input_vocabulary,
        output_vocabulary=output_vocabulary, decoding=settings,
        return_intermediates=self.score_batch()['return_intermediates'],
        activation_dtype=config.activation_dtype)


class Adafactor:
  """T5X's adafactor.Adafactor: training only, accepted and ignored."""

  def __init__(self, **settings):
    del settings


def standard_logical_factor_rules(**settings):
  """T5X's adafactor.standard_logical_factor_rules: training only."""
  del settings


def _module(name: str, **attributes) -> types.ModuleType:
  module = types.ModuleType(name, f"t5beam's stand-in for {name}.")
  for key, value in attributes.items():
    setattr(module, key, value)
  return module


def _modules() -> Dict[str, types.ModuleType]:
  """T5X's module paths -> stand-ins, made once per process (Gin's
  registrations of their objects persist across launcher runs)."""
  models = _module('t5x.models', EncoderDecoderModel=EncoderDecoderModel,
                   DecoderParams=DecoderParams)
  # Our dialect's own objects (registered under these module names there).
  utils = _module('t5x.utils', DatasetConfig=gin_config.DatasetConfig,
                  RestoreCheckpointConfig=gin_config.RestoreCheckpointConfig)
  partitioning = _module(
      't5x.partitioning', PjitPartitioner=gin_config.PjitPartitioner,
      standard_logical_axis_rules=gin_config.standard_logical_axis_rules)
  decoding = _module('t5x.decoding', beam_search=gin_config.beam_search,
                     temperature_sample=gin_config.temperature_sample)
  adafactor = _module(
      't5x.adafactor', Adafactor=Adafactor,
      standard_logical_factor_rules=standard_logical_factor_rules)
  t5_network = _module('t5x.examples.t5.network', T5Config=T5Config,
                       Transformer=Transformer)
  scalable_network = _module('t5x.examples.scalable_t5.network',
                             T5Config=ScalableT5Config,
                             Transformer=Transformer)
  gpu_network = _module('t5x.contrib.gpu.t5.network', T5Config=GpuT5Config,
                        Transformer=Transformer)
  modules = {
      't5x.models': models, 't5x.utils': utils,
      't5x.partitioning': partitioning, 't5x.decoding': decoding,
      't5x.adafactor': adafactor,
      't5x.examples.t5.network': t5_network,
      't5x.examples.scalable_t5.network': scalable_network,
      't5x.contrib.gpu.t5.network': gpu_network,
  }
  # The packages above them, each holding its children as attributes.
  for path in list(modules):
    parts = path.split('.')
    for i in range(len(parts) - 1, 0, -1):
      parent = '.'.join(parts[:i])
      if parent not in modules:
        modules[parent] = _module(parent)
      setattr(modules[parent], parts[i], modules['.'.join(parts[:i + 1])])
  return modules


MODULES = _modules()


@contextlib.contextmanager
def provided() -> Iterator[None]:
  """T5X's module paths and `__main__.infer` while the block runs; whatever
  was there before (an installed t5x, a script's own `infer`) comes back
  after."""
  main = sys.modules['__main__']
  saved = {name: module for name, module in sys.modules.items()
           if name == 't5x' or name.startswith('t5x.')}
  missing = object()
  saved_infer = getattr(main, 'infer', missing)
  for name in saved:
    del sys.modules[name]
  sys.modules.update(MODULES)
  main.infer = gin_config.infer
  try:
    yield
  finally:
    for name in MODULES:
      sys.modules.pop(name, None)
    sys.modules.update(saved)
    if saved_infer is missing:
      del main.infer
    else:
      main.infer = saved_infer


def is_t5x_import(module: str) -> bool:
  """An import a T5X Gin file makes that the stand-ins (or Gin) serve."""
  return (module.split('.')[0] in ('t5x', '__main__', '__gin__', 'gin',
                                   'seqio'))
