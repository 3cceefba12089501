"""Checkpoint readers: find the format at a path and give (T5Config, params).

Formats read here:
- Hugging Face directories: `config.json` plus `model.safetensors`, or shards
  listed in `model.safetensors.index.json`. The architecture comes from
  `config.json`. `pytorch_model.bin` is refused: reading it means unpickling.
- Orbax checkpoints of our own parameter tree (`save_orbax` writes them),
  with the architecture in `t5_config.json` beside the arrays, and T5X's
  Orbax train states (`checkpoint_<step>/state`: only the target is read).
- T5X's native checkpoints (a msgpack 'checkpoint' file whose arrays are
  inline or TensorStore specs).
- TensorFlow / Mesh TensorFlow checkpoints of the original T5 releases.

Every reader returns parameters in the tree of `model.network.Transformer`,
cast to the dtype asked for: numpy arrays, or with `shardings` arrays
placed on their devices as they are read (see `load_checkpoint`).
"""

import collections
import json
import os
import re
import struct
from typing import Any, Callable, Dict, Iterable, Mapping, Optional, Tuple

import fsspec
import ml_dtypes
import numpy as np

from model import files
from model.config import T5Config

Params = Dict[str, Any]

CONFIG_FILE = 't5_config.json'
# The formats read, in a refusal's words (the README lists the files each
# format is recognised by).
FORMATS_LOOKED_FOR = 'Hugging Face safetensors, Orbax, T5X or TensorFlow'



class CheckpointError(ValueError):
  """A checkpoint that cannot be read; the message says why and what to do."""


# --- checkpoint steps -----------------------------------------------------------

_STEP_DIR = re.compile(r'^(?:checkpoint_)?(\d+)$')  # T5X / Orbax manager
_TF_STEP = re.compile(r'-(\d+)$')  # model.ckpt-1000000


def checkpoint_step(path: str) -> Optional[int]:
  """The training step a checkpoint path names, or None.

  T5X `.../checkpoint_<step>`, an Orbax CheckpointManager `.../<step>` (also
  with a trailing `/state` or `/default` item), a TensorFlow prefix
  `model.ckpt-<step>`, or a TensorFlow directory (its latest checkpoint).
  Hugging Face directories carry no step.
  """
  parts = path.rstrip('/').split('/')
  if len(parts) > 1 and parts[-1] in ('state', 'default'):
    parts = parts[:-1]
  match = _STEP_DIR.match(parts[-1]) or _TF_STEP.search(parts[-1])
  if match:
    return int(match.group(1))
  if (files.exists(files.join(path, 'checkpoint')) and
      not _t5x_checkpoint_file(path)):
    latest = _latest_tensorflow(path)
    if latest:
      match = _TF_STEP.search(latest)
      return int(match.group(1)) if match else None
  return None


def latest_checkpoint(directory: str) -> str:
  """The newest `checkpoint_<step>` (T5X) or `<step>` (Orbax manager)
  directory in a training directory: T5X's restore mode 'latest'."""
  fs = files.filesystem(directory)
  steps = []
  if fs.exists(directory):
    for entry in fs.ls(directory, detail=True):
      name = entry['name'].rstrip('/').rsplit('/', 1)[-1]
      match = _STEP_DIR.match(name)
      if match and entry['type'] == 'directory':
        steps.append((int(match.group(1)), name))
  if not steps:
    raise CheckpointError(
        f'CHECKPOINT_PATH {directory!r} has no checkpoint_<step> or <step> '
        "directory for mode 'latest': point it at a training directory, or "
        "use mode 'specific'")
  return files.join(directory, max(steps)[1])


# --- format detection ---------------------------------------------------------


def detect_format(path: str) -> str:
  """'huggingface', 'orbax', 't5x' or 'tensorflow'; CheckpointError
  otherwise."""
  if files.exists(path + '.index'):
    return 'tensorflow'
  if not files.exists(path):
    raise CheckpointError(
        f'CHECKPOINT_PATH {path!r} not found: point it at a checkpoint '
        f'({FORMATS_LOOKED_FOR})')
  if files.exists(files.join(path, 'config.json')):
    if (files.exists(files.join(path, 'model.safetensors')) or
        files.exists(files.join(path, 'model.safetensors.index.json'))):
      return 'huggingface'
    if (files.exists(files.join(path, 'pytorch_model.bin')) or
        files.exists(files.join(path, 'pytorch_model.bin.index.json'))):
      raise CheckpointError(
          f'CHECKPOINT_PATH {path!r} holds only pytorch_model.bin, which '
          'cannot be read without unpickling; convert it to safetensors '
          '(transformers: model.save_pretrained(dir, safe_serialization=True))')
  if (files.exists(files.join(path, '_METADATA')) or
      files.exists(files.join(path, '_CHECKPOINT_METADATA'))):
    return 'orbax'
  if files.exists(files.join(path, 'state/_METADATA')):
    return 'orbax'  # T5X's Orbax layout: checkpoint_<step>/state
  if _t5x_checkpoint_file(path):
    return 't5x'
  if files.exists(files.join(path, 'checkpoint')) and _latest_tensorflow(path):
    return 'tensorflow'
  raise CheckpointError(
      f'CHECKPOINT_PATH {path!r} holds no checkpoint t5beam reads '
      f'({FORMATS_LOOKED_FOR}; the README lists their files)')


