"""The one seam between Beam and the model: what to run, how to run a batch,
and what each example's T5X record says.

Both callers of the model go through here: the pipeline's `InferChunk`
(pipeline/infer_chunks.py) and `T5ModelHandler` (pipeline/model_handler.py,
RunInference in users' own pipelines). So for the same example and settings
they give the same record.

    spec = ModelSpec(checkpoint_path, task_feature_lengths={...}, mode='predict')
    loaded = load_model(spec)                    # once per worker process
    inferences, tokens = infer_examples(loaded, spec, vocabulary, features,
                                        identities)
    # or, to make the records elsewhere while the model runs on:
    outputs, count, tokens, seconds = run_examples(loaded, spec, features,
                                                   identities)
    inferences = records(spec, vocabulary, outputs, count)

`features` are one dict of int arrays per example, as SeqIO's
`EncDecFeatureConverter` gives them (`model_features` builds the same from
token ids). A chunk's examples go to the model in one call, which cuts
them into model calls of `spec.batch_size` rows by `spec.batching`
(`model.batching`: continuous, length-aware or static); the padding never
reaches a record, and records come back in the examples' order.

Sampling keys: every example draws from its own key, derived from the seed
and the example's identity (never from its batch or row), so resumed,
retried and multi-worker runs sample identically. The pipeline's identity
is (task, input shard, index in the shard); the handler's is the element's
key, or its content.
"""

import contextlib
import dataclasses
import functools
import hashlib
import logging
import os
import threading
import time
from typing import Any, Dict, List, Mapping, Optional, Sequence, Tuple

import numpy as np

from model import batching as batching_lib
from model.config import DEFAULT_RESTORE_DTYPE, T5Config
from model.decoding import DecodingConfig
from model.partitioning import Partitioning

# Beam metrics of the pipeline and of T5ModelHandler.
NAMESPACE = 't5beam'
MODES = ('predict', 'score', 'predict_with_aux')
DTYPES = ('float32', 'bfloat16', 'float16')
FEATURES = ('encoder_input_tokens', 'decoder_input_tokens',
            'decoder_target_tokens', 'decoder_loss_weights')


