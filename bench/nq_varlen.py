"""Benchmark "nq-varlen": batching on varied lengths, against transformers.

T5 1.1 small (as nq-small-greedy: random weights shared by every side),
but inputs and answers of varied length, as real questions and answers are:
input lengths round(exp(N(2.5, 0.55))) clipped to 4..64 tokens (the last
one EOS), padded to a feature length of 64; the output layer's EOS row is
scaled (--eos_scale) so that greedy answers end anywhere from 1 token to
the 32-token limit, most of them short (the histogram is printed). Greedy,
float32 by default.

Sides, all in this process on the same threads: ours with static batching
(T5X's: every input padded to 64, each batch decoded until its longest
answer ends), length-aware batching and continuous batching (see
`model.batching`), each over all the examples as one chunk; and
transformers' greedy `generate`, which pads each batch to its longest input
and stops when all its rows have ended. Our sides compile first (on one
example of each length bucket, and the queue's size); each side then runs
--rounds rounds, alternating, and its best round is reported, in
examples/s and decoded tokens/s. Every side's tokens are compared with transformers':
the count of differing sequences, and how many of those first differ at a
near-tie (the two tokens' float32 logits, teacher-forced in transformers,
within --near_tie of each other). Not a test: run it by hand.

    .venv/bin/python bench/nq_varlen.py [--examples 2048] [--batch_sizes 32,128]
        [--dtype bfloat16] [--modes static,length,continuous] [--uniform]
        [--decoding beam_search:4]
"""

import argparse
import copy
import os
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from model import runtime  # pylint: disable=g-import-not-at-top

runtime.configure_xla_cpu()  # before JAX starts

import jax  # pylint: disable=g-import-not-at-top
import numpy as np  # pylint: disable=g-import-not-at-top
import torch

from bench.nq_small_greedy import cpu_report, shared_weights
from model.batching import Batching, row_buckets
from model.decoding import DecodingConfig
from model.inference import InferenceModel

FEATURE_LENGTH = 64
DECODE_LENGTH = 32
OURS = 'ours'  # float32_tokens' key for every one of our modes
TRANSFORMERS = 'transformers'
# --uniform: nq-small-greedy's shape (every input this long, every answer
# DECODE_LENGTH tokens), where nothing is padding and no row waits.
UNIFORM_INPUT_LENGTH = 38


def varlen_inputs(rng: np.random.Generator, count: int, vocab_size: int,
                  uniform: bool = False) -> np.ndarray:
  """[count, 64] int32: random ids, each input ending in EOS (1), lengths
  round(exp(N(2.5, 0.55))) clipped to 4..64 (`uniform`: all 38), 0-padded."""
  lengths = np.clip(np.round(np.exp(rng.normal(2.5, 0.55, count))), 4,
                    FEATURE_LENGTH).astype(int)
  if uniform:
    lengths[:] = UNIFORM_INPUT_LENGTH
  tokens = rng.integers(2, vocab_size,
                        size=(count, FEATURE_LENGTH)).astype(np.int32)
  tokens[np.arange(count), lengths - 1] = 1
  tokens[np.arange(FEATURE_LENGTH)[None, :] >= lengths[:, None]] = 0
  return tokens


def answer_lengths(tokens: np.ndarray) -> np.ndarray:
  return (tokens > 0).sum(axis=1)


def transformers_decode(hf_model, inputs, batch_size, full_length=False):
  """transformers' greedy generate, batch by batch in the given order, each
  batch cut to its longest input: tokens [count, 32], 0 after EOS."""
  out = np.zeros((len(inputs), DECODE_LENGTH), np.int32)
  for begin in range(0, len(inputs), batch_size):
    batch = inputs[begin:begin + batch_size]
    width = int((batch > 0).sum(axis=1).max())
    ids = torch.from_numpy(batch[:, :width].astype(np.int64))
    with torch.no_grad():
      generated = hf_model.generate(
          input_ids=ids, attention_mask=ids > 0, do_sample=False,
          num_beams=1, use_cache=True, max_new_tokens=DECODE_LENGTH,
          min_new_tokens=DECODE_LENGTH if full_length else 0,
          eos_token_id=1, pad_token_id=0).numpy()[:, 1:]
    # Rows that ended early are padded with 0 after their EOS.
    out[begin:begin + len(batch), :generated.shape[1]] = generated
  return out


