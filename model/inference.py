"""The model side the pipeline calls: load once, then run fixed-shape batches.

    model = InferenceModel.load('/path/to/checkpoint', dtype='float32')
    tokens = model.predict_batch(batch)            # [batch, target_len]
    tokens, scores = model.predict_batch(batch, return_scores=True)
    scores = model.score_batch(batch)              # [batch]

A batch is a dict of numpy int arrays as SeqIO's `EncDecFeatureConverter`
gives them: `encoder_input_tokens` [batch, in_len] and, for the decoded
length and for scoring, `decoder_input_tokens`, `decoder_target_tokens`,
`decoder_loss_weights` [batch, target_len]. Each distinct shape compiles once.
"""

import functools
import logging
import time
from typing import Mapping, Optional, Tuple, Union

import jax
import numpy as np

from model import checkpoints
from model import decoding as decoding_lib
from model.config import T5Config
from model.network import Transformer, prepare_variables

Batch = Mapping[str, np.ndarray]


class InferenceModel:
  """A T5 model with its parameters placed on the default device."""

  def __init__(self, config: T5Config, params):
    self.config = config
    self.module = Transformer(config)
    checkpoints.check_shapes(config, params, source='the given parameters')
    # Only the prepared variables are kept: fused kernels replace the
    # kernels they were made from, so memory stays that of the checkpoint.
    self.variables = prepare_variables(self.module, jax.device_put(params))
    self._decode = jax.jit(
        functools.partial(decoding_lib.decode, self.module),
        static_argnames=('max_length', 'eos_id', 'config', 'return_scores'))
    self._score = jax.jit(
        functools.partial(decoding_lib.token_log_likelihoods, self.module))

  @classmethod
  def load(cls, path: str, config: Optional[T5Config] = None,
           dtype: str = 'float32',
           activation_dtype: Optional[str] = None) -> 'InferenceModel':
    """Reads the checkpoint at `path` (see `model.checkpoints`).

    `dtype` is the dtype parameters are restored in; activations use
    `activation_dtype`, by default the same.
    """
    start = time.perf_counter()
    config, params = checkpoints.load_checkpoint(path, config, dtype)
    config = config.replace(dtype=activation_dtype or dtype)
    model = cls(config, params)
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
    tokens whatever is produced (for benchmarks). Sampling needs `rng`.
    """
    if max_length is None:
      if 'decoder_input_tokens' not in batch:
        raise ValueError('predict_batch needs max_length or a '
                         "'decoder_input_tokens' feature to size the output")
      max_length = batch['decoder_input_tokens'].shape[1]
    config = decoding or decoding_lib.DecodingConfig()
    if config.needs_rng and rng is None:
      raise ValueError('temperature sampling needs an rng key')
    if rng is None:
      rng = jax.random.PRNGKey(0)
    tokens, scores = self._decode(
        self.variables, np.asarray(batch['encoder_input_tokens'], np.int32),
        rng, max_length=max_length,
        eos_id=self.config.eos_id if stop_at_eos else None, config=config,
        return_scores=return_scores or config.strategy != 'greedy')
    tokens, scores = np.asarray(tokens), np.asarray(scores)
    if not config.return_all_decodes:
      tokens, scores = tokens[:, -1], scores[:, -1]
    return (tokens, scores) if return_scores else tokens

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
    token_scores = np.asarray(self._score(
        self.variables, np.asarray(batch['encoder_input_tokens'], np.int32),
        np.asarray(batch['decoder_input_tokens'], np.int32), targets,
        np.asarray(weights)))
    scores = token_scores.sum(axis=-1)
    return (scores, token_scores) if return_token_scores else scores
