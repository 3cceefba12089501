"""Greedy decoding and scoring as pure functions of (variables, token arrays).

`variables` is what `model.network.prepare_variables` returns, or just
{'params': params}. Everything here is traced once per input shape: the
decoding loop is a `lax.while_loop` inside one jitted function, with a
key/value cache for the decoder's self-attention and the cross-attention
keys/values computed once per batch. Call these through `jax.jit` (see `model.inference`).
"""

import dataclasses
from typing import Any, NamedTuple, Optional, Tuple

import jax
import jax.numpy as jnp

from model import partitioning
from model.network import CACHE_AXES, MASK_VALUE, Transformer
from model.screened_argmax import first_argmax, screened_argmax

# Beam search's empty score: finite, so the arithmetic stays NaN-free.
NEG_INF = -1e9


@dataclasses.dataclass(frozen=True)
class DecodingConfig:
  """How to decode, with T5X's names and defaults.

  strategy: 'greedy', 'temperature_sample' or 'beam_search'.
  num_decodes: samples or beams per example; return_all_decodes keeps all
  (sorted by increasing score, as T5X) instead of only the best.
  temperature, topk, topp: temperature_sample's (T5X defaults 1.0, 1, 0.0).
  alpha: beam_search's brevity penalty exponent (T5X default 0.6).
  max_decode_steps: at most this many tokens (default: the targets length).
  """
  strategy: str = 'greedy'
  num_decodes: int = 1
  return_all_decodes: bool = False
  temperature: float = 1.0
  topk: int = 1
  topp: float = 0.0
  alpha: float = 0.6
  max_decode_steps: Optional[int] = None

  def __post_init__(self):
    strategies = ('greedy', 'temperature_sample', 'beam_search')
    if self.strategy not in strategies:
      raise ValueError(f'decoding strategy {self.strategy!r} is not one of '
                       f'{strategies}')
    if self.num_decodes < 1:
      raise ValueError(f'num_decodes must be at least 1, got '
                       f'{self.num_decodes}')
    if self.topk and self.topp:
      raise ValueError(f'decoding.temperature_sample: only one of topk '
                       f'({self.topk}) and topp ({self.topp}) may be '
                       'non-zero; set topk=0 to use topp')
    if self.strategy == 'greedy' and self.num_decodes != 1:
      raise ValueError('greedy decoding gives one decode; use '
                       'temperature_sample or beam_search for num_decodes > 1')

  @property
  def needs_rng(self) -> bool:
    return self.strategy == 'temperature_sample' and self.temperature != 0


def decode(module: Transformer, variables, encoder_input_tokens,
           example_keys, *, max_length: int, eos_id: Optional[int],
           config: DecodingConfig, return_scores: bool = True,
           argmax_screen=None):
  """Decodes by `config`: (tokens [batch, n, L], scores [batch, n]),
  increasing score; n is num_decodes (1 for greedy). `example_keys`
  [batch, 2] uint32: each example's sampling key (used by sampling only).
  `argmax_screen`: see `greedy_decode`."""
  if config.strategy == 'greedy':
    tokens, scores = greedy_decode(
        module, variables, encoder_input_tokens, max_length, eos_id=eos_id,
        return_scores=return_scores, max_steps=config.max_decode_steps,
        argmax_screen=argmax_screen)
    return tokens[:, None], scores[:, None]
  if config.strategy == 'temperature_sample':
    return temperature_sample(
        module, variables, encoder_input_tokens, max_length, eos_id=eos_id,
        example_keys=example_keys, num_decodes=config.num_decodes,
        temperature=config.temperature, topk=config.topk, topp=config.topp,
        max_steps=config.max_decode_steps)
  return beam_search(module, variables, encoder_input_tokens, max_length,
                     eos_id=eos_id, num_decodes=config.num_decodes,
                     alpha=config.alpha, max_steps=config.max_decode_steps)


class GreedyState(NamedTuple):
  """The decoding loop's carry.

  step:       scalar int32, the position being decoded next.
  last_token: [batch] int32, the token fed to the decoder at `step`
              (the decoder start token at step 0).
  tokens:     [batch, max_length] int32, decoded so far; 0 after EOS.
  done:       [batch] bool, the sequence has produced EOS.
  scores:     [batch] float32, summed log-probabilities of decoded tokens.
  cache:      per decoder layer (keys, values), [batch, heads, max_length, d_kv].
  """
  step: jax.Array
  last_token: jax.Array
  tokens: jax.Array
  done: jax.Array
  scores: jax.Array
  cache: list


