"""The model side the pipeline calls: load once, then run fixed-shape batches.

    model = InferenceModel.load('/path/to/checkpoint', dtype='float32')
    tokens = model.predict_batch(batch)            # [batch, target_len]
    tokens, scores = model.predict_batch(batch, return_scores=True)
    scores = model.score_batch(batch)              # [batch]
    tokens = model.predict_examples(inputs, batch_size=32, max_length=L)

`predict_examples` and `score_examples` take any number of examples and
cut them into model calls by a `model.batching.Batching` (continuous by
default).

A batch is a dict of numpy int arrays as SeqIO's `EncDecFeatureConverter`
gives them: `encoder_input_tokens` [batch, in_len] and, for the decoded
length and for scoring, `decoder_input_tokens`, `decoder_target_tokens`,
`decoder_loss_weights` [batch, target_len]. Each distinct shape compiles once.
"""

import concurrent.futures
import functools
import logging
import os
import time
from typing import Any, Dict, Mapping, Optional, Sequence, Tuple, Union

import jax
import numpy as np

from model import batching as batching_lib
from model import checkpoints
from model import decoding as decoding_lib
from model import partitioning as partitioning_lib
from model import screened_argmax
from model.config import DEFAULT_RESTORE_DTYPE, T5Config
from model.network import (PREPARED, Transformer, logical_axes,
                           prepare_variables, variables_logical_axes)

Batch = Mapping[str, np.ndarray]

# On CPU a batch of at least this many examples is decoded as two halves at
# once (see `InferenceModel.concurrent_halves`).
_MIN_EXAMPLES_TO_HALVE = 64


def _halve_on_cpu_by_default() -> bool:
  return jax.default_backend() == 'cpu' and (os.cpu_count() or 1) >= 2


