"""T5 in anyone's Beam pipeline: a RunInference ModelHandler for JAX T5.

    from apache_beam.ml.inference.base import RunInference
    from pipeline.model_handler import T5ModelHandler

    handler = T5ModelHandler('/path/to/checkpoint', model='t5_1_1_small',
                             vocabulary=vocabulary,
                             task_feature_lengths={'inputs': 38, 'targets': 18})
    results = texts | RunInference(handler)   # PredictionResult per text

Elements are a `str` (encoded with the vocabulary, cut to the inputs length
with EOS kept last, as SeqIO's `append_eos_after_trim`), a list of int
token ids (used as they are: give the EOS yourself), or a mapping with
`inputs` (either form) and, in score mode, `targets` (either form). `PredictionResult.inference` is the T5X
record without `inputs` (`prediction`, `prediction_tokens`, `score`,
`aux`): the same values t5beam's own pipeline writes for the same example
and settings, since both run `pipeline.inference`.

Every element is checked before batching, so
`RunInference(handler).with_exception_handling()` sends an element that
cannot run to `failed_preprocessing[0]` (element, exception) and the rest
of its batch still runs. For keyed elements use `handler.keyed()` (Beam's
KeyedModelHandler refuses a handler with its own preprocessing).

Sampling keys come from the seed and the element's key when keyed, else its
content: identical unkeyed elements draw identical samples.
"""

import copy
import dataclasses
from typing import (Any, Dict, Iterable, Mapping, NamedTuple, Optional,
                    Sequence, Union)

from apache_beam.metrics import Metrics
from apache_beam.ml.inference.base import KeyedModelHandler
from apache_beam.ml.inference.base import ModelHandler
from apache_beam.ml.inference.base import PredictionResult
import numpy as np

from model import checkpoints
from model import config as model_config_lib
from model.config import T5Config
from model.decoding import DecodingConfig
from pipeline import inference
from pipeline.inference import NAMESPACE


class PreparedExample(NamedTuple):
  """An element checked and turned into model features; `example` is the
  element as the user gave it, carried through to the PredictionResult."""
  example: Any
  features: Dict[str, np.ndarray]
  identity: tuple


_NO_KEY = object()