def read_config(path: str) -> Optional[T5Config]:
  """The architecture stored with the checkpoint, without reading weights
  (None for an Orbax checkpoint saved without t5_config.json)."""
  fmt = detect_format(path)
  if fmt == 'huggingface':
    return config_from_huggingface(
        files.read_json(files.join(path, 'config.json')))
  if fmt in ('tensorflow', 't5x'):
    return None  # these formats do not record the architecture
  config_path = files.join(path, CONFIG_FILE)
  if files.exists(config_path):
    return T5Config.from_dict(files.read_json(config_path))
  return None


def load_checkpoint(path: str, config: Optional[T5Config] = None,
                    dtype: Optional[str] = None,
                    shardings: Optional[Callable[[str], Any]] = None
                    ) -> Tuple[T5Config, Params]:
  """Reads the checkpoint at `path` as (config, params).

  `config`, when given, must agree with the checkpoint's shapes (and, for
  Hugging Face checkpoints, with its config.json). `dtype` casts every
  parameter ('float32', 'bfloat16', 'float16'; None keeps the stored dtype)
  and becomes the config's `param_dtype`.

  Without `shardings` the parameters are numpy arrays. With it (parameter
  name -> a jax.sharding.Sharding), each parameter goes to its devices as
  soon as it is read and cast, and its host copy is dropped: host memory
  stays near the checkpoint's size, and no device holds more of a
  partitioned parameter than its share. Orbax checkpoints are restored
  straight into their shardings (each device reads its slice).
  """
  fmt = detect_format(path)
  if fmt == 'huggingface':
    stored_config, params = read_huggingface(path, dtype, shardings)
  elif fmt == 'tensorflow':
    stored_config, params = read_tensorflow(path, config, dtype, shardings)
  elif fmt == 't5x':
    stored_config, params = read_t5x(path, config, dtype, shardings)
  else:
    stored_config, params = read_orbax(path, config, dtype, shardings)
  if config is not None:
    check_architecture(path, config, stored_config)
    stored_config = config
  check_shapes(stored_config, params, source=path)
  if dtype is not None:
    stored_config = stored_config.replace(param_dtype=dtype)
  if shardings is not None:
    return stored_config, params
  if dtype is not None:
    params = cast_params(params, dtype)
  return stored_config, params


class _LazyArray:
  """An array read slice by slice when placed (a TensorStore array): each
  device's slice is read on its own, so no host or device buffer holds
  the whole array unless one device needs all of it."""

  def __init__(self, store):
    self.store = store
    self.shape = tuple(store.shape)
    self.dtype = np.dtype(store.dtype.numpy_dtype)

  def read(self, index=()) -> np.ndarray:
    return np.asarray(self.store[index].read().result())


def _place_each(pairs: Iterable[Tuple[str, Any]], dtype: Optional[str],
                shardings: Callable[[str], Any],
                expected: Optional[Mapping[str, Tuple[int, ...]]] = None,
                source: str = '') -> Params:
  """Moves each (name, array or _LazyArray) to its sharding, cast to
  `dtype`, as the pairs come: one host array (or one device's slice of a
  lazy one) at a time is alive beyond what is placed. With `expected`
  shapes, a misshapen array is refused before it is placed."""
  import jax  # pylint: disable=g-import-not-at-top
  from model import runtime  # pylint: disable=g-import-not-at-top
  cast = _NUMPY_DTYPES[dtype] if dtype is not None else None
  placed = {}
  for name, value in pairs:
    if not isinstance(value, _LazyArray):
      value = np.asarray(value)
    if expected and name in expected and tuple(value.shape) != expected[
        name]:
      raise CheckpointError(_misshapen(name, source, tuple(value.shape),
                                       expected[name]))
    if isinstance(value, _LazyArray):
      store = value
      placed[name] = jax.make_array_from_callback(
          store.shape, shardings(name),
          lambda index, store=store: _cast(store.read(index), cast))
      placed[name].block_until_ready()
      del store, value
      continue
    value = _cast(value, cast)
    placed[name] = jax.device_put(value, shardings(name))
    placed[name].block_until_ready()  # the host buffer is free only then
    freed = value.nbytes
    del value
    runtime.release_freed_memory(freed)
  return unflatten(placed)