def _decoder_inputs(module: Transformer, variables, encoder_input_tokens,
                    max_length: int, copies: int = 1):
  """What every decoding step reads: cross-attention keys/values, the
  self-attention bias table and the encoder padding mask, with each example
  repeated `copies` times (samples or beams). The encoder runs once per
  example, not once per copy."""
  encoded = module.apply(variables, encoder_input_tokens, method='encode')
  if copies > 1:
    encoded = jnp.repeat(encoded, copies, axis=0)
    encoder_input_tokens = jnp.repeat(encoder_input_tokens, copies, axis=0)
  cross = module.apply(variables, encoded, method='step_cross_kv')
  self_bias_table = module.apply(variables, max_length,
                                 method='decoder_self_bias')
  return cross, self_bias_table, encoder_input_tokens > 0


def _decode_loop(module: Transformer, variables, encoder_input_tokens,
                 max_length: int, eos_id: Optional[int], pick,
                 max_steps: Optional[int] = None, copies: int = 1,
                 pick_from_hidden: bool = False, row_keys=None):
  """The cached decoding loop shared by greedy decoding and sampling.

  pick(logits [batch, vocab] float32, positions [batch] int32, row_keys
  [batch, 2] uint32) -> (token [batch] int32, token score [batch] float32);
  with `pick_from_hidden`, pick gets what the output layer would multiply
  [batch, d_model] instead of logits (see `_picker`). Returns (tokens
  [batch, max_length], summed scores [batch]); 0 after each EOS; stops when
  all sequences have ended or after `max_steps` (default max_length)
  tokens. With `copies`, each example is decoded that many times, its
  copies consecutive (batch is then examples * copies).
  """
  cfg = module.config
  batch_size = encoder_input_tokens.shape[0] * copies
  cross, self_bias_table, encoder_mask = _decoder_inputs(
      module, variables, encoder_input_tokens, max_length, copies)
  steps = max_length if max_steps is None else min(max_steps, max_length)

  def should_continue(state: GreedyState):
    return (state.step < steps) & ~jnp.all(state.done)

  def decode_one(state: GreedyState) -> GreedyState:
    outputs, cache = module.apply(variables, state.last_token, state.step,
                                  state.cache, self_bias_table, cross,
                                  encoder_mask, pick_from_hidden,
                                  method='decode_step')
    token, token_score = pick(
        outputs, jnp.broadcast_to(state.step, (batch_size,)), row_keys)
    token = jnp.where(state.done, 0, token)
    scores = state.scores + jnp.where(state.done, 0.0, token_score)
    tokens = jax.lax.dynamic_update_slice(state.tokens, token[:, None],
                                          (0, state.step))
    done = state.done
    if eos_id is not None:
      done = done | (token == eos_id)
    return GreedyState(state.step + 1, token, tokens, done, scores, cache)

  initial = GreedyState(
      step=jnp.array(0, jnp.int32),
      last_token=jnp.full((batch_size,), cfg.decoder_start_id, jnp.int32),
      tokens=jnp.zeros((batch_size, max_length), jnp.int32),
      done=jnp.zeros((batch_size,), bool),
      scores=jnp.zeros((batch_size,), jnp.float32),
      cache=module.init_cache(batch_size, max_length))
  final = jax.lax.while_loop(should_continue, decode_one, initial)
  return final.tokens, final.scores


def greedy_decode(module: Transformer, variables,
                  encoder_input_tokens: jax.Array,
                  max_length: int, *, eos_id: Optional[int],
                  return_scores: bool = False,
                  max_steps: Optional[int] = None, argmax_screen=None
                  ) -> Tuple[jax.Array, jax.Array]:
  """Arg-max decoding of up to `max_length` tokens per sequence.

  A sequence ends at its first EOS (kept in the output); the positions after
  it hold 0. The loop stops as soon as every sequence has ended. With
  `eos_id=None` no token ends a sequence and exactly `max_length` tokens are
  decoded (benchmarks use this). Returns (tokens [batch, max_length] int32,
  scores [batch] float32: the log-likelihood of the decoded tokens, zeros
  unless `return_scores`).

  `argmax_screen` (`model.screened_argmax.make_screen` of the output layer)
  finds each arg-max without the full float32 logits when no scores are
  asked for; the tokens are the arg-max of float32 logits either way.
  """
  pick, from_hidden = _picker(DecodingConfig(), return_scores,
                              argmax_screen)
  return _decode_loop(module, variables, encoder_input_tokens, max_length,
                      eos_id, pick, max_steps, pick_from_hidden=from_hidden)


