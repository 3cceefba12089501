"""The screened arg-max gives exactly the float32 logits' arg-max.

The reference is numpy: float64 logits of the same float32 weights. Float32
rounding can only change an arg-max whose top two logits are closer than
float32's error bound for the dot product; such rows are left out of the
comparison (and counted).
"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from model import screened_argmax as screening
from model.config import T5Config
from model.inference import InferenceModel
from model.network import init_params

D_MODEL = 512
# Not a whole number of 128-token blocks: the padding is under test too.
VOCAB = 8000


def _weights(rng, vocab=VOCAB, d_model=D_MODEL, scale=0.05):
  return (rng.standard_normal((vocab, d_model)) * scale).astype(np.float32)


def _bf16(x):
  """x rounded to bfloat16 as XLA rounds it, back in float32."""
  return np.asarray(jnp.asarray(x).astype(jnp.bfloat16).astype(jnp.float32))


def _reference_argmax(h, rows):
  """(arg-max [batch], decided [batch]): decided where the top two float64
  logits are further apart than float32 dot products can err (each by at
  most d_model * 2**-24 * |h| |w| in any summation order)."""
  logits = h.astype(np.float64) @ rows.astype(np.float64).T
  top_two = np.sort(logits, axis=-1)[:, -2:]
  error = (h.shape[-1] * 2.0**-24 * np.linalg.norm(h, axis=-1)
           * np.linalg.norm(rows, axis=-1).max())
  return np.argmax(logits, axis=-1), top_two[:, 1] - top_two[:, 0] > 2 * error


_screen_rows = jax.jit(screening.screen_rows)
_screened_argmax = jax.jit(screening.screened_argmax)


@pytest.mark.parametrize('distribution', ['normal', 'heavy_tailed'])
def test_tokens_equal_the_float32_argmax(distribution):
  rng = np.random.default_rng(0)
  rows = _weights(rng)
  if distribution == 'normal':
    h = rng.standard_normal((512, D_MODEL)).astype(np.float32)
  else:  # a few huge coordinates, as in trained models' hidden states
    h = rng.standard_t(2, (512, D_MODEL)).astype(np.float32) * 30
  screen = screening.make_screen(rows)
  expected, decided = _reference_argmax(h, rows)
  assert decided.sum() >= 500
  tokens, screened = _screen_rows(h, screen)
  np.testing.assert_array_equal(
      np.asarray(_screened_argmax(h, screen))[decided], expected[decided])
  # The screen itself settles (nearly) every row, not the float32 fallback.
  screened = np.asarray(screened)
  assert np.mean(screened) > 0.99
  np.testing.assert_array_equal(np.asarray(tokens)[screened & decided],
                                expected[screened & decided])


@pytest.mark.parametrize('h_scale,w_scale', [
    (1.0, 1.0), (1e3, 1e-3),
    # Squares of entries this small vanish in float32 (XLA's CPU code
    # flushes denormals), and of entries this large overflow.
    (1e-20, 1.0), (1.0, 1e-20), (1e15, 1.0)])
def test_error_bound_covers_every_logit(h_scale, w_scale):
  # The inequality the screen rests on, against XLA's real bfloat16 kernel:
  # |approximate - exact| <= bound for every token, and the bound is tight
  # enough to be useful: about a tenth of the logits' spread, so few tokens
  # come within two bounds of the top.
  rng = np.random.default_rng(1)
  rows = _weights(rng, scale=0.05 * w_scale)
  h = (rng.standard_t(3, (256, D_MODEL)) * h_scale).astype(np.float32)
  screen = screening.make_screen(rows)
  approx = np.asarray(screening.approximate_logits(h, screen))[:, :VOCAB]
  bound = np.asarray(screening.error_bound(h, screen))
  exact = h.astype(np.float64) @ rows.astype(np.float64).T
  error = np.abs(approx - exact).max(axis=-1)
  assert (error <= bound).all(), (error / bound).max()
  assert (bound < 0.2 * exact.std(axis=-1)).all()


def test_error_bound_covers_rounding_aligned_with_a_row():
  # The two rounding terms of the bound met with equality (Cauchy-Schwarz
  # is tight when the rounding residue points along the row): each term
  # is needed.
  rng = np.random.default_rng(5)
  # (1) h exact in bfloat16, along the residue of row 7: the error is
  # |h| |w_7 - bf16(w_7)|.
  rows = _weights(rng)
  exact_rows = _bf16(rows)
  h = _bf16((rows - exact_rows)[7:8] * 1e4)
  # (2) weights exact in bfloat16, and h's residue along row 7.
  base = _bf16(exact_rows[7:8] * 100)
  # Each entry under half a bfloat16 step of base's: bf16(h2) == base.
  h2 = (base + exact_rows[7:8] * (100 * 2.0**-10)).astype(np.float32)
  assert np.array_equal(_bf16(h2), base)
  for weights, row in ((rows, h), (exact_rows, h2)):
    screen = screening.make_screen(weights)
    approx = np.asarray(screening.approximate_logits(row, screen))[0, 7]
    exact = (row.astype(np.float64) @ weights[7].astype(np.float64))[0]
    bound = np.asarray(screening.error_bound(row, screen))[0]
    assert abs(approx - exact) <= bound
    assert abs(approx - exact) > 0.3 * bound  # the case really is tight


def test_ties_go_to_the_first_index():
  rng = np.random.default_rng(2)
  rows = _weights(rng)
  rows[[17, 5000, 7999]] = rows[5000] * 3  # three equal, largest rows
  h = np.stack([rows[5000], -rows[5000]]).astype(np.float32)
  tokens = np.asarray(_screened_argmax(h, screening.make_screen(rows)))
  assert tokens[0] == 17
  expected, decided = _reference_argmax(h, rows)
  assert decided[1] and tokens[1] == expected[1]


def test_near_ties_are_settled_in_float32():
  # Row 6000 beats row 100 by one part in 4096: closer than the bfloat16
  # logits can tell apart, decided by the float32 logits.
  rng = np.random.default_rng(3)
  rows = _weights(rng)
  rows[100] = rows[100] * 4
  rows[6000] = rows[100] * np.float32(1 + 2**-12)
  screen = screening.make_screen(rows)
  h = np.stack([rows[100], rows[100] + rows[5]]).astype(np.float32)
  approx = np.asarray(screening.approximate_logits(h, screen))
  assert (np.abs(approx[:, 6000] - approx[:, 100])
          < np.asarray(screening.error_bound(h, screen))).all()
  tokens, screened = _screen_rows(h, screen)
  assert np.asarray(screened).all()
  np.testing.assert_array_equal(np.asarray(tokens), [6000, 6000])


@pytest.mark.parametrize('ties,same_block,screened', [
    (16, True, True), (17, True, False),    # candidates kept per row
    (16, False, True), (17, False, False),  # blocks kept per row
])
def test_each_candidate_limit_is_enforced(ties, same_block, screened):
  rng = np.random.default_rng(6)
  rows = _weights(rng)
  tied = (np.arange(ties) + 256 if same_block else
          np.arange(ties) * screening.BLOCK + 3)
  rows[tied] = rows[tied[0]] * 3
  h = rows[tied[0]][None].copy()
  tokens, settled = _screen_rows(h, screening.make_screen(rows))
  assert bool(np.asarray(settled)[0]) == screened
  assert np.asarray(_screened_argmax(h, screening.make_screen(rows)))[0] == (
      tied.min())
  if screened:
    assert np.asarray(tokens)[0] == tied.min()


def test_rows_with_too_many_candidates_fall_back_to_float32():
  rng = np.random.default_rng(4)
  rows = _weights(rng)
  # 40 equal best rows: more candidates than the screen keeps.
  many = rng.choice(VOCAB, 40, replace=False)
  rows[many] = rows[many[0]] * 3
  h = np.stack([rows[many[0]], rng.standard_normal(D_MODEL),
                np.full(D_MODEL, np.nan)]).astype(np.float32)
  screen = screening.make_screen(rows)
  _, screened = _screen_rows(h, screen)
  np.testing.assert_array_equal(np.asarray(screened), [False, True, False])
  tokens = np.asarray(_screened_argmax(h, screen))
  assert tokens[0] == many.min()
  assert tokens[1] == _reference_argmax(h[1:2], rows)[0][0]
  assert _reference_argmax(h[1:2], rows)[1][0]
  # An all-NaN row gets what first_argmax gives it: an index in range.
  assert tokens[2] == np.asarray(screening.first_argmax(
      jnp.dot(h[2:], rows.T)))[0]


def test_forcing_the_screen_on_bfloat16_activations_is_refused():
  # bfloat16 activations give bfloat16 logits, whose arg-max the screen
  # (which answers for float32 logits) would not reproduce.
  config = T5Config(vocab_size=300, d_model=32, num_heads=2, d_kv=8,
                    d_ff=64, num_encoder_layers=1, num_decoder_layers=1,
                    dtype='bfloat16')
  with pytest.raises(ValueError, match='float32 activations'):
    InferenceModel(config, init_params(config), screen_argmax=True)
  assert InferenceModel(config, init_params(config)).argmax_screen is None