@dataclasses.dataclass(frozen=True)
class ModelSpec:
  """What to run and how: the model's settings, shared by the pipeline and
  the RunInference handler; validated on construction.

  model_config: the architecture, or None to take it from the checkpoint
  (Hugging Face config.json, or our Orbax checkpoint's t5_config.json).
  restore_dtype: the dtype parameters are restored in; activation_dtype the
  one matmuls run in (None: the same).
  mode: 'predict', 'score' or 'predict_with_aux'; decoding: how to decode
  (greedy by default). output_ids adds `prediction_tokens`;
  return_intermediates adds each target token's score in score mode.
  seed: the sampling keys' seed (each example's key hashes it with the
  example's identity).
  partitioning: T5X's PjitPartitioner settings; the model runs on a
  ('data', 'model') mesh of every local device of the worker.
  batching: how a chunk's examples become model calls of `batch_size` rows
  (`model.batching`): 'continuous' (default: rows, or the beams of an
  example, take the next example as soon as theirs ends; scoring falls
  back to 'length'), 'length' (sorted by input length, each batch at the
  smallest of `length_buckets` holding it) or 'static' (T5X's). Each
  example's record is the same in every mode, up to float32 summation
  order (near-ties).
  """
  checkpoint_path: str
  task_feature_lengths: Mapping[str, int]
  model_config: Optional[T5Config] = None
  batch_size: int = 32
  restore_dtype: str = DEFAULT_RESTORE_DTYPE
  activation_dtype: Optional[str] = None
  mode: str = 'predict'
  decoding: DecodingConfig = DecodingConfig()
  output_ids: bool = False
  return_intermediates: bool = False
  seed: int = 0
  partitioning: Partitioning = Partitioning()
  batching: str = 'continuous'
  length_buckets: Optional[Tuple[int, ...]] = None
  # JAX's persistent compilation cache (a local or gs:// directory; None:
  # ~/.cache/t5beam on the worker; '': off). It never changes outputs, so it
  # is not in the fingerprint.
  compilation_cache_dir: Optional[str] = None

  def __post_init__(self):
    if self.mode not in MODES:
      raise ValueError(f'mode (infer.mode) {self.mode!r} is not one of '
                       f'{MODES}')
    if self.batch_size < 1:
      raise ValueError(f'batch_size must be at least 1, got '
                       f'{self.batch_size}')
    for name in ('restore_dtype', 'activation_dtype'):
      value = getattr(self, name)
      if value is not None and value not in DTYPES:
        raise ValueError(f'{name} {value!r} is not one of {DTYPES}')
    if self.batching not in batching_lib.MODES:
      raise ValueError(f'batching (infer.batching) {self.batching!r} is not '
                       f'one of {batching_lib.MODES}')
    if self.length_buckets is not None:
      if any(int(b) < 1 for b in self.length_buckets):
        raise ValueError(f'length_buckets (infer.length_buckets) '
                         f'{tuple(self.length_buckets)} must be positive '
                         'token counts')
      object.__setattr__(self, 'length_buckets',
                         tuple(sorted({int(b) for b in self.length_buckets})))
    for feature in ('inputs', 'targets'):
      if feature not in self.task_feature_lengths:
        raise ValueError(
            f'task_feature_lengths (TASK_FEATURE_LENGTHS) '
            f'{dict(self.task_feature_lengths)} lacks {feature!r}; an '
            'encoder-decoder model needs both inputs and targets lengths')

  @property
  def input_length(self) -> int:
    return int(self.task_feature_lengths['inputs'])

  @property
  def target_length(self) -> int:
    return int(self.task_feature_lengths['targets'])

  def batching_plan(self) -> batching_lib.Batching:
    """The batching that runs (continuous falls back to length-aware where
    it does not apply)."""
    return batching_lib.Batching(
        batching_lib.effective_mode(self.batching, self.mode, self.decoding),
        self.length_buckets)

  def fingerprint_fields(self) -> Dict[str, Any]:
    """The settings that decide what the model writes."""
    batching = self.batching_plan()
    return {
        'checkpoint_path': self.checkpoint_path,
        'task_feature_lengths': {k: int(v) for k, v in
                                 sorted(self.task_feature_lengths.items())},
        'model_config': (self.model_config.to_dict()
                         if self.model_config else None),
        'batch_size': self.batch_size,
        'restore_dtype': self.restore_dtype,
        'activation_dtype': self.activation_dtype or self.restore_dtype,
        'mode': self.mode,
        'decoding': dataclasses.asdict(self.decoding),
        'output_ids': self.output_ids,
        'return_intermediates': self.return_intermediates,
        'seed': self.seed,
        # The model axis and rules decide how sums split over devices (their
        # order, so near-ties); the data axis is whatever the worker has.
        'partitioning': self.partitioning.to_dict(),
        # Batch shapes decide float32 summation order (near-ties).
        'batching': batching.mode,
        'length_buckets': list(batching.buckets(self.input_length)),
    }


# --- sampling keys ------------------------------------------------------------


def identity_bytes(part: Any) -> bytes:
  """A stable encoding of an identity part: str, bytes, int, float, bool,
  None, or tuples and lists of them. TypeError for anything else, whose
  repr may differ between processes."""
  if isinstance(part, bytes):
    return b'b' + part
  if isinstance(part, str):
    return b's' + part.encode('utf-8')
  if part is None or isinstance(part, (bool, np.bool_)):
    return b'n' + repr(None if part is None else bool(part)).encode()
  if isinstance(part, (int, np.integer)):
    return b'i' + str(int(part)).encode()
  if isinstance(part, (float, np.floating)):
    return b'f' + float(part).hex().encode()
  if isinstance(part, (tuple, list)):
    inner = [identity_bytes(p) for p in part]
    return b't' + b''.join(len(p).to_bytes(8, 'little') + p for p in inner)
  raise TypeError(f'a {type(part).__name__} cannot identify an example for '
                  'sampling (its repr may differ between processes); use '
                  'str, bytes, numbers or tuples of them')


def example_key(seed: int, identity: Sequence[Any]) -> np.ndarray:
  """The sampling key ([2] uint32, a JAX threefry key) of the example with
  this identity: a hash of the seed and the identity's parts, so the same
  example gets the same key in any batch, worker or rerun."""
  digest = hashlib.blake2b(digest_size=8)
  digest.update(str(int(seed)).encode())
  digest.update(identity_bytes(tuple(identity)))
  return np.frombuffer(digest.digest(), np.uint32).copy()