def _picker(config: DecodingConfig, return_scores: bool, argmax_screen=None):
  """(pick, pick_from_hidden) for greedy decoding or sampling, as
  `_decode_loop` and `continuous_decode` call it: pick(outputs, positions,
  row_keys) -> (tokens, token scores). A sampled token depends only on its
  row's key and its position in the sequence: fold_in(key, position)."""
  if config.strategy == 'greedy':
    if argmax_screen is not None and not return_scores:
      def pick_screened(hidden, positions, row_keys):
        del positions, row_keys
        token = screened_argmax(hidden, argmax_screen)
        return token, jnp.zeros(token.shape, jnp.float32)
      return pick_screened, True

    def pick_greedy(logits, positions, row_keys):
      del positions, row_keys
      token = first_argmax(logits)
      if not return_scores:
        return token, jnp.zeros(token.shape, jnp.float32)
      log_probs = jax.nn.log_softmax(logits, axis=-1)
      return token, _chosen(log_probs, token)
    return pick_greedy, False

  temperature, topk, topp = config.temperature, config.topk, config.topp

  def pick_sample(logits, positions, row_keys):
    if temperature == 0:
      token = first_argmax(logits)
      log_probs = jax.nn.log_softmax(logits, axis=-1)
    else:
      log_probs = jax.nn.log_softmax(
          transform_logits(logits, temperature, topk, topp), axis=-1)
      step_keys = jax.vmap(jax.random.fold_in)(
          row_keys, positions.astype(jnp.uint32))
      token = jax.vmap(jax.random.categorical)(
          step_keys, log_probs).astype(jnp.int32)
    return token, _chosen(log_probs, token)
  return pick_sample, False


def _chosen(log_probs, token):
  """log_probs [batch, vocab] at token [batch]."""
  return jnp.take_along_axis(log_probs, token[:, None], axis=-1)[:, 0]


def transform_logits(logits: jax.Array, temperature: float, topk: int,
                     topp: float) -> jax.Array:
  """T5X's sampling distribution: logits / temperature, then only the top
  `topk` tokens, or the smallest set whose probability reaches `topp`."""
  logits = logits / max(temperature, 1e-4)
  if topk:
    kth = jax.lax.top_k(logits, topk)[0][:, -1:]
    logits = jnp.where(logits < kth, -jnp.inf, logits)
  elif topp:
    ordered = jnp.sort(logits, axis=-1)[:, ::-1]
    probs = jax.nn.softmax(ordered, axis=-1)
    before = jnp.cumsum(probs, axis=-1) - probs  # mass above each token
    kept = jnp.where(before < topp, ordered, jnp.inf)
    cutoff = jnp.min(kept, axis=-1, keepdims=True)
    logits = jnp.where(logits < cutoff, -jnp.inf, logits)
  return logits


def temperature_sample(module: Transformer, variables,
                       encoder_input_tokens: jax.Array, max_length: int, *,
                       eos_id: Optional[int], example_keys: jax.Array,
                       num_decodes: int = 1, temperature: float = 1.0,
                       topk: int = 1, topp: float = 0.0,
                       max_steps: Optional[int] = None
                       ) -> Tuple[jax.Array, jax.Array]:
  """Samples `num_decodes` sequences per example, as T5X's
  temperature_sample: temperature 0 is arg-max; only one of topk and topp
  may be non-zero (T5X's defaults: temperature 1, topk 1, i.e. greedy).

  Returns (tokens [batch, num_decodes, max_length], scores [batch,
  num_decodes]), each example's decodes sorted by increasing score; the
  scores are log-probabilities under the transformed distribution (T5X's
  rescale_log_probs).

  `example_keys` [batch, 2] uint32 holds one key per example: decode d of
  an example draws step t's token with fold_in(fold_in(key, d), t), so an
  example's samples depend on its key alone, never on the batch it is in or
  its row there.
  """
  if topk and topp:
    raise ValueError(f'temperature_sample: only one of topk ({topk}) and '
                     f'topp ({topp}) may be non-zero')
  batch_size = encoder_input_tokens.shape[0]
  # Rows are example-major (example i's decodes are rows i*n .. i*n+n-1).
  row_keys = decode_keys(jnp.repeat(example_keys, num_decodes, axis=0),
                         jnp.tile(jnp.arange(num_decodes), batch_size))
  pick, _ = _picker(DecodingConfig(
      strategy='temperature_sample', num_decodes=num_decodes,
      temperature=temperature, topk=topk, topp=topp), True)
  tokens, scores = _decode_loop(module, variables, encoder_input_tokens,
                                max_length, eos_id, pick, max_steps,
                                copies=num_decodes, row_keys=row_keys)
  tokens = tokens.reshape(batch_size, num_decodes, max_length)
  scores = scores.reshape(batch_size, num_decodes)
  order = jnp.argsort(scores, axis=-1)
  return (jnp.take_along_axis(tokens, order[..., None], axis=1),
          jnp.take_along_axis(scores, order, axis=1))


def decode_keys(example_keys, decode_index):
  """The key of decode `decode_index` of the example with `example_keys`
  (both [rows, ...]): fold_in(example key, decode index)."""
  return jax.vmap(jax.random.fold_in)(example_keys,
                                      decode_index.astype(jnp.uint32))


def brevity_penalty(alpha: float, length) -> jax.Array:
  """T5X's length normalisation: ((5 + length) / 6) ** alpha."""
  return ((5.0 + length) / 6.0) ** alpha


