"""Benchmark "nq-small-greedy": the model core against transformers' generate.

T5 1.1 small (d_model 512, 6 heads, d_kv 64, d_ff 1024, 8+8 layers, vocab
32128), random weights shared by both sides, 1024 examples of 38 input
tokens, exactly 18 decoded tokens each (EOS suppressed), float32, greedy.
Both sides run in this process on the same threads, alternating for
--rounds rounds; the first ratio printed is best round over best round.
Then --paired_passes passes time every batch on both sides back to back and
print the median of those per-batch ratios with their spread. On a shared
machine both figures move between runs (at batch 128, 1.40-1.64x and
1.49-1.64x here): compare several runs. Not a test: run it by hand.

    .venv/bin/python bench/nq_small_greedy.py [--examples 1024] [--batch_sizes 32,128]
"""

import argparse
import os
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import numpy as np  # pylint: disable=g-import-not-at-top
import torch

from model import checkpoints, config as config_lib
from model.inference import InferenceModel
from tests import reference

INPUT_LENGTH = 38
DECODE_LENGTH = 18
# Matmul FLOPs of one example: encoder, cross-attention keys/values, and 18
# decoder steps including the 32128-way output layer.
GFLOP_PER_EXAMPLE = 3.09


def ours_batch(model, batch):
  return model.predict_batch({'encoder_input_tokens': batch},
                             max_length=DECODE_LENGTH, stop_at_eos=False)


def theirs_batch(hf_model, batch):
  ids = torch.from_numpy(batch.astype(np.int64))
  with torch.no_grad():
    out = hf_model.generate(input_ids=ids, attention_mask=ids > 0,
                            do_sample=False, num_beams=1, use_cache=True,
                            max_new_tokens=DECODE_LENGTH,
                            min_new_tokens=DECODE_LENGTH)
  return out[:, 1:].numpy()


def time_side(decode, inputs, batch_size):
  """(examples/s over all batches after the first, seconds of the first,
  the decoded tokens) for decode(batch) -> tokens."""
  start = time.perf_counter()
  outputs = [decode(inputs[:batch_size])]
  first_seconds = time.perf_counter() - start
  start = time.perf_counter()
  for begin in range(batch_size, len(inputs), batch_size):
    outputs.append(decode(inputs[begin:begin + batch_size]))
  seconds = time.perf_counter() - start
  return ((len(inputs) - batch_size) / seconds, first_seconds,
          np.concatenate(outputs))


def paired_ratios(model, hf_model, inputs, batch_size, passes):
  """Their seconds over ours for the same batch, timed back to back (the
  order alternating), for every batch of `passes` passes over the inputs.

  A neighbour's load that comes and goes over seconds lands on both sides
  of a pair alike; a best round, by contrast, can be one lucky stretch.
  """
  ratios, ours_seconds, theirs_seconds = [], [], []
  for _ in range(passes):
    for index, begin in enumerate(range(0, len(inputs), batch_size)):
      batch = inputs[begin:begin + batch_size]
      sides = [('ours', lambda b=batch: ours_batch(model, b)),
               ('theirs', lambda b=batch: theirs_batch(hf_model, b))]
      seconds = {}
      for name, decode in (sides if index % 2 == 0 else sides[::-1]):
        start = time.perf_counter()
        decode()
        seconds[name] = time.perf_counter() - start
      ratios.append(seconds['theirs'] / seconds['ours'])
      ours_seconds.append(seconds['ours'])
      theirs_seconds.append(seconds['theirs'])
  return (np.array(ratios), batch_size / np.median(ours_seconds),
          batch_size / np.median(theirs_seconds))


def main():
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument('--examples', type=int, default=1024)
  parser.add_argument('--batch_sizes', default='32,128')
  parser.add_argument('--rounds', type=int, default=2)
  parser.add_argument('--skip_transformers', action='store_true')
  parser.add_argument('--paired_passes', type=int, default=2,
                      help='passes of batch-by-batch paired timing (0: none)')
  args = parser.parse_args()

  config = config_lib.preset('t5_1_1_small')
  hf_model = reference.make_reference(config, seed=0)
  tensors = {k: v.detach().numpy() for k, v in hf_model.state_dict().items()}
  params = checkpoints.params_from_huggingface(config, tensors)
  model = InferenceModel(config, params)
  rng = np.random.default_rng(0)
  inputs = rng.integers(2, config.vocab_size,
                        size=(args.examples, INPUT_LENGTH)).astype(np.int32)
  print(f'nq-small-greedy: {args.examples} examples, {INPUT_LENGTH} input '
        f'tokens, {DECODE_LENGTH} decoded, float32; torch threads '
        f'{torch.get_num_threads()}, cpus {os.cpu_count()}')
  for batch_size in [int(b) for b in args.batch_sizes.split(',')]:
    # Alternate the two sides so a noisy neighbour hits both alike; report
    # each side's best round.
    ours_rounds, theirs_rounds, agree = [], [], None
    for _ in range(args.rounds):
      ours, first_seconds, our_tokens = time_side(
          lambda b: ours_batch(model, b), inputs, batch_size)
      ours_rounds.append(ours)
      if not args.skip_transformers:
        theirs, _, their_tokens = time_side(
            lambda b: theirs_batch(hf_model, b), inputs, batch_size)
        theirs_rounds.append(theirs)
        agree = (our_tokens == their_tokens).all(axis=1).mean()
    ours = max(ours_rounds)
    line = (f'batch {batch_size:4d}: t5beam {ours:6.1f} ex/s '
            f'({ours * GFLOP_PER_EXAMPLE:.0f} GFLOP/s; rounds '
            f'{", ".join(f"{r:.1f}" for r in ours_rounds)}; first batch incl. '
            f'compile {first_seconds:.1f} s)')
    if theirs_rounds:
      theirs = max(theirs_rounds)
      line += (f'\n            transformers {theirs:6.1f} ex/s (rounds '
               f'{", ".join(f"{r:.1f}" for r in theirs_rounds)})  ratio '
               f'{ours / theirs:.2f}x  identical decodes: {agree:.1%}')
    print(line, flush=True)
    if theirs_rounds and args.paired_passes:
      ratios, ours_paired, theirs_paired = paired_ratios(
          model, hf_model, inputs, batch_size, args.paired_passes)
      low, median, high = np.percentile(ratios, [10, 50, 90])
      print(f'            paired by batch ({len(ratios)} pairs): ratio median '
            f'{median:.2f}x (10th-90th percentile {low:.2f}-{high:.2f}x); '
            f'median batch {ours_paired:.1f} vs {theirs_paired:.1f} ex/s',
            flush=True)


if __name__ == '__main__':
  main()
