"""The arg-max over the output layer's logits without the full float32 matmul.

Greedy decoding needs only the index of each row's largest logit, yet the
output layer ([d_model, vocab], 32128 or 250112 wide) is the biggest matmul
of a decoding step: about 40% of T5 1.1 small's decoding FLOPs. On CPUs with
bfloat16 dot-product instructions (AVX512_BF16, AMX) XLA runs that matmul
about 1.8x faster with bfloat16 inputs and float32 accumulation. Those logits
are approximate, so they only screen:

1. `a = bf16(h) @ bf16(W)`, accumulated in float32.
2. Every logit's error is bounded: with `hb = bf16(h)`, `s = h - hb` and the
   kernel's rounding residue `r = W - bf16(W)`, `h.w - hb.bf16(w) = hb.r +
   s.w`, so by Cauchy-Schwarz `|a_v - z_v| <= E = |hb| max|r_v| + |s|
   max|w_v|` plus the float32 summation error of both dot products, where
   `z_v` is the float32 logit. Only tokens with `a_v >= max(a) - 2E` can be
   the float32 arg-max (no other token can beat the approximate winner).
3. The candidates are found among the rows' best 128-token blocks, their
   float32 logits are computed from the kernel's rows, and the first index
   of the largest wins, as `first_argmax` over all logits would choose.

When a row has more candidates than are kept, or a non-finite value, the
step computes every float32 logit instead. The token is the arg-max of
float32 logits either way. Like any change of float32 summation order (a
different batch shape does it too), the candidates' dot products can
order two logits within a few units in the last place of each other
differently from the full matmul; nothing coarser than that depends on
the screen. With random weights (the hardest case: near-ties everywhere)
rows have about 2 candidates; trained models' logits are more peaked.
"""

import os
from typing import Dict

import jax
import jax.numpy as jnp

from model import runtime

# Tokens per block of the vocabulary for the first, blockwise screen.
BLOCK = 128
# Blocks, then tokens, kept per row; more candidates than this fall back to
# all float32 logits.
BLOCKS_KEPT = 16
CANDIDATES_KEPT = 16
# Below this vocabulary size the output layer is too small to gain.
MIN_VOCAB = 4096

# Flags in /proc/cpuinfo for instructions that multiply bfloat16 pairs into
# float32; without them XLA's bfloat16 matmul is slower than float32.
_BF16_DOT_FLAGS = ('avx512_bf16', 'amx_bf16')


def first_argmax(logits: jax.Array) -> jax.Array:
  """jnp.argmax over the last axis (the first index of the maximum), int32.

  Written as a max and a masked min: two plain reductions that XLA's CPU
  backend runs 2.5x faster than argmax's paired-value reduction over a
  32k vocabulary.
  """
  vocab_size = logits.shape[-1]
  best = jnp.max(logits, axis=-1, keepdims=True)
  positions = jnp.arange(vocab_size, dtype=jnp.int32)
  first = jnp.min(jnp.where(logits == best, positions, vocab_size), axis=-1)
  # All-NaN rows match nothing; keep the index in range.
  return jnp.minimum(first, vocab_size - 1)


def cpu_has_bf16_dot() -> bool:
  """Whether this (Linux) CPU multiplies bfloat16 pairs in hardware."""
  return any(flag in runtime.cpu_flags() for flag in _BF16_DOT_FLAGS)


def worthwhile(vocab_size: int, activation_dtype: str) -> bool:
  """Whether screening speeds up greedy decoding here: float32 activations
  on a CPU backend with bfloat16 dot instructions and a large vocabulary.
  T5BEAM_SCREENED_ARGMAX=0 turns it off."""
  if os.environ.get('T5BEAM_SCREENED_ARGMAX', '1') == '0':
    return False
  return (jnp.dtype(activation_dtype) == jnp.float32 and
          vocab_size >= MIN_VOCAB and jax.default_backend() == 'cpu' and
          cpu_has_bf16_dot())


def check_applicable(activation_dtype: str):
  """Raises unless the screen gives float32 arg-maxes here: float32
  activations (bfloat16 ones have bfloat16 logits) on a CPU backend (on
  GPU and TPU float32 matmuls may run at TF32 or bfloat16 precision)."""
  if jnp.dtype(activation_dtype) != jnp.float32:
    raise ValueError(f'screen_argmax needs float32 activations, not '
                     f'{activation_dtype}: leave screen_argmax unset')
  if jax.default_backend() != 'cpu':
    raise ValueError(f'screen_argmax is for CPU backends, not '
                     f'{jax.default_backend()}: leave screen_argmax unset')


def _row_norms(x: jax.Array) -> jax.Array:
  """Euclidean norms of the rows of x [..., n] that neither underflow nor
  overflow in the squares: each row is scaled by a power of two (exactly)
  to a largest magnitude in [0.5, 1) first. XLA's CPU code flushes
  denormals to zero, so squares of entries below about 1e-19 would vanish."""
  _, exponent = jnp.frexp(jnp.max(jnp.abs(x), axis=-1, keepdims=True))
  scaled = jnp.ldexp(x, -exponent)
  return jnp.ldexp(jnp.sqrt(jnp.sum(jnp.square(scaled), axis=-1)),
                   exponent[..., 0])