class BeamState(NamedTuple):
  """Beam search carry; K beams per example, flattened as batch * K rows for
  the decoder.

  live_tokens [batch, K, L], live_scores [batch, K] (summed log-probs);
  finished_tokens [batch, K, L], finished_scores [batch, K] (log-probs over
  the brevity penalty, -inf where empty); cache rows follow live beams.
  """
  step: jax.Array
  live_tokens: jax.Array
  live_scores: jax.Array
  finished_tokens: jax.Array
  finished_scores: jax.Array
  cache: list


def beam_search(module: Transformer, variables,
                encoder_input_tokens: jax.Array, max_length: int, *,
                eos_id: int, num_decodes: int = 4, alpha: float = 0.6,
                max_steps: Optional[int] = None
                ) -> Tuple[jax.Array, jax.Array]:
  """Beam search with T5X's brevity penalty ((5 + length) / 6) ** alpha.

  Keeps `num_decodes` live beams, choosing among twice as many candidates
  each step; a candidate ending in EOS joins the finished set with its
  length-normalised score. Stops early when no live beam can beat the
  worst finished one. Returns (tokens [batch, K, max_length], scores [batch,
  K]) sorted by increasing score (the best is last), 0 after EOS; an
  example with no finished beam returns its live beams and log-probs.
  """
  cfg = module.config
  k = num_decodes
  batch_size = encoder_input_tokens.shape[0]
  cross, self_bias_table, encoder_mask = _decoder_inputs(
      module, variables, encoder_input_tokens, max_length, copies=k)
  steps = max_length if max_steps is None else min(max_steps, max_length)

  def should_continue(state: BeamState):
    return (state.step < steps) & jnp.any(_can_improve(
        state.live_scores, state.finished_scores, alpha, steps))

  def search_one(state: BeamState) -> BeamState:
    last = jax.lax.dynamic_slice_in_dim(state.live_tokens, state.step - 1, 1,
                                        axis=2)[..., 0]
    last = jnp.where(state.step == 0, cfg.decoder_start_id, last)
    logits, cache = module.apply(variables, last.reshape(-1), state.step,
                                 state.cache, self_bias_table, cross,
                                 encoder_mask, method='decode_step')
    log_probs = jax.nn.log_softmax(logits, axis=-1).reshape(
        batch_size, k, -1)
    beams, parents = _beam_step(
        state.live_tokens, state.live_scores, state.finished_tokens,
        state.finished_scores, log_probs, state.step, eos_id=eos_id,
        alpha=alpha)
    return BeamState(state.step + 1, *beams, _follow_beams(cache, parents))

  initial = BeamState(jnp.array(0, jnp.int32),
                      *_initial_beams(batch_size, k, max_length),
                      cache=module.init_cache(batch_size * k, max_length))
  final = jax.lax.while_loop(should_continue, search_one, initial)
  return _beam_result(final.live_tokens, final.live_scores,
                      final.finished_tokens, final.finished_scores)


def token_log_likelihoods(module: Transformer, variables,
                          encoder_input_tokens: jax.Array,
                          decoder_input_tokens: jax.Array,
                          decoder_target_tokens: jax.Array,
                          decoder_loss_weights: Optional[jax.Array] = None
                          ) -> jax.Array:
  """log p(target_t | inputs, targets_<t) per position, [batch, target_len].

  Positions whose loss weight is 0 (padding) score 0. Without explicit
  weights, positions whose target is 0 are padding.
  """
  logits = module.apply(variables, encoder_input_tokens,
                        decoder_input_tokens)
  log_probs = jax.nn.log_softmax(logits, axis=-1)
  token_scores = jnp.take_along_axis(log_probs,
                                     decoder_target_tokens[..., None],
                                     axis=-1)[..., 0]
  if decoder_loss_weights is None:
    decoder_loss_weights = decoder_target_tokens > 0
  return token_scores * decoder_loss_weights.astype(jnp.float32)


class SlotState(NamedTuple):
  """Continuous batching's carry: `slots` slots of `rows` decoding rows each
  (one row for greedy decoding and sampling, the beams of one example for
  beam search); a slot holds one queue item (an example, or one sample of
  it) until it ends, then the next.

  step:        scalar int32, steps taken; the cache row written now is
               step % cache length (a ring: a row's sequence never wraps
               onto itself, since it is at most that long).
  next_item:   scalar int32, the first queue item not yet in a slot.
  item:        [slots] int32, the item in each slot (items+ when empty).
  position:    [slots] int32, the position each slot decodes next.
  active:      [slots] bool, the slot holds an unfinished item.
  cache:       per decoder layer (keys, values) [slots*rows, heads, L, d_kv].
  cross:       per decoder layer (keys, values) [slots*rows, heads, in_len,
               d_kv].
  encoder_mask: [slots*rows, in_len] bool.
  search:      the search's own carry (`_SlotRows` or `_SlotBeams`).
  out:         (tokens [items, ..., L] int32, scores [items, ...] float32),
               the output; 0 after each EOS.
  """
  step: jax.Array
  next_item: jax.Array
  item: jax.Array
  position: jax.Array
  active: jax.Array
  cache: list
  cross: list
  encoder_mask: jax.Array
  search: Any
  out: Tuple[jax.Array, jax.Array]


