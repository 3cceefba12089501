"""The one configuration object of the T5 family, and the named sizes users know.

T5 1.0, T5 1.1, Flan-T5, mT5 and ByT5 differ only in settings of `T5Config`:
the feed-forward block (ReLU or gated GELU), whether logits come from the
shared embedding, the vocabulary size and the layer counts. `PRESETS` holds
the T5X sizes by name (`t5_1_1_small`, `mt5_base`, `byt5_large`, ...).
"""

import dataclasses
import difflib
import json
from typing import Any, Dict, Mapping

_DTYPES = ('float32', 'bfloat16', 'float16')

# The dtype parameters are restored in when none is asked for: the one
# default of Gin's RestoreCheckpointConfig.dtype, the launcher,
# InferenceModel.load and T5ModelHandler. bfloat16, as T5X's inference
# configs restore: what GPU and TPU runs use (their matrix units run it
# natively, and it halves parameter memory), so a T5X user's run means the
# same here. On CPUs ask for 'float32', which XLA's CPU backend runs faster
# and which gives the checkpoint's float32 numbers.
DEFAULT_RESTORE_DTYPE = 'bfloat16'
_FEED_FORWARD = ('relu', 'gated-gelu', 'gated-relu', 'gated-silu')


@dataclasses.dataclass(frozen=True)
class T5Config:
  """Every hyperparameter of a T5-family encoder-decoder.

  `dtype` is the activation dtype (matmuls run in it); `param_dtype` is the
  dtype parameters are stored in. Layer norms, softmax and the final logits
  are always computed in float32.
  """
  vocab_size: int = 32128
  d_model: int = 512
  num_heads: int = 6
  d_kv: int = 64
  d_ff: int = 1024
  num_encoder_layers: int = 8
  num_decoder_layers: int = 8
  # 'relu' (T5 1.0) or 'gated-gelu' (T5 1.1, Flan-T5, mT5, ByT5).
  feed_forward: str = 'gated-gelu'
  # T5 1.0: logits are the decoder output times the shared embedding,
  # scaled by d_model ** -0.5. Otherwise a separate `logits_dense` kernel.
  logits_via_embedding: bool = False
  relative_attention_num_buckets: int = 32
  relative_attention_max_distance: int = 128
  layer_norm_epsilon: float = 1e-6
  dtype: str = 'float32'
  param_dtype: str = 'float32'
  pad_id: int = 0
  eos_id: int = 1
  decoder_start_id: int = 0
  # Not an architecture setting: the size of the mesh's model axis, which
  # fused kernels are laid out for (model.network.fused_kernel). Set by
  # InferenceModel from its mesh.
  model_axis_size: int = 1

  def __post_init__(self):
    if self.feed_forward not in _FEED_FORWARD:
      raise ValueError(f'T5Config.feed_forward {self.feed_forward!r} is not '
                       f'one of {_FEED_FORWARD}')
    for field in ('dtype', 'param_dtype'):
      if getattr(self, field) not in _DTYPES:
        raise ValueError(f'T5Config.{field} {getattr(self, field)!r} is not '
                         f'one of {_DTYPES}')
    for field in ('vocab_size', 'd_model', 'num_heads', 'd_kv', 'd_ff',
                  'num_encoder_layers', 'num_decoder_layers',
                  'relative_attention_num_buckets'):
      if getattr(self, field) <= 0:
        raise ValueError(f'T5Config.{field} must be positive, got '
                         f'{getattr(self, field)}')

  @property
  def gated(self) -> bool:
    return self.feed_forward.startswith('gated-')

  @property
  def activation(self) -> str:
    return self.feed_forward.split('-')[-1]

  def replace(self, **changes) -> 'T5Config':
    return dataclasses.replace(self, **changes)

  def to_dict(self) -> Dict[str, Any]:
    return dataclasses.asdict(self)

  def to_json(self) -> str:
    return json.dumps(self.to_dict(), indent=2, sort_keys=True)

  @classmethod
  def from_dict(cls, values: Mapping[str, Any]) -> 'T5Config':
    known = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(values) - known)
    if unknown:
      raise ValueError(f'unknown T5Config fields {unknown}; known fields: '
                       f'{sorted(known)}')
    return cls(**values)

  def num_parameters(self) -> int:
    """Parameter count of the tree `model.network` builds for this config."""
    attention = 4 * self.d_model * self.num_heads * self.d_kv
    mlp = (3 if self.gated else 2) * self.d_model * self.d_ff
    relpos = self.relative_attention_num_buckets * self.num_heads
    encoder = self.num_encoder_layers * (attention + mlp + 2 * self.d_model)
    decoder = self.num_decoder_layers * (2 * attention + mlp + 3 * self.d_model)
    total = (self.vocab_size * self.d_model + encoder + decoder + 2 * relpos +
             2 * self.d_model)
    if not self.logits_via_embedding:
      total += self.d_model * self.vocab_size
    return total