# --- features -----------------------------------------------------------------


def _pad(ids: np.ndarray, length: int) -> np.ndarray:
  out = np.zeros(length, np.int32)
  out[:len(ids)] = ids[:length]
  return out


def model_features(inputs: Sequence[int], targets: Optional[Sequence[int]],
                   spec: ModelSpec) -> Dict[str, np.ndarray]:
  """One example's model features from token ids, as SeqIO's
  EncDecFeatureConverter (unpacked) gives them: inputs and targets padded
  to their lengths, decoder inputs the targets shifted right, loss weights
  where targets are not padding."""
  targets = np.asarray(targets if targets is not None else [], np.int32)
  decoder_targets = _pad(targets, spec.target_length)
  decoder_inputs = np.concatenate([[0], decoder_targets[:-1]]).astype(np.int32)
  return {
      'encoder_input_tokens': _pad(np.asarray(inputs, np.int32),
                                   spec.input_length),
      'decoder_input_tokens': decoder_inputs,
      'decoder_target_tokens': decoder_targets,
      'decoder_loss_weights': (decoder_targets > 0).astype(np.int32),
  }


def stack_batch(features: Sequence[Mapping[str, np.ndarray]],
                batch_size: int) -> Dict[str, np.ndarray]:
  """[batch_size, ...] arrays of the examples' features; rows past the
  examples repeat the first example (their outputs are dropped)."""
  return pad_batch({name: np.stack([np.asarray(row[name], np.int32)
                                    for row in features])
                    for name in FEATURES}, batch_size)


def pad_batch(stacked: Mapping[str, np.ndarray],
              batch_size: int) -> Dict[str, np.ndarray]:
  """Stacked [rows, ...] features filled up to `batch_size` rows by
  repeating the first (their outputs are dropped)."""
  out = {}
  for name in FEATURES:
    rows = np.asarray(stacked[name], np.int32)
    if len(rows) < batch_size:
      rows = np.concatenate(
          [rows, np.repeat(rows[:1], batch_size - len(rows), axis=0)])
    out[name] = rows
  return out


# --- the loaded model ---------------------------------------------------------


class ModelClock:
  """The model time of calls that may overlap (the threads of a worker
  sharing one model). While n calls run, each is charged 1/n of the time
  that passes, so the charges of all calls add up to the time during which
  at least one call ran: the model's own time, whatever the number of
  threads driving it (a sum of overlapping calls' durations would count
  the same seconds twice, and make the model look slower than it is)."""

  def __init__(self):
    self._lock = threading.Lock()
    self._charges = {}  # running call -> seconds charged to it so far
    self._last = 0.0

  def _advance(self, now: float):
    if self._charges:
      share = (now - self._last) / len(self._charges)
      for call in self._charges:
        self._charges[call] += share
    self._last = now

  def start(self) -> object:
    """A call begins: its token for `stop`."""
    call = object()
    with self._lock:
      self._advance(time.perf_counter())
      self._charges[call] = 0.0
    return call

  def stop(self, call: object) -> float:
    """The call ends: the seconds charged to it."""
    with self._lock:
      self._advance(time.perf_counter())
      return self._charges.pop(call)