class _SlotRows:
  """Greedy decoding or sampling in continuous batching: one row per slot,
  each queue item one sequence. Carry: (last token [slots] int32, sampling
  key [slots, 2] uint32); output ([items, L], [items])."""
  rows = 1

  def __init__(self, pick, from_hidden: bool, queue_keys, eos_id, steps,
               start_id: int):
    self.pick, self.from_hidden = pick, from_hidden
    self.queue_keys, self.eos_id = queue_keys, eos_id
    self.steps, self.start_id = steps, start_id

  def init(self, slots: int, items: int, max_length: int):
    carry = (jnp.full((slots,), self.start_id, jnp.int32),
             jnp.zeros((slots, 2), self.queue_keys.dtype))
    return carry, (jnp.zeros((items, max_length), jnp.int32),
                   jnp.zeros((items,), jnp.float32))

  def enter(self, carry, put, group_items):
    last_token, keys = carry
    count = group_items.shape[0]
    return (put(last_token, jnp.full(count, self.start_id, jnp.int32)),
            put(keys, jnp.take(self.queue_keys, group_items, axis=0)))

  def feed(self, state: SlotState):
    return state.search[0]

  def advance(self, state: SlotState, outputs):
    """(carry, out, parents, ended): the step's token for every row; no
    parents (rows are never reordered)."""
    _, keys = state.search
    token, token_score = self.pick(outputs, state.position, keys)
    token = jnp.where(state.active, token, 0)
    items = state.out[0].shape[0]
    item = jnp.where(state.active, state.item, items)  # inactive: dropped
    tokens = state.out[0].at[item, state.position].set(token, mode='drop')
    scores = state.out[1].at[item].add(token_score, mode='drop')
    ended = state.position + 1 >= self.steps
    if self.eos_id is not None:
      ended = ended | (token == self.eos_id)
    return (token, keys), (tokens, scores), None, ended


class _BeamCarry(NamedTuple):
  """Each slot's beams: live_tokens [slots, K, L], live_scores [slots, K]
  (summed log-probs), finished_tokens [slots, K, L], finished_scores
  [slots, K] (over the brevity penalty, NEG_INF where empty); increasing
  score along K, as in `BeamState`."""
  live_tokens: jax.Array
  live_scores: jax.Array
  finished_tokens: jax.Array
  finished_scores: jax.Array


def _initial_beams(count: int, k: int, max_length: int) -> _BeamCarry:
  """The search's start for `count` examples: one live beam at score 0
  (the other K-1 at NEG_INF, so the first step expands only it), nothing
  finished."""
  live_scores = jnp.concatenate(
      [jnp.full((count, k - 1), NEG_INF), jnp.zeros((count, 1))], 1)
  return _BeamCarry(jnp.zeros((count, k, max_length), jnp.int32),
                    live_scores,
                    jnp.zeros((count, k, max_length), jnp.int32),
                    jnp.full((count, k), NEG_INF))


def _gather_beams(x, beams):
  """x [batch, K0, ...], beams [batch, K1] indices -> [batch, K1, ...]."""
  return jnp.take_along_axis(
      x, beams.reshape(beams.shape + (1,) * (x.ndim - 2)), axis=1)


def _follow_beams(cache, parents):
  """The cache's rows [batch * K, ...] reordered so each example's (or
  slot's) K rows follow its live beams: parents [batch, K]."""
  batch, k = parents.shape
  return jax.tree_util.tree_map(
      lambda c: _gather_beams(c.reshape((batch, k) + c.shape[1:]),
                              parents).reshape(c.shape), cache)


