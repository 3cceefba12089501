"""The T5 encoder-decoder network in Flax, with an explicit key/value cache.

Parameter names follow T5X's example network (`token_embedder/embedding`,
`encoder/layers_0/attention/query/kernel`, `decoder/logits_dense/kernel`, ...)
so that checkpoints of every format map onto one tree. Kernels are 2-D
`[in_features, out_features]`, as T5X and Mesh TensorFlow store them.

The network has three entry points:
- `Transformer.__call__`: teacher-forced logits for whole target sequences
  (scoring, and the reference for parity tests).
- `Transformer.encode` + `Transformer.step_cross_kv`: run once per batch.
- `Transformer.decode_step`: one token per sequence against the caches; the
  decoding loop in `model.decoding` calls it inside `lax.while_loop`.
"""

import functools
from typing import Any, Dict, List, Optional, Tuple

import flax
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from model import partitioning
from model import runtime
from model.config import T5Config

# Added to attention logits where attention is not allowed. Finite so that a
# fully masked row (an all-padding input) gives a uniform softmax, not NaN.
MASK_VALUE = -1e10

Array = jax.Array
# Per decoder layer: (keys, values), each [batch, length, heads, d_kv].
KeyValue = Tuple[Array, Array]


def relative_position_buckets(query_length: int, key_length: int, *,
                              bidirectional: bool, num_buckets: int,
                              max_distance: int) -> np.ndarray:
  """Bucket of every (query, key) offset, [query_length, key_length], int32.

  Half the buckets hold exact small offsets; the rest cover offsets up to
  `max_distance` on a log scale. Bidirectional buckets (encoder) keep the sign
  of the offset; unidirectional ones (decoder) look only backwards. The log is
  taken in float32, as the original Mesh TensorFlow T5 does, so bucket edges
  agree with every released checkpoint's training.
  """
  query = np.arange(query_length, dtype=np.int64)[:, None]
  key = np.arange(key_length, dtype=np.int64)[None, :]
  offset = key - query  # > 0: the key is after the query.
  bucket = np.zeros_like(offset)
  if bidirectional:
    num_buckets //= 2
    bucket += (offset > 0).astype(np.int64) * num_buckets
    distance = np.abs(offset)
  else:
    distance = np.maximum(-offset, 0)
  num_exact = num_buckets // 2
  is_exact = distance < num_exact
  with np.errstate(divide='ignore'):
    log_ratio = (np.log(distance.astype(np.float32) / np.float32(num_exact)) /
                 np.float32(np.log(max_distance / num_exact)))
  # Truncate before adding num_exact: float32 addition could round up.
  scaled = np.where(is_exact, 0, log_ratio * np.float32(num_buckets - num_exact))
  log_bucket = num_exact + scaled.astype(np.int64)
  log_bucket = np.minimum(log_bucket, num_buckets - 1)
  bucket += np.where(is_exact, distance, log_bucket)
  return bucket.astype(np.int32)


def _dtype(name: str):
  return jnp.dtype(name)


class Kernel(nn.Module):
  """A bare weight matrix `kernel`; calling it returns the kernel.

  The layers below take kernels rather than dense sub-layers so that they can
  concatenate the query/key/value (or gated MLP) kernels into one matmul.
  """
  shape: Tuple[int, ...]
  stddev: float
  param_dtype: str

  @nn.compact
  def __call__(self) -> Array:
    init = nn.initializers.normal(stddev=self.stddev)
    return self.param('kernel', init, self.shape, _dtype(self.param_dtype))


# Kernels that are used side by side, joined along their output axis so
# that one matmul does the work of several. With a model axis of m devices
# the output axis is laid out in m blocks, block i holding the i-th m-th of
# every kernel ([q_0 k_0 v_0 | q_1 k_1 v_1 | ...]), so that splitting it
# over the model axis gives each device whole heads (or MLP columns) of
# every part and no data moves; with m = 1 this is plain concatenation.
# `prepare_variables` computes these once per model; without it they are
# joined on every call.
FUSED_GROUPS = {
    'qkv': ('query', 'key', 'value'),
    'q': ('query',),
    'kv': ('key', 'value'),
    'wi': ('wi_0', 'wi_1'),
}
PREPARED = 'prepared'