def make_screen(rows: jax.Array) -> Dict[str, jax.Array]:
  """What `screened_argmax` reads, for logits `h @ rows.T` (rows [vocab,
  d_model], the output kernel transposed, or T5 1.0's embedding table):

  rows:        [vocab, d_model] float32, for the exact logits;
  kernel_bf16: [d_model, padded vocab] bfloat16, the columns padded with 0
               to whole blocks;
  norms:       [3] float32: the largest row norm of the residue rows -
               bf16(rows), of rows, and of bf16(rows).
  """
  rows = jnp.asarray(rows, jnp.float32)
  vocab_size = rows.shape[0]
  rounded = rows.astype(jnp.bfloat16)
  rounded_f32 = rounded.astype(jnp.float32)
  norms = jnp.stack([jnp.max(_row_norms(rows - rounded_f32)),
                     jnp.max(_row_norms(rows)),
                     jnp.max(_row_norms(rounded_f32))])
  padding = -vocab_size % BLOCK
  kernel = jnp.pad(rounded.T, ((0, 0), (0, padding)))
  return {'rows': rows, 'kernel_bf16': kernel, 'norms': norms}


def approximate_logits(h: jax.Array,
                       screen: Dict[str, jax.Array]) -> jax.Array:
  """bf16(h) @ the bfloat16 kernel, accumulated in float32: [batch, padded
  vocab], -inf in the padding."""
  kernel = screen['kernel_bf16']
  vocab_size = screen['rows'].shape[0]
  approx = jnp.dot(h.astype(jnp.bfloat16), kernel,
                   preferred_element_type=jnp.float32)
  if kernel.shape[1] != vocab_size:
    approx = jnp.where(jnp.arange(kernel.shape[1]) < vocab_size, approx,
                       -jnp.inf)
  return approx


def error_bound(h: jax.Array, screen: Dict[str, jax.Array]) -> jax.Array:
  """[batch]: a bound on |approximate - float32 logit| for every token of
  the row (module docstring)."""
  norms = screen['norms']
  residue_norm, row_norm, rounded_norm = norms[0], norms[1], norms[2]
  h_bf16 = h.astype(jnp.bfloat16).astype(jnp.float32)
  d_model = h.shape[-1]
  # Float32 summation error of a d_model-term dot product in any order,
  # doubled for the bfloat16 pair instructions' intermediate roundings.
  unit = 2.0**-24
  terms = 2 * d_model
  gamma = terms * unit / (1 - terms * unit)
  h_norm, h_bf16_norm = _row_norms(h), _row_norms(h_bf16)
  bound = (h_bf16_norm * residue_norm + _row_norms(h - h_bf16) * row_norm
           + gamma * (h_bf16_norm * rounded_norm + h_norm * row_norm))
  # Margins: rounding in this float32 arithmetic and in the threshold's
  # subtraction (a few units in the last place of the largest logit, which
  # is at most about |h| max|w|), and products under float32's smallest
  # normal (2**-126) flushed to zero: at most 2 * d_model of them per dot
  # product, far below 1e-30.
  return bound * (1 + 2.0**-10) + 4 * unit * h_norm * row_norm + 1e-30


def screened_argmax(h: jax.Array, screen: Dict[str, jax.Array]) -> jax.Array:
  """first_argmax(h @ screen['rows'].T) for h [batch, d_model] float32,
  -> [batch] int32, mostly without computing the float32 logits."""
  token, screened = screen_rows(h, screen)
  return jax.lax.cond(
      jnp.all(screened), lambda: token,
      lambda: first_argmax(jnp.dot(h, screen['rows'].T)))


def screen_rows(h: jax.Array, screen: Dict[str, jax.Array]):
  """(token [batch] int32, screened [batch] bool): where `screened`, token
  is first_argmax(h @ screen['rows'].T); elsewhere the row had too many
  candidates (or a non-finite value) and token means nothing."""
  rows = screen['rows']
  vocab_size = rows.shape[0]
  batch_size = h.shape[0]
  approx = approximate_logits(h, screen)  # [batch, padded vocab]
  num_blocks = approx.shape[1] // BLOCK
  blocks = approx.reshape(batch_size, num_blocks, BLOCK)
  block_max = jnp.max(blocks, axis=-1)  # [batch, num_blocks]
  threshold = (jnp.max(block_max, axis=-1)
               - 2 * error_bound(h, screen))  # [batch]
  blocks_kept = min(BLOCKS_KEPT, num_blocks)
  _, block_ids = jax.lax.top_k(block_max, blocks_kept)  # [batch, blocks_kept]
  # [batch, blocks_kept, BLOCK] -> [batch, blocks_kept * BLOCK]
  kept = jnp.take_along_axis(blocks, block_ids[:, :, None], axis=1).reshape(
      batch_size, blocks_kept * BLOCK)
  candidates_kept = min(CANDIDATES_KEPT, blocks_kept * BLOCK)
  _, positions = jax.lax.top_k(kept, candidates_kept)
  token_ids = (jnp.take_along_axis(block_ids, positions // BLOCK, axis=1)
               * BLOCK + positions % BLOCK)  # [batch, candidates_kept]
  # [batch, d_model] x [batch, candidates_kept, d_model] -> [batch, candidates]
  exact = jnp.einsum('bd,bkd->bk', h, jnp.take(rows, token_ids, axis=0))
  best = jnp.max(exact, axis=-1, keepdims=True)
  token = jnp.min(jnp.where(exact == best, token_ids, vocab_size), axis=-1)
  screened = (
      jnp.isfinite(threshold)
      & (jnp.sum(block_max >= threshold[:, None], axis=-1) <= blocks_kept)
      & (jnp.sum(kept >= threshold[:, None], axis=-1) <= candidates_kept)
      & jnp.all(jnp.isfinite(exact), axis=-1))
  return token.astype(jnp.int32), screened


def output_rows(params, logits_via_embedding: bool) -> jax.Array:
  """The output layer as rows [vocab, d_model]: T5 1.0's embedding table,
  or the transposed `decoder/logits_dense` kernel."""
  if logits_via_embedding:
    return params['token_embedder']['embedding']
  return params['decoder']['logits_dense']['kernel'].T