def _beam_step(live_tokens, live_scores, finished_tokens, finished_scores,
               log_probs, position, *, eos_id, alpha):
  """One step of beam search for every example: log_probs [batch, K, vocab]
  of each live beam's next token, written at `position` ([batch] or a
  scalar). Returns the new (live_tokens, live_scores, finished_tokens,
  finished_scores) and the live beams' parents [batch, K] (for the cache).
  Among twice K candidates, the best K that did not end stay live; those
  that ended join the finished set with their length-normalised score."""
  batch, k, vocab = log_probs.shape
  candidates = (live_scores[..., None] + log_probs).reshape(batch, k * vocab)
  top_scores, top_index = jax.lax.top_k(candidates, 2 * k)
  top_beam, top_token = top_index // vocab, top_index % vocab
  top_tokens = _gather_beams(live_tokens, top_beam)
  at = jnp.arange(live_tokens.shape[-1]) == jnp.reshape(position, (-1, 1, 1))
  top_tokens = jnp.where(at, top_token[..., None].astype(jnp.int32),
                         top_tokens)
  ended = top_token == eos_id
  # Live: the best K candidates that did not end, kept in increasing order
  # of score (top_k gives decreasing order).
  live_scores, live_pick = jax.lax.top_k(
      jnp.where(ended, NEG_INF, top_scores), k)
  live_scores, live_pick = live_scores[:, ::-1], live_pick[:, ::-1]
  live_tokens = _gather_beams(top_tokens, live_pick)
  parents = _gather_beams(top_beam, live_pick)
  length = jnp.reshape(position, (-1, 1)) + 1
  new_finished = jnp.where(
      ended, top_scores / brevity_penalty(alpha, length), NEG_INF)
  all_scores = jnp.concatenate([finished_scores, new_finished], 1)
  all_tokens = jnp.concatenate([finished_tokens, top_tokens], 1)
  finished_scores, finished_pick = jax.lax.top_k(all_scores, k)
  finished_scores = finished_scores[:, ::-1]
  finished_tokens = _gather_beams(all_tokens, finished_pick[:, ::-1])
  return (live_tokens, live_scores, finished_tokens, finished_scores), parents


def _can_improve(live_scores, finished_scores, alpha, steps):
  """[batch] whether an example's best live beam, even at the longest
  length, could still beat its worst finished one."""
  best_live = live_scores[:, -1] / brevity_penalty(alpha, steps)
  return best_live > finished_scores[:, 0]


def _beam_result(live_tokens, live_scores, finished_tokens, finished_scores):
  """The finished beams, or the live ones where none finished."""
  any_finished = finished_scores[:, -1] > NEG_INF / 2
  return (jnp.where(any_finished[:, None, None], finished_tokens,
                    live_tokens),
          jnp.where(any_finished[:, None], finished_scores, live_scores))


class _SlotBeams:
  """Beam search in continuous batching: a slot holds one example's K beams
  (K consecutive rows), which it keeps together until the example's search
  ends (at the step limit, or when no live beam can beat its worst finished
  one); output ([items, K, L], [items, K]), increasing score."""

  def __init__(self, k: int, alpha: float, eos_id, steps, start_id: int):
    self.rows, self.alpha, self.eos_id = k, alpha, eos_id
    self.steps, self.start_id = steps, start_id
    self.from_hidden = False

  def init(self, slots: int, items: int, max_length: int):
    return _initial_beams(slots, self.rows, max_length), (
        jnp.zeros((items, self.rows, max_length), jnp.int32),
        jnp.zeros((items, self.rows), jnp.float32))

  def enter(self, carry: _BeamCarry, put, group_items):
    fresh = _initial_beams(group_items.shape[0], self.rows,
                           carry.live_tokens.shape[-1])
    return _BeamCarry(*(put(a, b) for a, b in zip(carry, fresh)))

  def feed(self, state: SlotState):
    """Each beam's last token; the start token in a fresh or empty slot.
    (An empty slot's position runs past the cache: reading there would
    give a token out of the vocabulary, whose NaN embedding would reach
    the slot's cache rows and, through attention's zero weights, the next
    example in the slot.)"""
    live_tokens = state.search.live_tokens
    length = live_tokens.shape[-1]
    previous = jnp.clip(state.position - 1, 0, length - 1)[:, None, None]
    last = jnp.take_along_axis(
        live_tokens, jnp.broadcast_to(previous, live_tokens.shape[:2] + (1,)),
        axis=2)[..., 0]
    fresh = (state.position == 0) | ~state.active
    last = jnp.where(fresh[:, None], self.start_id, last)
    return last.reshape(-1)

  def advance(self, state: SlotState, outputs):
    """(carry, out, parents, ended): one beam-search step in every slot;
    an example's beams go to the output in the step its search ends."""
    slots = state.position.shape[0]
    log_probs = jax.nn.log_softmax(outputs, axis=-1).reshape(
        slots, self.rows, -1)
    carry, parents = _beam_step(*state.search, log_probs, state.position,
                                eos_id=self.eos_id, alpha=self.alpha)
    carry = _BeamCarry(*carry)
    ended = (state.position + 1 >= self.steps) | ~_can_improve(
        carry.live_scores, carry.finished_scores, self.alpha, self.steps)
    items = state.out[0].shape[0]
    item = jnp.where(state.active & ended, state.item, items)
    tokens, scores = _beam_result(*carry)
    out = (state.out[0].at[item].set(tokens, mode='drop'),
           state.out[1].at[item].set(scores, mode='drop'))
    return carry, out, parents, ended


def _with_room(queue, group: int):
  """`queue` with `group` rows of zeros after it: room for a whole group
  past the end, so a group's slice never shifts."""
  return jnp.concatenate(
      [queue, jnp.zeros((group,) + queue.shape[1:], queue.dtype)])