class InferenceModel:
  """A T5 model with its parameters placed on this process's devices: on
  the default device, or over a ('data', 'model') mesh of every local
  device (`partitioning`)."""

  def __init__(self, config: T5Config, params,
               concurrent_halves: Optional[bool] = None,
               screen_argmax: Optional[bool] = None,
               partitioning: Optional[partitioning_lib.Partitioning] = None,
               devices: Optional[Sequence[Any]] = None):
    """`concurrent_halves`: decode big batches as two halves running at once
    (default: on a CPU backend with at least 2 cores). XLA's CPU matmuls
    keep both cores busy, but a decoding step also has memory-bound work
    (cross-attention over the cached keys/values, the argmax over the
    vocabulary, layer norms) during which one core idles; two independent
    halves fill each other's gaps, about 4% more examples/s at batch 128
    with the same tokens (`bench/nq_small_greedy.py`). Samples are the
    same too: each example draws from its own key. Continuous batching
    runs one queue (see `_decode_continuously`).

    `screen_argmax`: greedy decoding without scores finds each step's arg-max
    with a bfloat16 output layer checked against float32 error bounds (the
    same tokens; `model.screened_argmax`), default where that is faster:
    float32 activations on a CPU with bfloat16 dot instructions. It keeps
    a transposed float32 and a bfloat16 copy of the output layer (T5 1.1
    small: 99 MB).

    `partitioning` (T5X's PjitPartitioner settings): with it, the model
    runs on a mesh of `devices` (default: every local device) when that
    has more than one device: parameters split by the logical axis rules
    (each device holds its share of a partitioned parameter), each batch
    split over the data axis. The concurrent halves and the screened
    arg-max are off on a mesh (the data axis already splits the batch; the
    screen's error bound is for CPU float32 only).
    """
    prepared = set(params) == {'params', PREPARED}  # from `load`
    if not prepared:
      checkpoints.check_shapes(config, params, source='the given parameters')
    self.partitioning = partitioning or partitioning_lib.Partitioning()
    self.mesh = _mesh(partitioning, devices)
    # Without a mesh: the one device given, else the default one.
    self._device = devices[0] if devices and self.mesh is None else None
    if self.mesh is not None:
      self.partitioning.check_model(config)
    config = config.replace(model_axis_size=self.mesh.shape[
        partitioning_lib.MODEL] if self.mesh is not None else 1)
    self.config = config
    if concurrent_halves is None:
      concurrent_halves = _halve_on_cpu_by_default() and self.mesh is None
    elif concurrent_halves and self.mesh is not None:
      raise ValueError('the concurrent halves run on one device, not on a '
                       f'mesh of {self.mesh.size} (its data axis already '
                       'splits the batch); leave concurrent_halves unset')
    self.concurrent_halves = concurrent_halves
    self._halves_pool = None
    self.module = Transformer(config)
    # Only the prepared variables are kept: fused kernels replace the
    # kernels they were made from, so memory stays that of the checkpoint.
    if prepared:
      self.variables = self._place(params)
    else:
      self.variables = self._place(prepare_variables(self.module,
                                                     self._place(params)))
    if screen_argmax is None:
      screen_argmax = (self.mesh is None and screened_argmax.worthwhile(
          config.vocab_size, config.dtype))
    elif screen_argmax:
      if self.mesh is not None:
        raise ValueError('the screened arg-max runs on one device, not on '
                         f'a mesh of {self.mesh.size}; leave screen_argmax '
                         'unset')
      screened_argmax.check_applicable(config.dtype)
    self.argmax_screen = None
    if screen_argmax:
      self.argmax_screen = jax.jit(screened_argmax.make_screen)(
          screened_argmax.output_rows(self.variables['params'],
                                      config.logits_via_embedding))
    self._decode = jax.jit(
        functools.partial(decoding_lib.decode, self.module),
        static_argnames=('max_length', 'eos_id', 'config', 'return_scores'))
    self._continuous = jax.jit(
        functools.partial(decoding_lib.continuous_decode, self.module),
        static_argnames=('slots', 'group', 'buckets', 'max_length', 'eos_id',
                         'config', 'return_scores'))
    self._score = jax.jit(
        functools.partial(decoding_lib.token_log_likelihoods, self.module))

  def _placement(self):
    """The context decoding and scoring are traced in: activations are
    placed on the mesh by the logical axis rules (nothing without one)."""
    return partitioning_lib.active(self.mesh,
                                   self.partitioning.logical_axis_rules)

  def _place(self, variables):
    """`variables` on the device, or split over the mesh by their logical
    axes (each device receives only its part of each array)."""
    if self.mesh is None:
      return jax.device_put(variables, self._device)
    axes = variables_logical_axes(variables)
    return jax.device_put(variables, partitioning_lib.shardings(
        axes, self.mesh, self.partitioning.logical_axis_rules))

  def _place_batch(self, *arrays: np.ndarray):
    """Batch-major arrays split over the data axis (as they are without a
    mesh); the batch must divide evenly."""
    if self.mesh is None:
      return arrays
    partitioning_lib.check_batch(arrays[0].shape[0], self.mesh)
    return tuple(jax.device_put(a, jax.sharding.NamedSharding(
        self.mesh, jax.sharding.PartitionSpec(partitioning_lib.DATA)))
                 for a in arrays)

  @property
  def mesh_shape(self) -> Dict[str, int]:
    """{'data': d, 'model': m} of the devices this model runs on."""
    if self.mesh is None:
      return {partitioning_lib.DATA: 1, partitioning_lib.MODEL: 1}
    return dict(self.mesh.shape)

  @classmethod
  def load(cls, path: str, config: Optional[T5Config] = None,
           dtype: str = DEFAULT_RESTORE_DTYPE,
           activation_dtype: Optional[str] = None,
           **options) -> 'InferenceModel':
    """Reads the checkpoint at `path` (see `model.checkpoints`).

    `dtype` is the dtype parameters are restored in; activations use
    `activation_dtype`, by default the same. `options` go to the
    constructor.
    """
    start = time.perf_counter()
    partitioning = options.get('partitioning')
    mesh = _mesh(partitioning, options.get('devices'))
    architecture = config or checkpoints.read_config(path)
    if mesh is not None and architecture is not None:
      partitioning.check_model(architecture)  # before placing anything
    config, params = checkpoints.load_checkpoint(
        path, config, dtype, shardings=_parameter_shardings(
            mesh, partitioning, options.get('devices')))
    config = config.replace(
        dtype=activation_dtype or dtype,
        model_axis_size=mesh.shape[partitioning_lib.MODEL] if mesh else 1)
    if mesh is not None:
      partitioning.check_model(config)
    # Joined kernels replace their parts one group at a time, so memory
    # stays near the checkpoint's size.
    variables = prepare_variables(Transformer(config), params, consume=True)
    del params
    model = cls(config, variables, **options)
    logging.info('Loaded %s (%d parameters, %s) in %.1f s', path,
                 config.num_parameters(), dtype, time.perf_counter() - start)
    return model

  def predict_batch(self, batch: Batch, *, max_length: Optional[int] = None,
                    return_scores: bool = False, stop_at_eos: bool = True,
                    decoding: Optional[decoding_lib.DecodingConfig] = None,
                    rng: Optional[jax.Array] = None
                    ) -> Union[np.ndarray, Tuple[np.ndarray, np.ndarray]]:
    """Decodes the batch; greedy unless `decoding` says otherwise.

    Returns tokens [batch, max_length] int32 (0 after each EOS), or
    [batch, num_decodes, max_length] when `decoding.return_all_decodes`
    (sorted by increasing score, as T5X). `max_length` defaults to the width
    of `decoder_input_tokens` (the targets feature length, as in T5X). With
    `return_scores`, also each decode's log-likelihood (beam search: over
    the brevity penalty). `stop_at_eos=False` decodes exactly `max_length`
    tokens whatever is produced (for benchmarks).

    Sampling needs `rng`: either one key per example, [batch, 2] uint32
    (each example's samples then depend on its key alone, whatever batch or
    row it is in; the pipeline derives them from each example's identity),
    or one key (`jax.random.PRNGKey(seed)`), split into a key per row.
    """
    if max_length is None:
      if 'decoder_input_tokens' not in batch:
        raise ValueError('predict_batch needs max_length or a '
                         "'decoder_input_tokens' feature to size the output")
      max_length = batch['decoder_input_tokens'].shape[1]
    config = decoding or decoding_lib.DecodingConfig()
    encoder_input_tokens = np.asarray(batch['encoder_input_tokens'], np.int32)
    example_keys = _example_keys(rng, len(encoder_input_tokens),
                                 config.needs_rng)
    decode = functools.partial(
        self._decode, self.variables, max_length=max_length,
        eos_id=self.config.eos_id if stop_at_eos else None, config=config,
        return_scores=return_scores or config.strategy != 'greedy',
        argmax_screen=self.argmax_screen)
    tokens, scores = self._decode_in_halves(decode, encoder_input_tokens,
                                            example_keys)
    if not config.return_all_decodes:
      tokens, scores = tokens[:, -1], scores[:, -1]
    return (tokens, scores) if return_scores else tokens

  def _decode_in_halves(self, decode, encoder_input_tokens: np.ndarray,
                        example_keys: np.ndarray
                        ) -> Tuple[np.ndarray, np.ndarray]:
    """decode(encoder_input_tokens, example_keys) as numpy, in two
    concurrent halves when that is on and the batch is big and even (one
    compiled shape)."""
    def decode_to_numpy(tokens_and_keys):
      with self._placement():  # in this thread (the halves run in a pool)
        return tuple(np.asarray(x) for x in decode(
            *self._place_batch(*tokens_and_keys)))

    size = encoder_input_tokens.shape[0]
    if not (self.concurrent_halves and size % 2 == 0 and
            size >= _MIN_EXAMPLES_TO_HALVE):
      return decode_to_numpy((encoder_input_tokens, example_keys))
    if self._halves_pool is None:
      self._halves_pool = concurrent.futures.ThreadPoolExecutor(
          2, thread_name_prefix='t5beam-decode')
    # Each thread waits for its own result, so the two XLA executions run
    # side by side (JAX releases the GIL while waiting).
    halves = self._halves_pool.map(
        decode_to_numpy, zip(np.split(encoder_input_tokens, 2),
                             np.split(example_keys, 2)))
    first, second = list(halves)
    return tuple(np.concatenate(pair) for pair in zip(first, second))

  def predict_examples(
      self, encoder_input_tokens: np.ndarray, *, batch_size: int,
      max_length: int, return_scores: bool = False, stop_at_eos: bool = True,
      decoding: Optional[decoding_lib.DecodingConfig] = None,
      rng: Optional[jax.Array] = None,
      batching: batching_lib.Batching = batching_lib.Batching(),
      queue_rows: int = 0
  ) -> Union[np.ndarray, Tuple[np.ndarray, np.ndarray]]:
    """`predict_batch` over any number of examples [count, in_len], cut
    into model calls of `batch_size` rows by `batching` (see
    `model.batching`); the results are in the given order. `rng`: one key,
    or one per example (then each example's samples depend on its key
    alone, in every batching mode). `queue_rows`: continuous batching
    compiles one program per queue size, `batching.queue_size` of the
    larger of count and this (the pipeline gives its chunk size, so its
    last, shorter chunks reuse the program)."""
    config = decoding or decoding_lib.DecodingConfig()
    tokens_in = np.asarray(encoder_input_tokens, np.int32)
    count, in_len = tokens_in.shape
    keys = _example_keys(rng, count, config.needs_rng)
    mode = batching_lib.effective_mode(batching.mode, 'predict', config)
    buckets = batching.buckets(in_len)
    scored = return_scores or config.strategy != 'greedy'
    eos_id = self.config.eos_id if stop_at_eos else None
    if mode == 'continuous':
      order = batching_lib.length_order(tokens_in)
      sorted_tokens, sorted_scores = self._decode_continuously(
          tokens_in[order], keys[order], batch_size=batch_size,
          group=batching.group(batch_size), buckets=buckets,
          max_length=max_length, eos_id=eos_id, config=config,
          return_scores=scored, queue_rows=queue_rows)
      tokens = np.zeros_like(sorted_tokens)
      scores = np.zeros_like(sorted_scores)
      tokens[order], scores[order] = sorted_tokens, sorted_scores
    else:
      decode = functools.partial(
          self._decode, self.variables, max_length=max_length,
          eos_id=eos_id, config=config, return_scores=scored,
          argmax_screen=self.argmax_screen)
      widths = batching_lib.row_buckets(tokens_in, buckets)
      tokens = scores = None
      for width, rows in batching_lib.bucket_batches(widths, batch_size):
        batch_tokens, batch_keys = _fill_rows(
            batch_size, tokens_in[rows, :width], keys[rows])
        batch_out = self._decode_in_halves(decode, batch_tokens, batch_keys)
        if tokens is None:
          tokens = np.zeros((count,) + batch_out[0].shape[1:], np.int32)
          scores = np.zeros((count,) + batch_out[1].shape[1:], np.float32)
        tokens[rows], scores[rows] = (x[:len(rows)] for x in batch_out)
    if not config.return_all_decodes:
      tokens, scores = tokens[:, -1], scores[:, -1]
    return (tokens, scores) if return_scores else tokens

  def _decode_continuously(self, tokens: np.ndarray, keys: np.ndarray, *,
                           batch_size: int, group: int, queue_rows: int,
                           **settings):
    """continuous_decode of the examples (sorted by length) in a queue
    padded to `batching.queue_size` rows, with `batch_size` rows. Never in
    concurrent halves: two queues of half the rows each were 5% faster on
    nq-varlen at batch 128 but 20% slower where every answer is full
    length (`bench/nq_varlen.py --uniform`), where one queue keeps static
    batching's speed."""
    size = batching_lib.queue_size(max(len(tokens), queue_rows), batch_size)
    queue_tokens, queue_keys = _fill_rows(size, tokens, keys, repeat=False)
    with self._placement():
      out = self._continuous(
          self.variables, *self._place_batch(queue_tokens, queue_keys),
          np.int32(len(tokens)), slots=batch_size,
          argmax_screen=self.argmax_screen, group=min(group, batch_size),
          **settings)
      return tuple(np.asarray(x)[:len(tokens)] for x in out)

  def score_examples(self, features: Batch, *, batch_size: int,
                     batching: batching_lib.Batching = batching_lib.Batching()
                     ) -> Tuple[np.ndarray, np.ndarray]:
    """`score_batch(..., return_token_scores=True)` over any number of
    examples (stacked features), in batches of `batch_size` rows: unless
    batching is 'static', each example's inputs and targets are cut to the
    smallest buckets holding them, and batches group examples of the same
    buckets (so an example's scores do not depend on its batch)."""
    arrays = {name: np.asarray(features[name], np.int32) for name in
              ('encoder_input_tokens', 'decoder_input_tokens',
               'decoder_target_tokens')}
    arrays['decoder_loss_weights'] = np.asarray(
        features['decoder_loss_weights'] if 'decoder_loss_weights' in features
        else arrays['decoder_target_tokens'] > 0, np.int32)
    count, target_len = arrays['decoder_target_tokens'].shape
    in_buckets = batching.buckets(arrays['encoder_input_tokens'].shape[1])
    target_buckets = batching.buckets(target_len)
    # Each example at its own input and target buckets (positions past the
    # last weighted target add nothing to any score).
    pairs = (batching_lib.row_buckets(arrays['encoder_input_tokens'],
                                      in_buckets) * (target_len + 1) +
             batching_lib.row_buckets(arrays['decoder_loss_weights'],
                                      target_buckets))
    scores = np.zeros(count, np.float32)
    token_scores = np.zeros((count, target_len), np.float32)
    for pair, rows in batching_lib.bucket_batches(pairs, batch_size):
      width, target_width = divmod(pair, target_len + 1)
      batch = {name: _fill_rows(batch_size, array[rows, :(
          width if name == 'encoder_input_tokens' else target_width)])[0]
               for name, array in arrays.items()}
      batch_scores, batch_token_scores = self.score_batch(
          batch, return_token_scores=True)
      scores[rows] = batch_scores[:len(rows)]
      token_scores[rows, :target_width] = batch_token_scores[:len(rows)]
    return scores, token_scores

  def score_batch(self, batch: Batch, *, return_token_scores: bool = False
                  ) -> Union[np.ndarray, Tuple[np.ndarray, np.ndarray]]:
    """Log-likelihood of `decoder_target_tokens` per example, [batch].

    With `return_token_scores`, also the per-token log-likelihoods
    [batch, target_len] (0 where `decoder_loss_weights` is 0).
    """
    weights = batch.get('decoder_loss_weights')
    targets = np.asarray(batch['decoder_target_tokens'], np.int32)
    if weights is None:
      weights = targets > 0
    arrays = self._place_batch(
        np.asarray(batch['encoder_input_tokens'], np.int32),
        np.asarray(batch['decoder_input_tokens'], np.int32), targets,
        np.asarray(weights))
    with self._placement():
      token_scores = np.asarray(self._score(self.variables, *arrays))
    scores = token_scores.sum(axis=-1)
    return (scores, token_scores) if return_token_scores else scores