class LoadedModel:
  """The model one worker process (or, with Beam's `large_model`, one VM)
  holds, with the settings it was loaded for. Its methods take and return
  numpy arrays only, so Beam can share it across processes by proxy."""

  def __init__(self, spec: ModelSpec, model, load_seconds: float,
               compile_seconds: float):
    self.spec = spec
    self.model = model
    self.load_seconds = load_seconds
    self.compile_seconds = compile_seconds
    self._lock = threading.Lock()
    self._load_reported = False
    # Calls over a mesh of several devices run one at a time: two threads
    # launching sharded programs at once could order their collectives
    # differently on different devices (the launcher's local default is two
    # worker threads). A single device takes concurrent calls.
    mesh = model.mesh_shape
    self._one_call = (contextlib.nullcontext() if mesh['data'] *
                      mesh['model'] == 1 else threading.Lock())
    self._clock = ModelClock()

  def mesh_shape(self) -> Dict[str, int]:
    """{'data': d, 'model': m}: the devices the model runs on."""
    return self.model.mesh_shape

  def take_load_report(self) -> Optional[float]:
    """Seconds the load and compile took, the first time it is asked (so a
    shared model's load is counted once); None afterwards."""
    with self._lock:
      if self._load_reported:
        return None
      self._load_reported = True
      return self.load_seconds + self.compile_seconds

  def run(self, features: Mapping[str, np.ndarray],
          example_keys: Optional[np.ndarray] = None,
          queue_rows: int = 0) -> Dict[str, np.ndarray]:
    """Runs the examples (features stacked [examples, ...], any number) in
    the spec's mode and batching: {'tokens'} (predict), {'tokens',
    'scores'} (predict_with_aux), or {'scores', 'token_scores', 'weights'}
    (score), one row per example in the given order. `example_keys`
    [examples, 2]: each example's sampling key. `queue_rows`: the most
    examples a call gives (see `InferenceModel.predict_examples`)."""
    return self.run_timed(features, example_keys, queue_rows)[0]

  def run_timed(self, features: Mapping[str, np.ndarray],
                example_keys: Optional[np.ndarray] = None,
                queue_rows: int = 0) -> Tuple[Dict[str, np.ndarray], float]:
    """`run`, and the seconds of model time the call is charged: its
    duration, shared with the calls other threads ran at the same time
    (`ModelClock`)."""
    with self._one_call:
      call = self._clock.start()
      try:
        outputs = self._run(features, example_keys, queue_rows)
      finally:
        seconds = self._clock.stop(call)
    return outputs, seconds

  def _run(self, features, example_keys, queue_rows):
    spec = self.spec
    batching = spec.batching_plan()
    if spec.mode == 'score':
      scores, token_scores = self.model.score_examples(
          features, batch_size=spec.batch_size, batching=batching)
      return {'scores': scores, 'token_scores': token_scores,
              'weights': np.asarray(features['decoder_loss_weights'])}
    rng = example_keys if spec.decoding.needs_rng else None
    predict = functools.partial(
        self.model.predict_examples, features['encoder_input_tokens'],
        batch_size=spec.batch_size, max_length=spec.target_length,
        decoding=spec.decoding, rng=rng, batching=batching,
        queue_rows=queue_rows)
    if spec.mode == 'predict':
      # Records carry no scores, and greedy decoding is faster without them
      # (model.screened_argmax).
      return {'tokens': predict()}
    tokens, scores = predict(return_scores=True)
    return {'tokens': tokens, 'scores': scores}


def load_model(spec: ModelSpec, queue_rows: int = 0) -> LoadedModel:
  """Loads the checkpoint and compiles the spec's batch shape (the
  continuous program for `queue_rows` examples, the pipeline's chunk size;
  length-aware batching compiles each bucket when it is first used).
  Called once per worker process."""
  from model import runtime  # pylint: disable=g-import-not-at-top
  runtime.configure_xla_cpu()  # a no-op once JAX runs in this process
  cache = runtime.enable_compilation_cache(
      runtime.DEFAULT_COMPILATION_CACHE if spec.compilation_cache_dir is None
      else spec.compilation_cache_dir)
  from model.inference import InferenceModel  # pylint: disable=g-import-not-at-top
  from model import partitioning  # pylint: disable=g-import-not-at-top
  start = time.perf_counter()
  # The mesh's arithmetic before reading any parameter.
  partitioning.check_batch(spec.batch_size, spec.partitioning.make_mesh())
  model = InferenceModel.load(spec.checkpoint_path, spec.model_config,
                              dtype=spec.restore_dtype,
                              activation_dtype=spec.activation_dtype,
                              partitioning=spec.partitioning)
  loaded_at = time.perf_counter()
  loaded = LoadedModel(spec, model, loaded_at - start, 0.0)
  warm_up = model_features([1], [1], spec)
  loaded.run(stack_batch([warm_up], spec.batch_size),
             np.zeros((spec.batch_size, 2), np.uint32), queue_rows)
  loaded.compile_seconds = time.perf_counter() - loaded_at
  logging.info('t5beam: process %d loaded the model in %.1f s onto mesh %s '
               'and compiled batch shape %d in %.1f s (compilation cache: '
               '%s)', os.getpid(), loaded.load_seconds, model.mesh_shape,
               spec.batch_size, loaded.compile_seconds, cache or 'off')
  return loaded