def _cast(value: np.ndarray, dtype: Optional[np.dtype]) -> np.ndarray:
  return value if dtype is None or value.dtype == dtype else value.astype(
      dtype)


def _popping(flat: Dict[str, Any]) -> Iterable[Tuple[str, Any]]:
  """The items of `flat`, each removed as it is given."""
  for name in list(flat):
    yield name, flat.pop(name)


def resolve_architecture(path: str, given: Optional[T5Config]) -> T5Config:
  """The architecture of the checkpoint at `path`: `given` (checked against
  what the checkpoint stores, if it stores one), else the stored one.
  CheckpointError when the checkpoint is missing or unreadable, when the two
  disagree, or when neither says."""
  stored = read_config(path)
  if given is not None and stored is not None:
    check_architecture(path, given, stored)
  architecture = given or stored
  if architecture is None:
    raise CheckpointError(
        f'the architecture of {path!r} is unknown: include a model Gin file '
        "(e.g. 'models/t5_1_1_small.gin'), or pass model='t5_1_1_small' (a "
        'preset name) or a T5Config')
  return architecture


def check_architecture(path: str, given: T5Config, stored: T5Config):
  """CheckpointError listing every architecture field that differs."""
  fields = ('vocab_size', 'd_model', 'num_heads', 'd_kv', 'd_ff',
            'num_encoder_layers', 'num_decoder_layers', 'feed_forward',
            'logits_via_embedding', 'relative_attention_num_buckets',
            'relative_attention_max_distance')
  differences = [f'{f}: model config {getattr(given, f)!r}, checkpoint '
                 f'{getattr(stored, f)!r}' for f in fields
                 if getattr(given, f) != getattr(stored, f)]
  if differences:
    raise CheckpointError(
        f'the model config does not match the checkpoint at {path!r} ('
        + '; '.join(differences) + '); use the model config of the '
        'checkpoint or drop the model Gin file for Hugging Face checkpoints')


_NUMPY_DTYPES = {'float32': np.dtype(np.float32),
                 'bfloat16': np.dtype(ml_dtypes.bfloat16),
                 'float16': np.dtype(np.float16)}


def cast_params(params: Params, dtype: str) -> Params:
  return _map_tree(lambda x: np.asarray(x).astype(_NUMPY_DTYPES[dtype]),
                   params)


def _map_tree(fn, tree):
  if isinstance(tree, Mapping):
    return {k: _map_tree(fn, v) for k, v in tree.items()}
  return fn(tree)


def flatten(tree: Mapping[str, Any], prefix: str = '') -> Dict[str, Any]:
  """{'a': {'b': x}} -> {'a/b': x}."""
  flat = {}
  for key, value in tree.items():
    name = f'{prefix}{key}'
    if isinstance(value, Mapping):
      flat.update(flatten(value, name + '/'))
    else:
      flat[name] = value
  return flat


def unflatten(flat: Mapping[str, Any]) -> Params:
  tree: Params = {}
  for name, value in flat.items():
    node = tree
    *parents, leaf = name.split('/')
    for part in parents:
      node = node.setdefault(part, {})
    node[leaf] = value
  return tree


def expected_shapes(config: T5Config) -> Dict[str, Tuple[int, ...]]:
  """Every parameter of `config`'s network by '/'-joined name, with shape."""
  d, inner = config.d_model, config.num_heads * config.d_kv
  shapes = {'token_embedder/embedding': (config.vocab_size, d)}

  def mlp(prefix):
    names = ('wi_0', 'wi_1') if config.gated else ('wi',)
    for name in names:
      shapes[f'{prefix}/mlp/{name}/kernel'] = (d, config.d_ff)
    shapes[f'{prefix}/mlp/wo/kernel'] = (config.d_ff, d)

  def attention(prefix):
    for name in ('query', 'key', 'value'):
      shapes[f'{prefix}/{name}/kernel'] = (d, inner)
    shapes[f'{prefix}/out/kernel'] = (inner, d)

  relpos = (config.num_heads, config.relative_attention_num_buckets)
  shapes['encoder/relpos_bias/rel_embedding'] = relpos
  for i in range(config.num_encoder_layers):
    layer = f'encoder/layers_{i}'
    shapes[f'{layer}/pre_attention_layer_norm/scale'] = (d,)
    attention(f'{layer}/attention')
    shapes[f'{layer}/pre_mlp_layer_norm/scale'] = (d,)
    mlp(layer)
  shapes['encoder/encoder_norm/scale'] = (d,)
  shapes['decoder/relpos_bias/rel_embedding'] = relpos
  for i in range(config.num_decoder_layers):
    layer = f'decoder/layers_{i}'
    for norm in ('pre_self_attention_layer_norm',
                 'pre_cross_attention_layer_norm', 'pre_mlp_layer_norm'):
      shapes[f'{layer}/{norm}/scale'] = (d,)
    attention(f'{layer}/self_attention')
    attention(f'{layer}/encoder_decoder_attention')
    mlp(layer)
  shapes['decoder/decoder_norm/scale'] = (d,)
  if not config.logits_via_embedding:
    shapes['decoder/logits_dense/kernel'] = (d, config.vocab_size)
  return shapes