def _fill_rows(rows: int, *arrays: np.ndarray, repeat: bool = True):
  """Each array filled up to `rows` rows, by repeating its first row (the
  model's work on them is dropped) or with zeros."""
  filled = []
  for array in arrays:
    missing = rows - len(array)
    if missing > 0:
      extra = (np.repeat(array[:1], missing, axis=0) if repeat else
               np.zeros((missing,) + array.shape[1:], array.dtype))
      array = np.concatenate([array, extra])
    filled.append(array)
  return tuple(filled)


def _mesh(partitioning: Optional[partitioning_lib.Partitioning],
          devices: Optional[Sequence[Any]]):
  """The mesh `partitioning` makes of `devices` (default: every local
  device), or None for no partitioning or a single device."""
  if partitioning is None:
    return None
  mesh = partitioning.make_mesh(devices)
  return mesh if mesh.size > 1 else None


def _parameter_shardings(mesh, partitioning, devices):
  """Parameter name -> where it lives: split over `mesh` by its logical
  axes, or on the one device (the first given, else the default one)."""
  if mesh is None:
    device = jax.sharding.SingleDeviceSharding(
        devices[0] if devices else jax.local_devices()[0])
    return lambda name: device
  rules = partitioning.logical_axis_rules
  return lambda name: jax.sharding.NamedSharding(mesh, partitioning_lib.spec(
      logical_axes(('params',) + tuple(name.split('/'))), rules))


def _example_keys(rng: Optional[jax.Array], batch_size: int,
                  needed: bool) -> np.ndarray:
  """[batch, 2] uint32 sampling keys from `rng` (one key, or one per
  example); zeros when decoding draws nothing."""
  if rng is None:
    if needed:
      raise ValueError('temperature sampling needs an rng key: one key, or '
                       'one per example ([batch, 2] uint32)')
    return np.zeros((batch_size, 2), np.uint32)
  dtype = getattr(rng, 'dtype', None)
  if dtype is not None and jax.dtypes.issubdtype(dtype, jax.dtypes.prng_key):
    rng = jax.random.key_data(rng)  # a typed key (jax.random.key)
  keys = np.asarray(rng)
  if keys.shape == (2,):
    return np.asarray(jax.random.split(rng, batch_size))
  if keys.shape != (batch_size, 2):
    raise ValueError(f'rng has shape {keys.shape}; give one key (2,) or one '
                     f'per example ({batch_size}, 2)')
  return keys.astype(np.uint32)