def first_difference_gaps(hf_model, inputs, ours, theirs):
  """For every row where the two decodes differ: |logit(our token) -
  logit(their token)| at the first differing position, both logits
  teacher-forced in `hf_model` (float32) on the common prefix."""
  gaps = []
  for row in np.flatnonzero((ours != theirs).any(axis=1)):
    position = int(np.argmax(ours[row] != theirs[row]))
    prefix = np.concatenate([[0], theirs[row, :position]]).astype(np.int64)
    ids = torch.from_numpy(inputs[row:row + 1].astype(np.int64))
    with torch.no_grad():
      logits = hf_model(
          input_ids=ids, attention_mask=ids > 0,
          decoder_input_ids=torch.from_numpy(prefix[None])).logits[0, -1]
    gaps.append(abs(float(logits[ours[row, position]] -
                          logits[theirs[row, position]])))
  return np.array(gaps)


def main():
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument('--examples', type=int, default=2048)
  parser.add_argument('--batch_sizes', default='32,128')
  parser.add_argument('--rounds', type=int, default=1)
  parser.add_argument('--modes', default='static,length,continuous')
  parser.add_argument('--refill_group', type=int, default=None)
  parser.add_argument('--eos_scale', type=float, default=4.0)
  parser.add_argument('--near_tie', type=float, default=1e-3,
                      help='largest logit gap counted as a near-tie')
  parser.add_argument('--skip_transformers', action='store_true')
  parser.add_argument('--uniform', action='store_true',
                      help='every input 38 tokens, every answer 32 (EOS '
                      'ignored): batching has nothing to save')
  parser.add_argument('--halves', default='auto', choices=('auto', 'on', 'off'),
                      help='our concurrent halves (auto: the CPU default)')
  parser.add_argument('--dtype', default='float32',
                      choices=('float32', 'bfloat16'))
  parser.add_argument('--decoding', default='greedy',
                      help="'greedy', 'beam_search:K' or "
                      "'temperature_sample:N' (K beams or N samples per "
                      'example; not greedy: no transformers side, every '
                      "side's best decodes compared with static batching's)")
  args = parser.parse_args()
  decoding = decoding_of(args.decoding)
  if decoding.strategy != 'greedy':
    args.skip_transformers = True

  config, params, hf_model = shared_weights(args.dtype, args.eos_scale)
  model = InferenceModel(config, params, concurrent_halves={
      'auto': None, 'on': True, 'off': False}[args.halves])
  # The near-tie judge stays float32 (Module.to casts in place, so the
  # bfloat16 side gets its own copy).
  reference_model = hf_model
  if args.dtype == 'bfloat16':
    hf_model = copy.deepcopy(hf_model).to(torch.bfloat16)
  print(cpu_report(model))
  inputs = varlen_inputs(np.random.default_rng(0), args.examples,
                         config.vocab_size, args.uniform)
  input_lengths = answer_lengths(inputs)
  print(f'nq-varlen: {args.examples} examples, input lengths median '
        f'{np.median(input_lengths):.0f} (min {input_lengths.min()}, max '
        f'{input_lengths.max()}) padded to {FEATURE_LENGTH}, at most '
        f'{DECODE_LENGTH} decoded ({args.decoding}), EOS row '
        f'x{args.eos_scale}, {args.dtype}; '
        f'torch threads {torch.get_num_threads()}, cpus {os.cpu_count()}')

  rng = (np.asarray(jax.random.split(jax.random.PRNGKey(0), len(inputs)))
         if decoding.needs_rng else None)
  # In a bfloat16 run, each side's own float32 decodes on the same weights:
  # how far bfloat16 moves a side from its float32 results.
  float32_tokens = {}
  if args.dtype == 'bfloat16':
    model32 = InferenceModel(*shared_weights('float32', args.eos_scale)[:2])
    float32_tokens[OURS] = np.asarray(model32.predict_examples(
        inputs, batch_size=128, max_length=DECODE_LENGTH,
        batching=Batching('continuous'), queue_rows=len(inputs),
        decoding=decoding, rng=rng, stop_at_eos=not args.uniform))
    del model32
    if not args.skip_transformers:
      float32_tokens[TRANSFORMERS] = np.asarray(transformers_decode(
          reference_model, inputs, 128, full_length=args.uniform))
  for batch_size in [int(b) for b in args.batch_sizes.split(',')]:
    sides = {}
    for mode in args.modes.split(','):
      batching = Batching(mode, refill_group=args.refill_group)
      run = (lambda batching: lambda rows=slice(None): model.predict_examples(
          inputs[rows], batch_size=batch_size, max_length=DECODE_LENGTH,
          batching=batching, queue_rows=len(inputs), decoding=decoding,
          rng=None if rng is None else rng[rows],
          stop_at_eos=not args.uniform))(batching)
      # Compile first: one example of each length bucket (length-aware
      # batching compiles a batch shape per bucket; continuous batching
      # one program for the queue's size).
      widths = row_buckets(inputs, batching.buckets(FEATURE_LENGTH))
      run([int(np.argmax(widths == w)) for w in np.unique(widths)])
      sides[mode] = run
    if not args.skip_transformers:
      sides[TRANSFORMERS] = lambda: transformers_decode(
          hf_model, inputs, batch_size, full_length=args.uniform)
    seconds = {name: [] for name in sides}
    tokens = {}
    for _ in range(args.rounds):
      for name, run in sides.items():
        start = time.perf_counter()
        tokens[name] = np.asarray(run())
        seconds[name].append(time.perf_counter() - start)
    lengths = answer_lengths(next(iter(tokens.values())))
    histogram = np.bincount(lengths, minlength=DECODE_LENGTH + 1)[1:]
    print(f'batch {batch_size}: answer lengths 1..{DECODE_LENGTH}: '
          f'{" ".join(str(c) for c in histogram)} (median '
          f'{np.median(lengths):.0f}, mean {lengths.mean():.1f})')
    base = min(seconds.get(TRANSFORMERS, [np.nan]))
    static = min(seconds.get('static', [np.nan]))
    for name in sides:
      best = min(seconds[name])
      decoded = answer_lengths(tokens[name]).sum()
      line = (f'  {name:12s} {args.examples / best:7.1f} ex/s '
              f'{decoded / best:8.0f} tok/s (rounds '
              f'{", ".join(f"{s:.1f}" for s in seconds[name])} s)')
      if name != TRANSFORMERS:
        if 'static' in seconds:
          line += f'  x{static / best:.2f} static'
        if TRANSFORMERS in tokens:
          line += f'  x{base / best:.2f} transformers'
          differ = (tokens[name] != tokens[TRANSFORMERS]).any(axis=1)
          gaps = first_difference_gaps(reference_model, inputs,
                                       tokens[name], tokens[TRANSFORMERS])
          line += (f'; differing from transformers: {differ.sum()} of '
                   f'{len(differ)} ({(gaps <= args.near_tie).sum()} at a '
                   f'near-tie; largest gap '
                   f'{gaps.max() if len(gaps) else 0:.2g})')
        elif name != 'static' and 'static' in tokens:
          differ = (tokens[name] != tokens['static']).any(axis=1)
          line += f'; differing from static: {differ.sum()} of {len(differ)}'
      reference = float32_tokens.get(
          TRANSFORMERS if name == TRANSFORMERS else OURS)
      if reference is not None:
        equal = tokens[name] == reference
        line += (f'; against its own float32: {equal.all(axis=1).mean():.1%}'
                 f' of sequences, {equal.mean():.1%} of token positions '
                 'equal')
      print(line, flush=True)


def decoding_of(text: str) -> DecodingConfig:
  """--decoding: 'greedy', 'beam_search:K' or 'temperature_sample:N'
  (sampling at temperature 1 over the whole vocabulary)."""
  strategy, _, count = text.partition(':')
  if strategy == 'greedy':
    return DecodingConfig()
  if strategy == 'beam_search':
    return DecodingConfig('beam_search', num_decodes=int(count or 4))
  return DecodingConfig('temperature_sample', num_decodes=int(count or 1),
                        temperature=1.0, topk=0)


if __name__ == '__main__':
  main()