class T5ModelHandler(ModelHandler):
  """A Beam ModelHandler for t5beam's JAX T5 (see the module docstring)."""

  def __init__(self, checkpoint_path: str, *,
               model: Union[str, T5Config, None] = None,
               vocabulary=None,
               task_feature_lengths: Mapping[str, int],
               batch_size: int = 32,
               dtype: Optional[str] = None,
               activation_dtype: Optional[str] = None,
               mode: str = 'predict',
               decoding: Optional[DecodingConfig] = None,
               num_decodes: int = 1,
               return_all_decodes: bool = False,
               output_ids: bool = False,
               seed: int = 0,
               return_intermediates: bool = False,
               compilation_cache_dir: Optional[str] = None,
               **kwargs):
    """`model`: a preset name ('t5_1_1_small', as the model Gin files), a
    T5Config, or None for a checkpoint that says its architecture (Hugging
    Face config.json, our Orbax t5_config.json). `vocabulary`: a
    seqio.Vocabulary, or None: then inputs are token ids and predictions
    token ids. `dtype`: the restore dtype (None: the project default,
    model.config.DEFAULT_RESTORE_DTYPE). `decoding`: greedy when None;
    `num_decodes` and `return_all_decodes` set its fields when they are not
    at their defaults (a `decoding` that says otherwise is refused). `kwargs`: Beam's
    ModelHandler options (`large_model`, `model_copies`, `min_batch_size`,
    `max_batch_size` (default `batch_size`), ...).
    `compilation_cache_dir`: JAX's persistent compilation cache, local or
    gs:// (None: ~/.cache/t5beam on the worker; '': off).

    The checkpoint and the architecture are checked here, so a wrong path
    fails when the pipeline is built, not on a worker."""
    if isinstance(model, str):
      model = model_config_lib.preset(model)
    architecture = checkpoints.resolve_architecture(checkpoint_path, model)
    decoding = _with_decodes(decoding or DecodingConfig(), num_decodes,
                             return_all_decodes)
    self._spec = inference.ModelSpec(
        checkpoint_path=checkpoint_path,
        task_feature_lengths=dict(task_feature_lengths),
        model_config=architecture,
        batch_size=batch_size,
        restore_dtype=dtype or model_config_lib.DEFAULT_RESTORE_DTYPE,
        activation_dtype=activation_dtype,
        mode=mode,
        decoding=decoding,
        output_ids=output_ids,
        return_intermediates=return_intermediates,
        seed=seed,
        compilation_cache_dir=compilation_cache_dir)
    if vocabulary is not None and (vocabulary.vocab_size >
                                   architecture.vocab_size):
      raise ValueError(
          f'the vocabulary has {vocabulary.vocab_size} ids but the model at '
          f'{checkpoint_path!r} has {architecture.vocab_size}: pass the '
          'vocabulary the model was trained with')
    self._vocabulary = vocabulary
    self._validates = True
    kwargs.setdefault('max_batch_size', batch_size)
    super().__init__(**kwargs)

  @property
  def spec(self) -> inference.ModelSpec:
    return self._spec

  # --- Beam's ModelHandler -----------------------------------------------------

  def load_model(self) -> inference.LoadedModel:
    return inference.load_model(self._spec)

  def get_preprocess_fns(self):
    return [self.prepare] if self._validates else []

  def run_inference(self, batch: Sequence[PreparedExample], model,
                    inference_args: Optional[Dict[str, Any]] = None
                    ) -> Iterable[PredictionResult]:
    del inference_args  # none are taken
    startup = model.take_load_report()
    if startup is not None:
      Metrics.counter(NAMESPACE, 'model_loads').inc()
      Metrics.counter(NAMESPACE, 'startup_milliseconds').inc(
          int(1000 * startup))
    records, decoded_tokens = inference.infer_examples(
        model, self._spec, self._vocabulary,
        [prepared.features for prepared in batch],
        [prepared.identity for prepared in batch])
    Metrics.counter(NAMESPACE, 'decoded_tokens').inc(decoded_tokens)
    return [PredictionResult(prepared.example, record,
                             self._spec.checkpoint_path)
            for prepared, record in zip(batch, records)]

  def get_num_bytes(self, batch: Sequence[PreparedExample]) -> int:
    return sum(sum(array.nbytes for array in prepared.features.values())
               for prepared in batch)

  def get_metrics_namespace(self) -> str:
    return NAMESPACE

  # --- keyed elements ----------------------------------------------------------

  def keyed(self) -> ModelHandler:
    """The handler for (key, element) pairs, with the same per-element
    checks; results are (key, PredictionResult) and each element's sampling
    key comes from its key."""
    unchecked = copy.copy(self)
    unchecked._validates = False  # pylint: disable=protected-access
    return KeyedModelHandler(unchecked).with_preprocess_fn(self.prepare_keyed)

  def prepare_keyed(self, keyed_element):
    """(key, element) -> (key, PreparedExample); the element's sampling key
    comes from `key`."""
    if not (isinstance(keyed_element, tuple) and len(keyed_element) == 2):
      raise TypeError(f'the keyed handler takes (key, element) pairs, got '
                      f'a {type(keyed_element).__name__}')
    key, element = keyed_element
    if self._spec.decoding.needs_rng:
      inference.identity_bytes(key)  # TypeError for a key with no stable form
    return key, self.prepare(element, key)

  # --- checking and encoding elements ------------------------------------------

  def prepare(self, element, key=_NO_KEY) -> PreparedExample:
    """The element's model features; ValueError or TypeError naming what
    is wrong with it (Beam's exception handling then routes it)."""
    spec = self._spec
    if isinstance(element, (str, list, np.ndarray)):
      inputs, targets = element, None
    elif isinstance(element, Mapping):
      if 'inputs' not in element:
        raise ValueError(f'element has no \'inputs\' (it has '
                         f'{sorted(map(str, element))}): give a mapping '
                         'with inputs (and targets in score mode)')
      inputs, targets = element['inputs'], element.get('targets')
    else:
      hint = (' ((key, element) pairs need handler.keyed())'
              if isinstance(element, tuple) else '')
      raise TypeError(f'element of type {type(element).__name__} cannot be '
                      "run: give a str, a list of token ids or a mapping "
                      f"with 'inputs'{hint}")
    input_ids = self._token_ids('inputs', inputs, spec.input_length)
    target_ids = None
    if targets is not None:
      target_ids = self._token_ids('targets', targets, spec.target_length)
    elif spec.mode == 'score':
      raise ValueError("score mode needs the element's 'targets': give a "
                       "mapping with inputs and targets")
    if key is not _NO_KEY:
      identity = ('key', key)
    else:
      identity = ('content', input_ids.tobytes(),
                  b'' if target_ids is None else target_ids.tobytes())
    return PreparedExample(
        element, inference.model_features(input_ids, target_ids, spec),
        identity)

  def _token_ids(self, name: str, value, length: int) -> np.ndarray:
    if isinstance(value, str):
      if self._vocabulary is None:
        raise ValueError(f'{name} is text but the handler has no vocabulary: '
                         'pass vocabulary=..., or give token ids')
      if not value:
        raise ValueError(f'{name} is empty')
      ids = list(self._vocabulary.encode(value))[:length - 1]
      return np.asarray(ids + [self._vocabulary.eos_id], np.int32)
    if isinstance(value, (bytes, Mapping)) or not isinstance(
        value, (Sequence, np.ndarray)):
      raise TypeError(f'{name} of type {type(value).__name__}: give a str or '
                      'a sequence of int token ids')
    try:
      ids = np.asarray(value)
    except ValueError:  # ragged nesting
      ids = np.asarray(None)
    if ids.size == 0:
      raise ValueError(f'{name} is empty')
    if ids.ndim != 1 or ids.dtype.kind not in 'iu':
      raise TypeError(f'{name} must be a flat sequence of int token ids, got '
                      f'{str(value)[:80]}')
    vocab_size = self._spec.model_config.vocab_size
    bad = ids[(ids < 0) | (ids >= vocab_size)]
    if bad.size:
      raise ValueError(f'{name} has token id {int(bad[0])} outside the '
                       f'model\'s vocabulary of {vocab_size} ids')
    if not ids.all():
      raise ValueError(f'{name} has token id 0, which is padding: the model '
                       'would skip it')
    if ids.size > length:
      raise ValueError(f'{name} has {ids.size} token ids, more than its '
                       f'feature length {length} (task_feature_lengths)')
    return ids.astype(np.int32)


def _with_decodes(decoding: DecodingConfig, num_decodes: int,
                  return_all_decodes: bool) -> DecodingConfig:
  """`decoding` with the handler's num_decodes / return_all_decodes where
  those are not at their defaults; ValueError where `decoding` already says
  something else."""
  changes = {}
  for name, value, default in (('num_decodes', num_decodes, 1),
                               ('return_all_decodes', return_all_decodes,
                                False)):
    own = getattr(decoding, name)
    if value == default or value == own:
      continue
    if own != default:
      raise ValueError(f'{name}={value!r} contradicts decoding.{name}='
                       f'{own!r}; give it in one place')
    changes[name] = value
  return dataclasses.replace(decoding, **changes) if changes else decoding