def check_shapes(config: T5Config, params: Params, source: str):
  """CheckpointError naming the first missing, unexpected or misshapen
  parameter."""
  expected = expected_shapes(config)
  actual = {k: tuple(np.shape(v)) for k, v in flatten(params).items()}
  missing = sorted(set(expected) - set(actual))
  if missing:
    raise CheckpointError(
        f'checkpoint {source!r} lacks {len(missing)} parameter(s) the model '
        f'needs, first {missing[0]!r}; check that the model config matches '
        'the checkpoint')
  unexpected = sorted(set(actual) - set(expected))
  if unexpected:
    raise CheckpointError(
        f'checkpoint {source!r} has {len(unexpected)} parameter(s) the model '
        f'does not use, first {unexpected[0]!r}; check that the model config '
        'matches the checkpoint')
  for name, shape in expected.items():
    if actual[name] != shape:
      raise CheckpointError(_misshapen(name, source, actual[name], shape))


def _misshapen(name: str, source: str, shape: Tuple[int, ...],
               expected: Tuple[int, ...]) -> str:
  return (f'parameter {name!r} of checkpoint {source!r} has shape {shape}, '
          f'the model config expects {expected}; check that the model config '
          'matches the checkpoint')


# --- Hugging Face -------------------------------------------------------------

_SAFETENSORS_DTYPES = {
    'F64': np.dtype(np.float64), 'F32': np.dtype(np.float32),
    'F16': np.dtype(np.float16), 'BF16': np.dtype(ml_dtypes.bfloat16),
    'I64': np.dtype(np.int64), 'I32': np.dtype(np.int32),
    'I16': np.dtype(np.int16), 'I8': np.dtype(np.int8),
    'U8': np.dtype(np.uint8), 'BOOL': np.dtype(np.bool_),
}