def fused_kernel(module: nn.Module, group: str, kernels) -> Array:
  """`kernels()` joined [d_model, n * out] in the activation dtype and the
  block layout above, taken from the 'prepared' collection when
  `prepare_variables` stored it there."""
  if module.has_variable(PREPARED, group):
    return module.get_variable(PREPARED, group)
  dtype = _dtype(module.config.dtype)
  parts = [k.astype(dtype) for k in kernels()]
  if len(parts) == 1:
    return parts[0]
  blocks = module.config.model_axis_size
  d_model, out = parts[0].shape
  # n x [d_model, out] -> [d_model, blocks, n, out / blocks]
  fused = jnp.stack([p.reshape(d_model, blocks, out // blocks)
                     for p in parts], axis=2)
  fused = fused.reshape(d_model, len(parts) * out)
  if module.is_mutable_collection(PREPARED):
    module.put_variable(PREPARED, group, fused)
  return fused


# Every product of the network accumulates in float32, whatever its
# operands' dtype: with bfloat16 activations the operands are bfloat16 and
# the sums float32 (`preferred_element_type`), as on TPUs and GPUs. On a CPU
# with bfloat16 dot instructions (AMX, AVX512_BF16) that form is also the
# fast one: on a 2-core Xeon with AMX, [4096 x 512] @ [512 x 1024] ran at
# 1,571 GFLOP/s, against 275 in float32 and 235 with bfloat16 sums. The
# result is cast back to the operands' dtype, except where float32 is kept
# (attention and output logits, which softmax and arg-max read).
def _accumulating(product):
  def call(*operands, keep_float32: bool = False):
    arrays = [o for o in operands if not isinstance(o, str)]
    result = product(*operands, preferred_element_type=jnp.float32)
    return result if keep_float32 else result.astype(
        jnp.result_type(*arrays))
  return call


dot = _accumulating(jnp.dot)
matmul = _accumulating(jnp.matmul)
einsum = _accumulating(jnp.einsum)


def fused_matmul(x: Array, fused: Array, parts: int, blocks: int,
                 keep_float32: bool = False) -> List[Array]:
  """x [..., d_model] times each of the `parts` kernels joined in `fused`
  (block layout of `blocks`): `parts` arrays [..., out], from one matmul
  (float32 sums kept with `keep_float32`)."""
  projected = dot(x.astype(fused.dtype), fused, keep_float32=keep_float32)
  if parts == 1:
    return [projected]
  out = fused.shape[-1] // parts
  # [..., parts * out] -> [..., blocks, parts, out / blocks]
  projected = projected.reshape(projected.shape[:-1] +
                                (blocks, parts, out // blocks))
  return [projected[..., i, :].reshape(projected.shape[:-3] + (out,))
          for i in range(parts)]


class RMSNorm(nn.Module):
  """T5's layer norm: rescale by the root mean square, no bias, no centering."""
  config: T5Config

  @nn.compact
  def __call__(self, x: Array) -> Array:
    cfg = self.config
    scale = self.param('scale', nn.initializers.ones, (cfg.d_model,),
                       _dtype(cfg.param_dtype))
    x = x.astype(jnp.float32)
    variance = jnp.mean(jnp.square(x), axis=-1, keepdims=True)
    x = x * jax.lax.rsqrt(variance + cfg.layer_norm_epsilon)
    return (x * scale.astype(jnp.float32)).astype(_dtype(cfg.dtype))


class Embed(nn.Module):
  """The token embedding, shared by encoder, decoder and (T5 1.0) logits."""
  config: T5Config

  def setup(self):
    cfg = self.config
    self.embedding = self.param('embedding',
                                nn.initializers.normal(stddev=1.0),
                                (cfg.vocab_size, cfg.d_model),
                                _dtype(cfg.param_dtype))

  def __call__(self, tokens: Array) -> Array:
    """[...] int -> [..., d_model]: a gather, not a one-hot matmul.

    A 16-bit float table is gathered through its bits (uint16): on a
    float table XLA's CPU backend moves the later cast to float32 ahead of
    the gather, converting the whole table (16M values for T5 1.1 small)
    on every call to read a few rows."""
    table = self.table()
    if jnp.issubdtype(table.dtype, jnp.floating) and table.dtype.itemsize == 2:
      bits = jax.lax.bitcast_convert_type(table, jnp.uint16)
      return jax.lax.bitcast_convert_type(jnp.take(bits, tokens, axis=0),
                                          table.dtype)
    return jnp.take(table, tokens, axis=0)

  def table(self) -> Array:
    return self.embedding.astype(_dtype(self.config.dtype))


class RelativePositionBias(nn.Module):
  """Learned per-head bias for each relative-position bucket."""
  config: T5Config
  bidirectional: bool

  @nn.compact
  def __call__(self, query_length: int, key_length: int) -> Array:
    """[heads, query_length, key_length] float32 bias."""
    cfg = self.config
    rel_embedding = self.param(
        'rel_embedding', nn.initializers.normal(stddev=1.0),
        (cfg.num_heads, cfg.relative_attention_num_buckets),
        _dtype(cfg.param_dtype))
    buckets = relative_position_buckets(
        query_length, key_length, bidirectional=self.bidirectional,
        num_buckets=cfg.relative_attention_num_buckets,
        max_distance=cfg.relative_attention_max_distance)
    # [heads, buckets] -> [heads, query_length, key_length]
    return jnp.take(rel_embedding.astype(jnp.float32), jnp.asarray(buckets),
                    axis=1)


class MultiHeadAttention(nn.Module):
  """Dot-product attention without the 1/sqrt(d_kv) scale (T5 folds it into
  the query initialisation)."""
  config: T5Config

  def setup(self):
    cfg = self.config
    inner = cfg.num_heads * cfg.d_kv
    dtype = cfg.param_dtype
    self.query = Kernel((cfg.d_model, inner), (cfg.d_model * cfg.d_kv)**-0.5,
                        dtype)
    self.key = Kernel((cfg.d_model, inner), cfg.d_model**-0.5, dtype)
    self.value = Kernel((cfg.d_model, inner), cfg.d_model**-0.5, dtype)
    self.out = Kernel((inner, cfg.d_model), inner**-0.5, dtype)

  def _split_heads(self, x: Array) -> Array:
    # [batch, length, heads * d_kv] -> [batch, length, heads, d_kv]
    return x.reshape(x.shape[:-1] + (self.config.num_heads, self.config.d_kv))

  def _project(self, x: Array, group: str) -> List[Array]:
    names = FUSED_GROUPS[group]
    fused = fused_kernel(self, group,
                         lambda: [getattr(self, n)() for n in names])
    # [batch, length, d_model] -> n x [batch, length, heads, d_kv]
    return [self._split_heads(p) for p in fused_matmul(
        x, fused, len(names), self.config.model_axis_size)]

  def project_qkv(self, x: Array) -> List[Array]:
    return self._project(x, 'qkv')

  def project_q(self, x: Array) -> Array:
    return self._project(x, 'q')[0]

  def project_kv(self, x: Array) -> List[Array]:
    return self._project(x, 'kv')

  def attend(self, query: Array, key: Array, value: Array,
             bias: Array) -> Array:
    """Attention output for `query` over `key`/`value`.

    query [batch, q_len, heads, d_kv]; key, value [batch, k_len, heads, d_kv];
    bias broadcastable to [batch, heads, q_len, k_len] (float32, holding the
    relative position bias and MASK_VALUE where attention is not allowed).
    Returns [batch, q_len, d_model].
    """
    dtype = _dtype(self.config.dtype)
    # Heads moved next to batch first: XLA's CPU backend runs the batched
    # matmuls a third faster in this form than straight from the einsum.
    query = query.transpose(0, 2, 1, 3)  # [batch, heads, q_len, d_kv]
    key = key.transpose(0, 2, 3, 1)  # [batch, heads, d_kv, k_len]
    value = value.transpose(0, 2, 1, 3)  # [batch, heads, k_len, d_kv]
    # [batch, heads, q_len, k_len], float32
    logits = matmul(query, key, keep_float32=True)
    weights = jax.nn.softmax(logits + bias, axis=-1)
    context = matmul(weights.astype(dtype), value)
    # [batch, heads, q_len, d_kv] -> [batch, q_len, heads * d_kv]
    context = context.transpose(0, 2, 1, 3)
    context = context.reshape(context.shape[:2] + (-1,))
    return dot(context, self.out().astype(dtype))

  def attend_step(self, query: Array, key: Array, value: Array,
                  bias: Array) -> Array:
    """`attend` for one query per sequence (a decoding step).

    query [batch, 1, heads, d_kv]; key, value [batch, heads, k_len, d_kv]
    (the step layout: heads next to batch, as the decoding cache and the
    cross-attention keys/values are kept); bias broadcastable to
    [batch, heads, 1, k_len]. Returns [batch, 1, d_model]. In this layout
    both products are matmuls batched over (batch, heads) with no
    transposes of the keys or values, which XLA's CPU backend runs at
    memory speed (4x faster than multiply-and-reduce over 8 layers of
    128 x 38 cross-attention keys and values).
    """
    dtype = _dtype(self.config.dtype)
    query = query.transpose(0, 2, 1, 3)  # [batch, heads, 1, d_kv]
    logits = einsum('bhqd,bhkd->bhqk', query, key, keep_float32=True)
    weights = jax.nn.softmax(logits + bias, axis=-1)
    context = einsum('bhqk,bhkd->bhqd', weights.astype(dtype), value)
    # [batch, heads, 1, d_kv] -> [batch, 1, heads * d_kv]
    context = context.transpose(0, 2, 1, 3).reshape(context.shape[0], 1, -1)
    return dot(context, self.out().astype(dtype))


class MlpBlock(nn.Module):
  """T5's feed-forward block: ReLU (T5 1.0) or a gated activation (T5 1.1)."""
  config: T5Config

  def setup(self):
    cfg = self.config
    dtype = cfg.param_dtype
    if cfg.gated:
      self.wi_0 = Kernel((cfg.d_model, cfg.d_ff), cfg.d_model**-0.5, dtype)
      self.wi_1 = Kernel((cfg.d_model, cfg.d_ff), cfg.d_model**-0.5, dtype)
    else:
      self.wi = Kernel((cfg.d_model, cfg.d_ff), cfg.d_model**-0.5, dtype)
    self.wo = Kernel((cfg.d_ff, cfg.d_model), cfg.d_ff**-0.5, dtype)

  def __call__(self, x: Array) -> Array:
    cfg = self.config
    dtype = _dtype(cfg.dtype)
    activation = {
        'relu': jax.nn.relu,
        'gelu': lambda h: jax.nn.gelu(h, approximate=True),
        'silu': jax.nn.silu,
    }[cfg.activation]
    x = x.astype(dtype)
    # The activation reads the products' float32 sums and is rounded to the
    # activation dtype once: computed in bfloat16, every one of its dozen
    # elementwise steps was rounded on its own, which on a CPU (no bfloat16
    # arithmetic) made the gated GELU cost as much as a matmul.
    if cfg.gated:
      fused = fused_kernel(self, 'wi', lambda: [self.wi_0(), self.wi_1()])
      # [batch, length, d_model] -> 2 x [batch, length, d_ff]
      gate, linear = fused_matmul(x, fused, 2, cfg.model_axis_size,
                                  keep_float32=True)
      hidden = activation(gate) * linear
    else:
      hidden = activation(dot(x, self.wi().astype(dtype), keep_float32=True))
    # [batch, length, d_ff] -> [batch, length, d_model]
    return dot(hidden.astype(dtype), self.wo().astype(dtype))


class EncoderLayer(nn.Module):
  config: T5Config

  def setup(self):
    self.pre_attention_layer_norm = RMSNorm(self.config)
    self.attention = MultiHeadAttention(self.config)
    self.pre_mlp_layer_norm = RMSNorm(self.config)
    self.mlp = MlpBlock(self.config)

  def __call__(self, x: Array, bias: Array) -> Array:
    h = self.pre_attention_layer_norm(x)
    query, key, value = self.attention.project_qkv(h)
    x = x + self.attention.attend(query, key, value, bias)
    return x + self.mlp(self.pre_mlp_layer_norm(x))


class DecoderLayer(nn.Module):
  config: T5Config

  def setup(self):
    cfg = self.config
    self.pre_self_attention_layer_norm = RMSNorm(cfg)
    self.self_attention = MultiHeadAttention(cfg)
    self.pre_cross_attention_layer_norm = RMSNorm(cfg)
    self.encoder_decoder_attention = MultiHeadAttention(cfg)
    self.pre_mlp_layer_norm = RMSNorm(cfg)
    self.mlp = MlpBlock(cfg)

  def cross_kv(self, encoded: Array) -> KeyValue:
    key, value = self.encoder_decoder_attention.project_kv(encoded)
    return key, value

  def __call__(self, x: Array, self_bias: Array, cross: KeyValue,
               cross_bias: Array) -> Array:
    """Teacher-forced pass over whole target sequences."""
    h = self.pre_self_attention_layer_norm(x)
    query, key, value = self.self_attention.project_qkv(h)
    x = x + self.self_attention.attend(query, key, value, self_bias)
    return self._cross_and_mlp(x, cross, cross_bias)

  def step(self, x: Array, index: Array, cache: KeyValue, self_bias: Array,
           cross: KeyValue, cross_bias: Array) -> Tuple[Array, KeyValue]:
    """One position per sequence: x [batch, 1, d_model] at `index`.

    Writes this position's key and value into the cache and attends over the
    cache. Cache and cross keys/values are [batch, heads, length, d_kv];
    biases are in `attend_step`'s layout: self_bias [1, heads, 1, length]
    (masking the positions not yet written), cross_bias [batch, 1, 1,
    in_len].
    """
    h = self.pre_self_attention_layer_norm(x)
    query, key, value = self.self_attention.project_qkv(h)
    cached_key, cached_value = cache
    start = (0, 0, index, 0)
    # [batch, 1, heads, d_kv] -> [batch, heads, 1, d_kv]
    cached_key = jax.lax.dynamic_update_slice(
        cached_key, key.transpose(0, 2, 1, 3).astype(cached_key.dtype), start)
    cached_value = jax.lax.dynamic_update_slice(
        cached_value, value.transpose(0, 2, 1, 3).astype(cached_value.dtype),
        start)
    x = x + self.self_attention.attend_step(query, cached_key, cached_value,
                                            self_bias)
    h = self.pre_cross_attention_layer_norm(x)
    query = self.encoder_decoder_attention.project_q(h)
    x = x + self.encoder_decoder_attention.attend_step(query, cross[0],
                                                       cross[1], cross_bias)
    x = x + self.mlp(self.pre_mlp_layer_norm(x))
    return x, (cached_key, cached_value)

  def _cross_and_mlp(self, x: Array, cross: KeyValue,
                     cross_bias: Array) -> Array:
    h = self.pre_cross_attention_layer_norm(x)
    query = self.encoder_decoder_attention.project_q(h)
    x = x + self.encoder_decoder_attention.attend(query, cross[0], cross[1],
                                                  cross_bias)
    return x + self.mlp(self.pre_mlp_layer_norm(x))


def _padding_bias(mask: Array) -> Array:
  """[batch, k_len] bool (True = attend) -> [batch, 1, 1, k_len] float32."""
  return jnp.where(mask, 0.0, MASK_VALUE).astype(jnp.float32)[:, None, None, :]


class Encoder(nn.Module):
  config: T5Config

  def setup(self):
    cfg = self.config
    self.relpos_bias = RelativePositionBias(cfg, bidirectional=True)
    self.layers = [EncoderLayer(cfg) for _ in range(cfg.num_encoder_layers)]
    self.encoder_norm = RMSNorm(cfg)

  def __call__(self, x: Array, mask: Array) -> Array:
    """x [batch, length, d_model] embedded inputs; mask [batch, length]."""
    length = x.shape[1]
    # [heads, length, length] + [batch, 1, 1, length]
    bias = self.relpos_bias(length, length)[None] + _padding_bias(mask)
    for layer in self.layers:
      x = layer(x, bias)
    return self.encoder_norm(x)


class Decoder(nn.Module):
  config: T5Config

  def setup(self):
    cfg = self.config
    self.relpos_bias = RelativePositionBias(cfg, bidirectional=False)
    self.layers = [DecoderLayer(cfg) for _ in range(cfg.num_decoder_layers)]
    self.decoder_norm = RMSNorm(cfg)
    if not cfg.logits_via_embedding:
      self.logits_dense = Kernel((cfg.d_model, cfg.vocab_size), 1.0,
                                 cfg.param_dtype)

  def self_attention_bias(self, length: int) -> Array:
    """[heads, length, length]: relative position bias plus the causal mask."""
    causal = np.tril(np.ones((length, length), dtype=bool))
    return self.relpos_bias(length, length) + jnp.where(causal, 0.0,
                                                        MASK_VALUE)

  def cross_kv(self, encoded: Array) -> List[KeyValue]:
    return [layer.cross_kv(encoded) for layer in self.layers]

  def logits_input(self, x: Array) -> Array:
    """The final norm (and T5 1.0's scaling): what the output layer
    multiplies, [..., d_model]."""
    x = self.decoder_norm(x)
    if self.config.logits_via_embedding:
      x = x * (self.config.d_model**-0.5)
    return x

  def logits(self, x: Array, embedding: Array) -> Array:
    """Final norm and output projection, float32 logits [..., vocab]."""
    x = self.logits_input(x)
    if self.config.logits_via_embedding:
      return dot(x, embedding.T, keep_float32=True)
    return dot(x, self.logits_dense().astype(x.dtype), keep_float32=True)

  def __call__(self, x: Array, cross: List[KeyValue], encoder_mask: Array,
               embedding: Array) -> Array:
    self_bias = self.self_attention_bias(x.shape[1])[None]
    cross_bias = _padding_bias(encoder_mask)
    for layer, layer_cross in zip(self.layers, cross):
      x = layer(x, self_bias, layer_cross, cross_bias)
    return self.logits(x, embedding)

  def step(self, x: Array, index: Array, cache: List[KeyValue],
           self_bias: Array, cross: List[KeyValue], cross_bias: Array,
           embedding: Array, return_hidden: bool = False
           ) -> Tuple[Array, List[KeyValue]]:
    new_cache = []
    for layer, layer_cache, layer_cross in zip(self.layers, cache, cross):
      x, layer_cache = layer.step(x, index, layer_cache, self_bias,
                                  layer_cross, cross_bias)
      new_cache.append(layer_cache)
    if return_hidden:
      return self.logits_input(x), new_cache
    return self.logits(x, embedding), new_cache


class Transformer(nn.Module):
  """The T5 encoder-decoder. Token id 0 is padding in encoder inputs."""
  config: T5Config

  def setup(self):
    self.token_embedder = Embed(self.config)
    self.encoder = Encoder(self.config)
    self.decoder = Decoder(self.config)

  def encode(self, encoder_input_tokens: Array) -> Array:
    """[batch, in_len] int -> [batch, in_len, d_model]."""
    encoder_input_tokens = partitioning.constrain(encoder_input_tokens,
                                                  ('batch', 'length'))
    mask = encoder_input_tokens > 0
    return self.encoder(self.token_embedder(encoder_input_tokens), mask)

  def precompute_cross_kv(self, encoded: Array) -> List[KeyValue]:
    """Every decoder layer's cross-attention keys and values, computed once:
    [batch, in_len, heads, d_kv] each."""
    return self.decoder.cross_kv(encoded)

  def step_cross_kv(self, encoded: Array) -> List[KeyValue]:
    """`precompute_cross_kv` in the layout decoding steps read:
    [batch, heads, in_len, d_kv] each."""
    return [(partitioning.constrain(k.transpose(0, 2, 1, 3), CACHE_AXES),
             partitioning.constrain(v.transpose(0, 2, 1, 3), CACHE_AXES))
            for k, v in self.decoder.cross_kv(encoded)]

  def __call__(self, encoder_input_tokens: Array,
               decoder_input_tokens: Array) -> Array:
    """Teacher-forced logits [batch, target_len, vocab], float32."""
    encoded = self.encode(encoder_input_tokens)
    cross = self.precompute_cross_kv(encoded)
    embedded = self.token_embedder(decoder_input_tokens)
    return self.decoder(embedded, cross, encoder_input_tokens > 0,
                        self.token_embedder.table())

  def decoder_self_bias(self, length: int) -> Array:
    return self.decoder.self_attention_bias(length)

  def decode_step(self, tokens: Array, index: Array, cache: List[KeyValue],
                  self_bias_table: Array, cross: List[KeyValue],
                  encoder_mask: Array, return_hidden: bool = False
                  ) -> Tuple[Array, List[KeyValue]]:
    """Logits [batch, vocab] for `tokens` [batch] placed at position `index`,
    or with `return_hidden` what the output layer multiplies [batch,
    d_model] (`Decoder.logits_input`).

    self_bias_table is `decoder_self_bias(cache_length)`, computed once per
    batch; this step slices out its row for `index`.
    """
    heads, length, _ = self_bias_table.shape
    # [heads, 1, length] -> [1, heads, 1, length]
    row = jax.lax.dynamic_slice(self_bias_table, (0, index, 0),
                                (heads, 1, length))[None]
    return self.decode_step_biased(tokens, index, cache, row, cross,
                                   encoder_mask, return_hidden)

  def decode_step_biased(self, tokens: Array, index: Array,
                         cache: List[KeyValue], self_bias: Array,
                         cross: List[KeyValue], encoder_mask: Array,
                         return_hidden: bool = False
                         ) -> Tuple[Array, List[KeyValue]]:
    """`decode_step` with the self-attention bias over the cache given,
    broadcastable to [batch, heads, 1, cache_length]: the step's keys and
    values are written at cache position `index` (one for every row), and
    each row may read the cache its own way (continuous batching keeps the
    cache as a ring whose rows began at different steps)."""
    x = self.token_embedder(tokens[:, None])  # [batch, 1, d_model]
    # [batch, in_len] -> [batch, 1, 1, in_len]
    cross_bias = jnp.where(encoder_mask, 0.0, MASK_VALUE)[:, None, None, :]
    outputs, cache = self.decoder.step(x, index, cache, self_bias, cross,
                                       cross_bias, self.token_embedder.table(),
                                       return_hidden)
    return outputs[:, 0, :], cache

  def init_cache(self, batch_size: int, length: int) -> List[KeyValue]:
    cfg = self.config
    shape = (batch_size, cfg.num_heads, length, cfg.d_kv)
    dtype = _dtype(cfg.dtype)

    def zeros():
      return partitioning.constrain(jnp.zeros(shape, dtype), CACHE_AXES)
    return [(zeros(), zeros()) for _ in range(cfg.num_decoder_layers)]


# The logical axes of every variable, by its name (the rules in
# model.partitioning say which mesh axis each lives on).
_KERNEL_AXES = {
    'query': ('embed', 'joined_kv'), 'key': ('embed', 'joined_kv'),
    'value': ('embed', 'joined_kv'), 'out': ('joined_kv', 'embed'),
    'wi': ('embed', 'mlp'), 'wi_0': ('embed', 'mlp'),
    'wi_1': ('embed', 'mlp'), 'wo': ('mlp', 'embed'),
    'logits_dense': ('embed', 'vocab'),
}
_PREPARED_AXES = {'qkv': ('embed', 'joined_kv'), 'kv': ('embed', 'joined_kv'),
                  'wi': ('embed', 'mlp')}
# Decoding caches and cross-attention keys/values, [batch, heads, len, d_kv].
CACHE_AXES = ('batch', 'heads', 'length', 'kv')


def logical_axes(path: Tuple[str, ...]) -> Tuple[Optional[str], ...]:
  """The logical axes of the variable at `path` (its keys from the top of
  `{'params': ...}` or `{'prepared': ...}`)."""
  collection, name = path[0], path[-1]
  if collection == PREPARED:
    return _PREPARED_AXES[name]
  if name == 'embedding':
    return ('vocab', 'embed')
  if name == 'rel_embedding':
    return ('heads', 'relpos_buckets')
  if name == 'scale':
    return ('embed',)
  return _KERNEL_AXES[path[-2]]  # .../<kernel name>/kernel


def variables_logical_axes(variables) -> Any:
  """A tree like `variables` with each array's logical axes."""
  return jax.tree_util.tree_map_with_path(
      lambda path, _: logical_axes(tuple(k.key for k in path)), variables)


# Which group of FUSED_GROUPS each module kind joins: the calls it makes
# (self-attention projects q, k and v together; cross-attention projects
# its query alone, from the decoder, and keys and values from the encoder).
_MODULE_GROUPS = {'attention': 'qkv', 'self_attention': 'qkv',
                  'encoder_decoder_attention': 'kv', 'mlp': 'wi'}


def is_fused_kernel(name: str) -> bool:
  """Whether the parameter '/'-named `name` is one of the kernels
  `prepare_variables` joins (and keeps in the activation dtype)."""
  parts = name.split('/')
  if len(parts) < 3 or parts[-1] != 'kernel':
    return False
  kernels = FUSED_GROUPS.get(_MODULE_GROUPS.get(parts[-3], ''), ())
  return len(kernels) > 1 and parts[-2] in kernels


@functools.partial(jax.jit, static_argnames=('dtype', 'blocks', 'sharding'))
def _join(parts, dtype: str, blocks: int, sharding=None) -> Array:
  """Kernels [d_model, out] joined in the block layout of `fused_kernel`,
  laid out as `sharding` says (the parts' own, so each device joins its
  blocks: both split their last axis over the model axis)."""
  parts = [p.astype(_dtype(dtype)) for p in parts]
  d_model, out = parts[0].shape
  fused = jnp.stack([p.reshape(d_model, blocks, out // blocks)
                     for p in parts], axis=2)
  fused = fused.reshape(d_model, len(parts) * out)
  if sharding is not None:
    fused = jax.lax.with_sharding_constraint(fused, sharding)
  return fused


def prepare_variables(module: Transformer, params,
                      consume: bool = False) -> Dict[str, Any]:
  """{'params': ..., 'prepared': ...}: the variables inference applies.

  Joins every group of FUSED_GROUPS kernels once (in the activation dtype,
  in `fused_kernel`'s layout) into the 'prepared' collection and drops the
  kernels so joined from 'params', so memory stays that of the parameters
  and no call re-joins. One group is joined at a time; with `consume`,
  `params` itself is emptied as it goes, so each group's kernels are freed
  as soon as their join exists (peak memory: the parameters plus one
  group), else `params` is left as it was.
  """
  cfg = module.config

  def visit(node: Dict[str, Any], name: str) -> Dict[str, Any]:
    """The prepared variables under `node` (a module named `name`),
    popping the kernels it joins from `node`."""
    prepared = {}
    group = _MODULE_GROUPS.get(name)
    kernels = FUSED_GROUPS.get(group, ())
    if group and len(kernels) > 1 and all(k in node for k in kernels):
      parts = [node.pop(k)['kernel'] for k in kernels]
      sharding = getattr(parts[0], 'sharding', None)
      prepared[group] = _join(
          parts, cfg.dtype, cfg.model_axis_size,
          sharding if isinstance(sharding, jax.sharding.NamedSharding)
          else None)
      prepared[group].block_until_ready()
      freed = sum(part.nbytes for part in parts)
      del parts
      if consume:
        runtime.release_freed_memory(freed)
    for child, value in node.items():
      if isinstance(value, dict) and child != 'kernel':
        inner = visit(value, child)
        if inner:
          prepared[child] = inner
    return prepared

  def copy(node):
    return {k: copy(v) if isinstance(v, dict) else v for k, v in node.items()}

  if not (consume and isinstance(params, dict)):
    params = copy(flax.core.unfreeze(params))
  prepared = visit(params, '')
  return {'params': params, PREPARED: prepared}


def init_params(config: T5Config, seed: int = 0):
  """Random parameters of `config`'s network (the `params` collection)."""
  module = Transformer(config)
  tokens = jnp.ones((1, 2), jnp.int32)
  variables = jax.jit(module.init)(jax.random.PRNGKey(seed), tokens, tokens)
  return variables['params']