# --- records ------------------------------------------------------------------


def _cut(ids: np.ndarray) -> List[int]:
  """Token ids up to the first 0 (decoding writes 0 after EOS)."""
  ids = ids.tolist()
  return ids[:ids.index(0)] if 0 in ids else ids


def _prediction_fields(spec: ModelSpec, vocabulary, tokens: np.ndarray,
                       scores) -> Dict[str, Any]:
  """`prediction` (+ `prediction_tokens`, `aux`) of one example; lists of
  all decodes (increasing score) when return_all_decodes. Without a
  vocabulary the prediction is the token ids."""
  decode = vocabulary.decode if vocabulary is not None else (lambda ids: ids)
  if tokens.ndim == 2:
    ids = [_cut(row) for row in tokens]
    fields = {'prediction': [decode(i) for i in ids]}
  else:
    ids = _cut(tokens)
    fields = {'prediction': decode(ids)}
  if spec.output_ids:
    fields['prediction_tokens'] = ids
  if spec.mode == 'predict_with_aux':
    fields['aux'] = {'scores': np.asarray(scores, np.float64).tolist()}
  return fields


def _inference(spec: ModelSpec, vocabulary, outputs: Mapping[str, np.ndarray],
               row: int) -> Dict[str, Any]:
  """The T5X record of one example, without `inputs`."""
  if 'tokens' in outputs:
    return _prediction_fields(
        spec, vocabulary, outputs['tokens'][row],
        outputs['scores'][row] if 'scores' in outputs else None)
  record = {'score': float(outputs['scores'][row])}
  if spec.return_intermediates:
    real = outputs['weights'][row] > 0
    record['aux'] = {'token_scores': [
        float(x) for x in outputs['token_scores'][row][real]]}
  return record


def run_examples(model, spec: ModelSpec, features,
                 identities: Sequence[Sequence[Any]], queue_rows: int = 0
                 ) -> Tuple[Dict[str, np.ndarray], int, int, float]:
  """Runs the model on the examples: (its outputs, one row per example, as
  `LoadedModel.run` gives them; example count; decoded token count; seconds
  of model time, `LoadedModel.run_timed`'s).

  The model's half of `infer_examples`; `records` makes the records from
  its outputs, so a caller may make them on another thread while the model
  runs the next examples (the pipeline does)."""
  stacked = isinstance(features, Mapping)
  count = len(features[FEATURES[0]]) if stacked else len(features)
  if not count:
    return {}, 0, 0, 0.0
  if stacked:
    arrays = {name: np.asarray(features[name], np.int32) for name in FEATURES}
  else:
    arrays = stack_batch(features, count)
  keys = None
  if spec.decoding.needs_rng and spec.mode != 'score':
    keys = np.stack([example_key(spec.seed, identity)
                     for identity in identities])
  outputs, seconds = model.run_timed(arrays, keys, queue_rows)
  decoded_tokens = 0
  if 'tokens' in outputs:
    decoded_tokens = int(np.sum(outputs['tokens'] > 0))
  return outputs, count, decoded_tokens, seconds


def records(spec: ModelSpec, vocabulary, outputs: Mapping[str, np.ndarray],
            count: int) -> List[Dict[str, Any]]:
  """One T5X record without `inputs` per example, from `run_examples`'
  outputs."""
  return [_inference(spec, vocabulary, outputs, row) for row in range(count)]


def infer_examples(model, spec: ModelSpec, vocabulary,
                   features,
                   identities: Sequence[Sequence[Any]],
                   queue_rows: int = 0) -> Tuple[List[Dict[str, Any]], int]:
  """(one T5X record without `inputs` per example, decoded token count).

  `model` is a LoadedModel (or Beam's proxy of one); `features` one dict of
  arrays per example, or one dict of arrays stacked [examples, ...] (a
  chunk), all run in one call by the spec's batching (batches of
  `spec.batch_size` rows); `identities` give the sampling keys;
  `queue_rows`: see `LoadedModel.run`."""
  outputs, count, decoded_tokens, _ = run_examples(model, spec, features,
                                                   identities, queue_rows)
  return records(spec, vocabulary, outputs, count), decoded_tokens