def _size(d_model, num_heads, d_ff, encoder_layers, decoder_layers, d_kv=64):
  return dict(d_model=d_model, num_heads=num_heads, d_ff=d_ff, d_kv=d_kv,
              num_encoder_layers=encoder_layers,
              num_decoder_layers=decoder_layers)


_T5_1_0 = dict(vocab_size=32128, feed_forward='relu', logits_via_embedding=True)
_T5_1_1 = dict(vocab_size=32128, feed_forward='gated-gelu',
               logits_via_embedding=False)
_MT5 = dict(_T5_1_1, vocab_size=250112)
_BYT5 = dict(_T5_1_1, vocab_size=384)

_T5_1_0_SIZES = {
    'small': _size(512, 8, 2048, 6, 6),
    'base': _size(768, 12, 3072, 12, 12),
    'large': _size(1024, 16, 4096, 24, 24),
    '3b': _size(1024, 32, 16384, 24, 24, d_kv=128),
    '11b': _size(1024, 128, 65536, 24, 24, d_kv=128),
}
_T5_1_1_SIZES = {
    'small': _size(512, 6, 1024, 8, 8),
    'base': _size(768, 12, 2048, 12, 12),
    'large': _size(1024, 16, 2816, 24, 24),
    'xl': _size(2048, 32, 5120, 24, 24),
    'xxl': _size(4096, 64, 10240, 24, 24),
}
_BYT5_SIZES = {
    'small': _size(1472, 6, 3584, 12, 4),
    'base': _size(1536, 12, 3968, 18, 6),
    'large': _size(1536, 16, 3840, 36, 12),
    'xl': _size(2560, 32, 6720, 36, 12),
    'xxl': _size(4672, 64, 12352, 36, 12),
}


def _build_presets() -> Dict[str, T5Config]:
  presets = {}
  for size, dims in _T5_1_0_SIZES.items():
    presets[f't5_1_0_{size}'] = T5Config(**_T5_1_0, **dims)
  for size, dims in _T5_1_1_SIZES.items():
    presets[f't5_1_1_{size}'] = T5Config(**_T5_1_1, **dims)
    # Flan-T5 is T5 1.1 fine-tuned: the same architecture.
    presets[f'flan_t5_{size}'] = T5Config(**_T5_1_1, **dims)
    presets[f'mt5_{size}'] = T5Config(**_MT5, **dims)
  for size, dims in _BYT5_SIZES.items():
    presets[f'byt5_{size}'] = T5Config(**_BYT5, **dims)
  return presets


PRESETS: Dict[str, T5Config] = _build_presets()


def preset(name: str, **overrides) -> T5Config:
  """The named T5X size (e.g. 't5_1_1_small'), with fields overridden."""
  if name not in PRESETS:
    close = difflib.get_close_matches(name, PRESETS, n=3)
    hint = f'; closest: {close}' if close else ''
    raise ValueError(f'unknown T5 preset {name!r}{hint}; known presets: '
                     f'{sorted(PRESETS)}')
  return PRESETS[name].replace(**overrides)