def continuous_decode(module: Transformer, variables, queue_tokens,
                      queue_keys, num_items, *, slots: int, group: int,
                      buckets: Tuple[int, ...], max_length: int,
                      eos_id: Optional[int], config: DecodingConfig,
                      return_scores: bool = True, argmax_screen=None):
  """Decodes a queue of examples with `slots` slots that never wait for
  each other: when a slot's search ends, the slot takes the next queue
  item. Returns (tokens [examples, n, max_length], scores [examples, n]),
  n = num_decodes, each example's decodes in increasing score, for the
  first `num_items` (a traced scalar) of `queue_tokens` [examples, in_len].

  Greedy decoding and sampling: a slot is one row, and each decode of an
  example is a queue item of its own (its n samples run in any slots; the
  encoder runs once for the example).
  Beam search: a slot is the K = num_decodes rows of one example's beams,
  kept together (the cache reordered within the slot).

  Items enter `group` at a time, once that many slots are free (or all
  that are left): the encoder runs on the group, and its cross-attention
  keys and values are written into the free slots' rows. The work goes in
  phases, one per bucket of `buckets` (input lengths; in_len is always the
  last): the phase of bucket b takes the items up to the first longer than
  b, and runs their encoder and every row's cross-attention at width b. A
  queue sorted by input length therefore spends little on padding; any
  order gives the same tokens. Every shape is fixed, so one compilation
  serves any queue of this size, on any backend.

  Each example's result is what static batching gives it (a slot's search
  reads nothing of other slots), up to float32 summation order: the ring
  cache visits positions in a rotated order. `queue_keys` [examples, 2]:
  each example's sampling key; decode d draws from decode_keys(key, d) at
  fold_in(that key, position), as static batching does.
  """
  cfg = module.config
  examples, in_len = queue_tokens.shape
  steps = max_length if config.max_decode_steps is None else min(
      config.max_decode_steps, max_length)
  if not 1 <= group <= slots:
    raise ValueError(f'refill group {group} must lie in 1..{slots} (slots)')
  buckets = tuple(sorted(set(int(b) for b in buckets) | {in_len}))
  if buckets[0] < 1 or buckets[-1] != in_len:
    raise ValueError(f'length buckets {buckets} must lie in 1..{in_len}')
  if config.strategy == 'beam_search':
    copies = 1  # queue items per example: the example, with its K beams
    search = _SlotBeams(config.num_decodes, config.alpha, eos_id, steps,
                        cfg.decoder_start_id)
  else:
    # Example-major: example i's samples are items i*n .. i*n+n-1.
    copies = config.num_decodes
    queue_keys = decode_keys(jnp.repeat(queue_keys, copies, axis=0),
                             jnp.tile(jnp.arange(copies), examples))
    num_items = num_items * copies
    pick, from_hidden = _picker(config, return_scores, argmax_screen)
    search = _SlotRows(pick, from_hidden, _with_room(queue_keys, group),
                       eos_id, steps, cfg.decoder_start_id)
  items = examples * copies
  rows = search.rows
  # A group of items spans this many examples at most; the encoder runs
  # once for each (not once per sample).
  spans = group if copies == 1 else (group - 1) // copies + 2
  queue_tokens = _with_room(queue_tokens, spans)
  used = jnp.repeat(jnp.max(jnp.where(
      queue_tokens[:examples] != 0, jnp.arange(1, in_len + 1), 0), axis=1),
                    copies)  # [items]
  # bias_by_age[:, a]: the self-attention bias of a key written `a` steps
  # ago (relative position -a), read from the causal table's last row.
  table = module.apply(variables, max_length, method='decoder_self_bias')
  bias_by_age = table[:, max_length - 1, ::-1]  # [heads, L]

  def by_slot(array):
    return array.reshape((slots, rows) + array.shape[1:])

  def wanted(state: SlotState):
    """Whether enough slots are free for the next group (or for all that
    is left of the queue)."""
    waiting = num_items - state.next_item
    free = slots - jnp.sum(state.active)
    return (waiting > 0) & (free >= jnp.minimum(group, waiting))

  def phase(state: SlotState, width: int, end, last: bool) -> SlotState:
    """Runs items up to `end` (exclusive) at input width `width`; the last
    phase also decodes until every slot has ended."""
    def refill(state: SlotState) -> SlotState:
      free = ~state.active
      count = jnp.minimum(jnp.minimum(jnp.sum(free), end - state.next_item),
                          group)
      group_items = state.next_item + jnp.arange(group, dtype=jnp.int32)
      taken = jnp.arange(group) < count
      # The group's examples, encoded once each; `which`: each item's.
      first = state.next_item // copies
      which = group_items // copies - first
      tokens = jax.lax.dynamic_slice(queue_tokens, (first, 0),
                                     (spans, width))
      tokens = jnp.where(
          (jnp.arange(spans) <= which[count - 1])[:, None], tokens, 0)
      encoded = module.apply(variables, tokens, method='encode')
      cross = module.apply(variables, encoded, method='step_cross_kv')
      mask = tokens > 0
      if copies > 1:
        cross, mask = jax.tree_util.tree_map(
            lambda x: jnp.take(x, which, axis=0), (cross, mask))
      # The first `count` free slots, in slot order; the rest of the group
      # goes nowhere (an index past the end is dropped).
      chosen = jnp.where(
          taken, jnp.argsort(state.active, stable=True)[:group], slots)

      def put(array, values):
        return array.at[chosen].set(values.astype(array.dtype), mode='drop')

      def put_rows(array, values):
        """Each of the group's values into every row of its slot."""
        values = jnp.broadcast_to(values[:, None], (group, rows) +
                                  values.shape[1:])
        return put(by_slot(array), values).reshape(array.shape)
      return state._replace(
          next_item=state.next_item + count,
          item=put(state.item, group_items),
          position=put(state.position, jnp.zeros(group, jnp.int32)),
          active=put(state.active, jnp.ones(group, bool)),
          search=search.enter(state.search, put, group_items),
          cross=[(put_rows(k, nk), put_rows(v, nv))
                 for (k, v), (nk, nv) in zip(state.cross, cross)],
          encoder_mask=put_rows(state.encoder_mask, mask))

    def decode_one(state: SlotState) -> SlotState:
      write = state.step % max_length
      age = (write - jnp.arange(max_length)) % max_length
      position = jnp.repeat(state.position, rows)
      visible = age[None, :] <= position[:, None]  # [slots*rows, L]
      self_bias = jnp.where(visible[:, None, None, :],
                            bias_by_age[:, age][None, :, None, :], MASK_VALUE)
      outputs, cache = module.apply(variables, search.feed(state), write,
                                    state.cache, self_bias, state.cross,
                                    state.encoder_mask, search.from_hidden,
                                    method='decode_step_biased')
      carry, out, parents, ended = search.advance(state, outputs)
      if parents is not None:
        cache = _follow_beams(cache, parents)
      return state._replace(
          step=state.step + 1, position=state.position + 1,
          active=state.active & ~ended, cache=cache, search=carry, out=out)

    def body(state: SlotState) -> SlotState:
      # Two inner loops, not a conditional choosing per step: with one,
      # steps were 10% slower on XLA's CPU backend (full-length examples,
      # 32 rows).
      state = jax.lax.while_loop(
          lambda state: wanted(state) & (state.next_item < end), refill,
          state)
      return jax.lax.while_loop(
          lambda state: ~wanted(state) & jnp.any(state.active), decode_one,
          state)

    def more(state: SlotState):
      if last:
        return (state.next_item < num_items) | jnp.any(state.active)
      return state.next_item < end
    return jax.lax.while_loop(more, body, state)

  dtype = module.init_cache(1, 1)[0][0].dtype
  carry, out = search.init(slots, items, max_length)
  state = SlotState(
      step=jnp.array(0, jnp.int32),
      next_item=jnp.array(0, jnp.int32),
      item=jnp.full((slots,), items, jnp.int32),
      position=jnp.zeros((slots,), jnp.int32),
      active=jnp.zeros((slots,), bool),
      cache=module.init_cache(slots * rows, max_length),
      cross=None, encoder_mask=None, search=carry, out=out)
  for index, width in enumerate(buckets):
    if index == 0:
      shape = (slots * rows, cfg.num_heads, width, cfg.d_kv)
      cross = [(partitioning.constrain(jnp.zeros(shape, dtype), CACHE_AXES),
                partitioning.constrain(jnp.zeros(shape, dtype), CACHE_AXES))
               for _ in range(cfg.num_decoder_layers)]
      mask = jnp.zeros((slots * rows, width), bool)
    else:  # the rows still decoding keep their keys and values, wider
      pad = [(0, 0), (0, 0), (0, width - buckets[index - 1]), (0, 0)]
      cross = [(jnp.pad(k, pad), jnp.pad(v, pad)) for k, v in state.cross]
      mask = jnp.pad(state.encoder_mask,
                     [(0, 0), (0, width - buckets[index - 1])])
    # The items of this phase: up to the first one longer than `width`.
    longer = jnp.where(used > width, jnp.arange(items), items)
    end = jnp.minimum(jnp.min(longer), num_items)
    state = phase(state._replace(cross=cross, encoder_mask=mask), width, end,
                  last=index == len(buckets) - 1)
  tokens, scores = state.out
  if isinstance(search, _SlotBeams):
    return tokens, scores
  tokens = tokens.reshape(examples, copies, max_length)
  scores = scores.reshape(examples, copies)
  if copies == 1:
    return tokens, scores
  order = jnp.argsort(scores, axis=-1)
  return (jnp.take_along_axis(tokens, order[..., None], axis=1),
          jnp.take_along_axis(scores, order, axis=1))