class _SafetensorsFiles:
  """The tensors of one or more .safetensors files, read one at a time on
  request (name -> numpy array, each in a buffer of its own).

  The format is an 8-byte little-endian header size, a JSON header of
  {name: {dtype, shape, data_offsets}}, then the raw little-endian data.
  """

  def __init__(self, paths: Iterable[str]):
    self._entries = {}  # name -> (path, data start, entry)
    for path in paths:
      with fsspec.open(path, 'rb') as f:
        (header_size,) = struct.unpack('<Q', f.read(8))
        header = json.loads(f.read(header_size))
      header.pop('__metadata__', None)
      for name, entry in header.items():
        if entry['dtype'] not in _SAFETENSORS_DTYPES:
          raise CheckpointError(
              f'{path!r}: tensor {name!r} has dtype {entry["dtype"]!r}, '
              'which t5beam cannot read')
        self._entries[name] = (path, 8 + header_size, entry)

  def names(self) -> Iterable[str]:
    """In file order, so reading them all reads each file front to back."""
    return sorted(self._entries, key=lambda n: (self._entries[n][0],
                                                self._entries[n][2][
                                                    'data_offsets'][0]))

  def __contains__(self, name: str) -> bool:
    return name in self._entries

  def __getitem__(self, name: str) -> np.ndarray:
    path, start, entry = self._entries[name]
    begin, end = entry['data_offsets']
    dtype = _SAFETENSORS_DTYPES[entry['dtype']].newbyteorder('<')
    array = np.empty((end - begin) // dtype.itemsize, dtype)
    with fsspec.open(path, 'rb') as f:
      f.seek(start + begin)
      if f.readinto(memoryview(array.view(np.uint8))) != end - begin:
        raise CheckpointError(f'{path!r} ends inside tensor {name!r}; the '
                              'file is truncated: copy it again')
    return array.reshape(entry['shape'])


def read_safetensors(path: str) -> Dict[str, np.ndarray]:
  """All tensors of one .safetensors file, by name."""
  source = _SafetensorsFiles([path])
  return {name: source[name] for name in source.names()}


def config_from_huggingface(hf: Mapping[str, Any]) -> T5Config:
  """T5Config from a Hugging Face T5/mT5/ByT5 `config.json` dict."""
  feed_forward = hf.get('feed_forward_proj', 'relu')
  if feed_forward == 'gated-gelu_new':
    feed_forward = 'gated-gelu'
  num_layers = hf.get('num_layers', 6)
  return T5Config(
      vocab_size=hf.get('vocab_size', 32128),
      d_model=hf.get('d_model', 512),
      num_heads=hf.get('num_heads', 8),
      d_kv=hf.get('d_kv', 64),
      d_ff=hf.get('d_ff', 2048),
      num_encoder_layers=num_layers,
      num_decoder_layers=hf.get('num_decoder_layers') or num_layers,
      feed_forward=feed_forward,
      logits_via_embedding=_logits_via_embedding(hf),
      relative_attention_num_buckets=hf.get('relative_attention_num_buckets',
                                            32),
      relative_attention_max_distance=hf.get('relative_attention_max_distance',
                                             128),
      layer_norm_epsilon=hf.get('layer_norm_epsilon', 1e-6),
      pad_id=hf.get('pad_token_id', 0) or 0,
      eos_id=hf.get('eos_token_id', 1) if isinstance(
          hf.get('eos_token_id', 1), int) else hf['eos_token_id'][0],
      decoder_start_id=hf.get('decoder_start_token_id', 0) or 0)


def _logits_via_embedding(hf: Mapping[str, Any]) -> bool:
  # transformers 5 writes tie_word_embeddings=true for every T5 and records
  # the T5 1.0 behaviour (scaled logits through the embedding) as
  # scale_decoder_outputs; earlier versions wrote tie_word_embeddings=false
  # for T5 1.1. Absent both, the model is a T5 1.0 release.
  if 'scale_decoder_outputs' in hf:
    return bool(hf['scale_decoder_outputs'])
  return hf.get('tie_word_embeddings', True) is not False


def _huggingface_names(config: T5Config) -> Iterable[Tuple[str, str, bool]]:
  """(our name, Hugging Face name, transpose) for every parameter."""
  yield 'token_embedder/embedding', 'shared.weight', False
  ff = ('wi_0', 'wi_1') if config.gated else ('wi',)
  attention = (('query', 'q'), ('key', 'k'), ('value', 'v'), ('out', 'o'))
  for tower in ('encoder', 'decoder'):
    yield (f'{tower}/relpos_bias/rel_embedding',
           f'{tower}.block.0.layer.0.SelfAttention.relative_attention_bias'
           '.weight', True)
    num_layers = (config.num_encoder_layers if tower == 'encoder' else
                  config.num_decoder_layers)
    for i in range(num_layers):
      ours, theirs = f'{tower}/layers_{i}', f'{tower}.block.{i}.layer'
      if tower == 'encoder':
        blocks = [('attention', 'pre_attention_layer_norm', 'SelfAttention')]
      else:
        blocks = [('self_attention', 'pre_self_attention_layer_norm',
                   'SelfAttention'),
                  ('encoder_decoder_attention',
                   'pre_cross_attention_layer_norm', 'EncDecAttention')]
      for j, (attn, norm, hf_attn) in enumerate(blocks):
        yield f'{ours}/{norm}/scale', f'{theirs}.{j}.layer_norm.weight', False
        for our_proj, hf_proj in attention:
          yield (f'{ours}/{attn}/{our_proj}/kernel',
                 f'{theirs}.{j}.{hf_attn}.{hf_proj}.weight', True)
      j = len(blocks)
      yield (f'{ours}/pre_mlp_layer_norm/scale',
             f'{theirs}.{j}.layer_norm.weight', False)
      for name in ff + ('wo',):
        yield (f'{ours}/mlp/{name}/kernel',
               f'{theirs}.{j}.DenseReluDense.{name}.weight', True)
    norm = 'encoder_norm' if tower == 'encoder' else 'decoder_norm'
    yield f'{tower}/{norm}/scale', f'{tower}.final_layer_norm.weight', False
  if not config.logits_via_embedding:
    yield 'decoder/logits_dense/kernel', 'lm_head.weight', True


def read_huggingface(path: str, dtype: Optional[str] = None,
                     shardings: Optional[Callable[[str], Any]] = None
                     ) -> Tuple[T5Config, Params]:
  """(config, params) of a Hugging Face directory; with `shardings`, each
  tensor is converted and placed as it is read (see `load_checkpoint`)."""
  config = config_from_huggingface(
      files.read_json(files.join(path, 'config.json')))
  index_path = files.join(path, 'model.safetensors.index.json')
  if files.exists(index_path):
    shards = sorted(set(files.read_json(index_path)['weight_map'].values()))
  else:
    shards = ['model.safetensors']
  source = _SafetensorsFiles(files.join(path, name) for name in shards)
  if shardings is not None:
    return config, _place_each(
        _huggingface_tensors(config, source, path), dtype, shardings)
  tensors = {name: source[name] for name in source.names()}
  return config, params_from_huggingface(config, tensors, source=path)


def params_from_huggingface(config: T5Config,
                            tensors: Mapping[str, np.ndarray],
                            source: str = 'state dict') -> Params:
  """Our parameter tree from Hugging Face T5 tensors (name -> array). A
  dict given is consumed: each tensor leaves it once converted, so the
  converted copies do not pile up beside the originals."""
  return unflatten(dict(_huggingface_tensors(config, tensors, source)))


def _huggingface_tensors(config: T5Config, tensors, source: str
                         ) -> Iterable[Tuple[str, np.ndarray]]:
  """(our name, array) of every parameter, converted one at a time from
  `tensors` (a dict, emptied as it goes, or a _SafetensorsFiles)."""
  def resolve(name: str) -> Optional[str]:
    if name in tensors:
      return name
    if name == 'shared.weight':
      # Deduplicating writers may keep only one name of the tied embedding.
      for alias in ('encoder.embed_tokens.weight',
                    'decoder.embed_tokens.weight'):
        if alias in tensors:
          return alias
    if name == 'lm_head.weight' and not config.logits_via_embedding:
      return resolve('shared.weight')  # tied to the embedding, unscaled
    return None

  if config.logits_via_embedding and 'lm_head.weight' in tensors:
    shared = resolve('shared.weight')
    if shared is not None and not np.array_equal(tensors['lm_head.weight'],
                                                 tensors[shared]):
      raise CheckpointError(
          f'Hugging Face checkpoint {source!r}: lm_head.weight differs from '
          'shared.weight in a tied (T5 1.0) model; set "tie_word_embeddings"'
          ': false in config.json if it has its own output layer')
  names = []
  for ours, theirs, transpose in _huggingface_names(config):
    stored = resolve(theirs)
    if stored is None:
      raise CheckpointError(
          f'Hugging Face checkpoint {source!r} lacks tensor {theirs!r} (for '
          f'{ours!r}); is config.json the one saved with these weights?')
    names.append((ours, stored, transpose))
  uses = collections.Counter(stored for _, stored, _ in names)
  for ours, stored, transpose in names:
    value = tensors[stored]
    uses[stored] -= 1
    if not uses[stored] and isinstance(tensors, dict):
      del tensors[stored]  # converted copies do not pile up beside them
    yield ours, np.ascontiguousarray(value.T if transpose else value)
    del value


# --- Orbax --------------------------------------------------------------------


def save_orbax(path: str, config: T5Config, params: Params):
  """Writes params with Orbax at `path` (a new directory) and the config
  beside them, as `read_orbax` expects."""
  import orbax.checkpoint as ocp  # pylint: disable=g-import-not-at-top
  checkpointer = ocp.StandardCheckpointer()
  checkpointer.save(os.path.abspath(path) if '://' not in path else path,
                    _map_tree(np.asarray, params))
  checkpointer.wait_until_finished()
  with fsspec.open(files.join(path, CONFIG_FILE), 'w') as f:
    f.write(config.to_json())


def read_orbax(path: str, config: Optional[T5Config],
               dtype: Optional[str] = None,
               shardings: Optional[Callable[[str], Any]] = None
               ) -> Tuple[T5Config, Params]:
  import orbax.checkpoint as ocp  # pylint: disable=g-import-not-at-top
  from model import runtime  # pylint: disable=g-import-not-at-top
  config_path = files.join(path, CONFIG_FILE)
  if files.exists(config_path):
    stored = T5Config.from_dict(files.read_json(config_path))
  elif config is not None:
    stored = config
  else:
    raise CheckpointError(
        f'Orbax checkpoint {path!r} has no {CONFIG_FILE!r}; give the model '
        'config (a model Gin file) so its architecture is known')
  directory = os.path.abspath(path) if '://' not in path else path
  if not files.exists(files.join(path, '_METADATA')) and files.exists(
      files.join(path, 'state/_METADATA')):
    directory = files.join(directory, 'state')  # T5X: checkpoint_<step>/state
  checkpointer = ocp.PyTreeCheckpointer()
  tree = checkpointer.metadata(directory)
  tree = getattr(getattr(tree, 'item_metadata', tree), 'tree', tree)
  # A T5X train state {target, state}: only the target is read.
  prefix = ('target/' if 'target' in tree and 'token_embedder' not in tree
            else '')
  metadata = {name: info for name, info in flatten(tree).items()
              if name.startswith(prefix)}
  # With shardings: straight into each parameter's sharding (a device reads
  # its slice), a batch of parameters at a time, so the host buffers Orbax
  # reads through stay small beside what is placed.
  placed = {}
  limit = _RESTORE_BATCH_BYTES if shardings is not None else None
  for batch in _batches_of_bytes(metadata, limit):
    if shardings is None:
      args = {name: ocp.RestoreArgs(restore_type=np.ndarray)
              for name in batch}
    else:
      args = {name: ocp.ArrayRestoreArgs(
          sharding=shardings(name[len(prefix):]),
          dtype=_NUMPY_DTYPES[dtype] if dtype else None) for name in batch}
    restored = checkpointer.restore(directory, args=ocp.args.PyTreeRestore(
        item=unflatten({name: metadata[name] for name in batch}),
        restore_args=unflatten(args), partial_restore=True))
    placed.update((name[len(prefix):], value)
                  for name, value in flatten(restored).items())
    del restored
    if shardings is not None:
      runtime.release_freed_memory(sum(
          int(np.prod(metadata[name].shape)) *
          np.dtype(metadata[name].dtype).itemsize for name in batch))
  return stored, unflatten(placed)


# Parameters restored together from an Orbax checkpoint (bytes, stored).
_RESTORE_BATCH_BYTES = 16 << 20


def _batches_of_bytes(metadata: Mapping[str, Any], limit: Optional[int]):
  """Names of `metadata`'s arrays in batches of about `limit` bytes (one
  batch for None)."""
  batch, size = [], 0
  for name, info in metadata.items():
    nbytes = int(np.prod(info.shape)) * np.dtype(info.dtype).itemsize
    if batch and limit is not None and size + nbytes > limit:
      yield batch
      batch, size = [], 0
    batch.append(name)
    size += nbytes
  if batch:
    yield batch


# --- TensorFlow / Mesh TensorFlow (the original T5 releases) ------------------

_MTF_SLOT = re.compile(r'_slot_(vc|vr|v|m)$')
_MTF_BLOCK = re.compile(
    r'^(encoder|decoder)/block_(\d+)/layer_(\d+)/(.+)$')
_MTF_ATTENTION = {'q': 'query', 'k': 'key', 'v': 'value', 'o': 'out'}


def _latest_tensorflow(directory: str) -> Optional[str]:
  import tensorflow as tf  # pylint: disable=g-import-not-at-top
  return tf.train.latest_checkpoint(directory)


def tensorflow_name(name: str) -> Optional[str]:
  """Our parameter name for a Mesh TensorFlow T5 variable name; None for
  what inference does not use (optimizer slots, the step counter).
  CheckpointError for a variable that has no place in the model."""
  if name == 'global_step' or _MTF_SLOT.search(name):
    return None
  if name == 'shared/embedding':
    return 'token_embedder/embedding'
  if name in ('decoder/logits/kernel', 'transformer/logits/kernel'):
    return 'decoder/logits_dense/kernel'
  for tower, norm in (('encoder', 'encoder_norm'), ('decoder', 'decoder_norm')):
    if name in (f'{tower}/final_layer_norm/scale', f'{tower}/rms_norm/scale'):
      return f'{tower}/{norm}/scale'
  match = _MTF_BLOCK.match(name)
  if match:
    tower, block, layer, rest = (match.group(1), int(match.group(2)),
                                 int(match.group(3)), match.group(4))
    ours = f'{tower}/layers_{block}'
    if rest == 'SelfAttention/relative_attention_bias' and layer == 0:
      return (f'{tower}/relpos_bias/rel_embedding' if block == 0 else
              f'{ours}/relpos_bias/rel_embedding')
    if tower == 'encoder':
      norms = ['pre_attention_layer_norm', 'pre_mlp_layer_norm']
      attention = {0: ('SelfAttention', 'attention')}
    else:
      norms = ['pre_self_attention_layer_norm',
               'pre_cross_attention_layer_norm', 'pre_mlp_layer_norm']
      attention = {0: ('SelfAttention', 'self_attention'),
                   1: ('EncDecAttention', 'encoder_decoder_attention')}
    if rest in ('layer_norm/scale', 'rms_norm/scale') and layer < len(norms):
      return f'{ours}/{norms[layer]}/scale'
    if layer in attention:
      theirs, attention_name = attention[layer]
      for short, long in _MTF_ATTENTION.items():
        if rest == f'{theirs}/{short}':
          return f'{ours}/{attention_name}/{long}/kernel'
    if layer == len(norms) - 1:
      for kernel in ('wi', 'wi_0', 'wi_1', 'wo'):
        if rest == f'DenseReluDense/{kernel}/kernel':
          return f'{ours}/mlp/{kernel}/kernel'
  raise CheckpointError(
      f'TensorFlow checkpoint variable {name!r} has no place in a T5 model '
      '(unmapped); is this a T5 checkpoint?')


def read_tensorflow(path: str, config: Optional[T5Config],
                    dtype: Optional[str] = None,
                    shardings: Optional[Callable[[str], Any]] = None
                    ) -> Tuple[T5Config, Params]:
  """Reads a (Mesh) TensorFlow T5 checkpoint with TensorFlow's reader, one
  variable at a time; with `shardings`, each is placed as it is read (see
  `load_checkpoint`)."""
  import tensorflow as tf  # pylint: disable=g-import-not-at-top
  if config is None:
    raise CheckpointError(
        f'TensorFlow checkpoint {path!r} does not record its architecture; '
        "include the model's Gin file (e.g. 'models/t5_1_1_small.gin')")
  prefix = path if files.exists(path + '.index') else _latest_tensorflow(path)
  reader = tf.train.load_checkpoint(prefix)

  def tensors():
    for name in sorted(reader.get_variable_to_shape_map()):
      ours = tensorflow_name(name)
      if ours is not None:
        yield ours, np.asarray(reader.get_tensor(name))

  if shardings is not None:
    return config, _place_each(tensors(), dtype, shardings,
                               expected_shapes(config), path)
  return config, unflatten(dict(tensors()))


# --- T5X native (msgpack + TensorStore) ----------------------------------------


def _t5x_checkpoint_file(path: str) -> Optional[str]:
  """The msgpack 'checkpoint' file of a T5X checkpoint directory, if any.

  A TensorFlow 'checkpoint' state file is text starting with
  'model_checkpoint_path'; T5X's is a msgpack map."""
  for candidate in (files.join(path, 'checkpoint'),
                    files.join(path, 'state/checkpoint')):
    if files.exists(candidate) and not files.is_dir(candidate):
      with fsspec.open(candidate, 'rb') as f:
        head = f.read(32)
      if head and not head.startswith(b'model_checkpoint_path') and (
          head[0] >= 0x80):  # a msgpack map
        return candidate
  return None


def _is_tensorstore_spec(value) -> bool:
  return isinstance(value, Mapping) and {'driver', 'kvstore'} <= set(value)


def _open_tensorstore(spec: Mapping[str, Any], directory: str
                      ) -> _LazyArray:
  """Opens one array whose spec holds a path relative to the checkpoint."""
  import tensorstore as ts  # pylint: disable=g-import-not-at-top
  spec = json.loads(json.dumps(spec))  # a mutable copy
  kvstore = spec['kvstore']
  relative = kvstore.get('path', spec.pop('path', None))
  if relative is None:
    raise CheckpointError(f'T5X checkpoint {directory!r} has a TensorStore '
                          f'spec without a path: {spec}')
  if directory.startswith('gs://'):
    bucket, _, prefix = directory[len('gs://'):].partition('/')
    spec['kvstore'] = {'driver': 'gcs', 'bucket': bucket,
                       'path': prefix.rstrip('/') + '/' + relative}
  else:
    # Written on GCS (driver 'gcs', dummy bucket) or locally: read locally.
    spec['kvstore'] = {'driver': 'file',
                       'path': os.path.join(directory, relative)}
  return _LazyArray(ts.open(spec).result())


def read_t5x(path: str, config: Optional[T5Config],
             dtype: Optional[str] = None,
             shardings: Optional[Callable[[str], Any]] = None
             ) -> Tuple[T5Config, Params]:
  """Reads a T5X checkpoint directory (`checkpoint_<step>`): the parameters
  under optimizer/target in its msgpack file, inline or in TensorStore.
  With `shardings`, each TensorStore array is read straight into its
  sharding (each device's slice on its own) and inline ones are placed one
  at a time (see `load_checkpoint`)."""
  from flax import serialization  # pylint: disable=g-import-not-at-top
  if config is None:
    raise CheckpointError(
        f'T5X checkpoint {path!r} does not record its architecture; include '
        "the model's Gin file (e.g. 'models/t5_1_1_small.gin')")
  checkpoint_file = _t5x_checkpoint_file(path)
  with fsspec.open(checkpoint_file, 'rb') as f:
    contents = serialization.msgpack_restore(f.read())
  target = contents.get('optimizer', {}).get('target')
  if target is None:
    raise CheckpointError(
        f'T5X checkpoint {checkpoint_file!r} has no optimizer/target '
        f'parameters (top-level keys: {sorted(contents)})')
  del contents  # the optimizer state is not needed
  directory = os.path.dirname(checkpoint_file)
  flat = {}

  def walk(node, prefix):
    for key, value in node.items():
      if _is_tensorstore_spec(value):
        flat[prefix + key] = _open_tensorstore(value, directory)
      elif isinstance(value, Mapping):
        walk(value, f'{prefix}{key}/')
      else:
        flat[prefix + key] = value

  walk(target, '')
  del target
  if shardings is not None:
    return config, _place_each(_popping(flat), dtype, shardings,
                               expected_shapes(config), path)
  return config, unflatten({
      name: value.read() if isinstance(value, _LazyArray) else
      np.asarray(value) for name, value in flat.items()})
