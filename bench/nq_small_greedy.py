"""Benchmark "nq-small-greedy": the model core against transformers and
CTranslate2.

T5 1.1 small (d_model 512, 6 heads, d_kv 64, d_ff 1024, 8+8 layers, vocab
32128), random weights shared by every side, 1024 examples of 38 input
tokens, exactly 18 decoded tokens each (EOS suppressed), float32, greedy.
The baselines are transformers' `generate` (KV cache) and, when the
`ctranslate2` package is installed (`pip install -r bench/requirements.txt`),
CTranslate2's float32 `translate_batch` on the same weights, converted
here. Every side runs in this process on the same threads, alternating for
--rounds rounds; the first ratios printed are best round over best round.
Then --paired_passes passes time every batch on every side back to back and
print the median of those per-batch ratios with their spread. On a shared
machine both figures move between runs (against transformers at batch 128,
1.56-1.82x and 1.57-1.81x in 5 runs here): compare several runs. Not a
test: run it by hand.

    .venv/bin/python bench/nq_small_greedy.py [--examples 1024] [--batch_sizes 32,128]
        [--dtype bfloat16]

With --dtype bfloat16 every side runs in bfloat16 on the same weights: ours
with bfloat16 parameters and activations (float32 sums), transformers with
its model cast to bfloat16, CTranslate2 with compute_type bfloat16 where
its CPU backend allows it (else it is left out, saying why). The CPU's
bfloat16 features and which of our CPU-specific choices were on are
printed first.
"""

import argparse
import os
import sys
import tempfile
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from model import runtime  # pylint: disable=g-import-not-at-top

runtime.configure_xla_cpu()  # before JAX starts

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
OURS = 't5beam'


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


class _IdVocabulary:
  """What CTranslate2's T5 converter reads from a tokenizer, for a model
  fed token ids: id i is the token string `t{i}` (0, 1, 2 are T5's pad,
  EOS and unknown)."""
  pad_token, eos_token, unk_token = '<pad>', '</s>', '<unk>'

  def __init__(self, size):
    self.tokens = ['<pad>', '</s>', '<unk>'] + [f't{i}' for i in range(3, size)]
    self.ids = {token: i for i, token in enumerate(self.tokens)}

  def get_vocab(self):
    return dict(self.ids)

  def convert_ids_to_tokens(self, token_id):
    return self.tokens[token_id]


def shared_weights(dtype: str, eos_scale: float = 1.0):
  """(config, our params in `dtype`, transformers' float32 model) of T5 1.1
  small with random weights, the same on every side; `eos_scale` scales
  the output layer's EOS row first."""
  config = config_lib.preset('t5_1_1_small')
  hf_model = reference.make_reference(config, seed=0)
  with torch.no_grad():
    hf_model.lm_head.weight[1] *= eos_scale
  tensors = {k: v.detach().numpy() for k, v in hf_model.state_dict().items()}
  params = checkpoints.params_from_huggingface(config, tensors)
  if dtype == 'bfloat16':
    import jax  # pylint: disable=g-import-not-at-top
    import jax.numpy as jnp  # pylint: disable=g-import-not-at-top
    config = config.replace(dtype='bfloat16')
    params = jax.tree.map(lambda x: jnp.asarray(x, jnp.bfloat16), params)
  return config, params, hf_model


def cpu_report(model) -> str:
  """The CPU (vendor, family, bfloat16 features) and our CPU-specific
  choices in force."""
  cpu = runtime.this_cpu()
  features = [f for f in ('avx512_bf16', 'amx_bf16', 'amx_tile')
              if f in cpu.flags]
  tuning = runtime.xla_cpu_tuning_on()
  return (f'cpu: {cpu.vendor or "unknown"} family {cpu.family}, bfloat16 '
          f'features: {", ".join(features) or "none"}; ours: '
          f'XLA CPU tuning {"on" if tuning else "off"}, concurrent halves '
          f'{"on" if model.concurrent_halves else "off"}, screened arg-max '
          f'{"on" if model.argmax_screen is not None else "off"}')


def ctranslate2_decoder(hf_model, config, dtype='float32'):
  """decode(batch) -> tokens with CTranslate2 (float32, 2 threads) on the
  reference's weights, or None when ctranslate2 is not installed. The
  converted model lives in a temporary directory only until the translator
  has loaded it."""
  try:
    import ctranslate2  # pylint: disable=g-import-not-at-top
    from ctranslate2.converters import transformers as converters  # pylint: disable=g-import-not-at-top
  except ImportError:
    return None
  vocabulary = _IdVocabulary(config.vocab_size)
  # transformers 5 reports tie_word_embeddings=True for every T5 (the
  # reference unties lm_head itself); the converter reads the flag to scale
  # the output layer, so give it the truth while converting.
  tied = hf_model.config.tie_word_embeddings
  hf_model.config.tie_word_embeddings = config.logits_via_embedding
  try:
    spec = converters.T5Loader()(hf_model, vocabulary)
  finally:
    hf_model.config.tie_word_embeddings = tied
  spec.validate()
  spec.optimize(quantization=None)
  with tempfile.TemporaryDirectory(prefix='t5beam-bench-ct2-') as directory:
    spec.save(directory)
    try:
      translator = ctranslate2.Translator(
          directory, device='cpu', compute_type=dtype,
          intra_threads=torch.get_num_threads(), inter_threads=1)
    except ValueError as e:  # e.g. no bfloat16 compute type on this backend
      print(f'ctranslate2 {dtype} is left out: {e}')
      return None

  def decode(batch):
    results = translator.translate_batch(
        [[vocabulary.tokens[i] for i in row] for row in batch],
        beam_size=1, max_decoding_length=DECODE_LENGTH,
        min_decoding_length=DECODE_LENGTH, max_batch_size=len(batch))
    return np.array([[vocabulary.ids[t] for t in r.hypotheses[0]]
                     for r in results])
  return decode


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


def decode_all(decode, inputs, batch_size=128):
  """decode(batch) -> tokens over all inputs, untimed."""
  return np.concatenate([decode(inputs[begin:begin + batch_size])
                         for begin in range(0, len(inputs), batch_size)])


def paired_ratios(sides, inputs, batch_size, passes):
  """For every baseline, its seconds over ours for the same batch, all
  sides timed back to back (the order rotating from batch to batch), for
  every batch of `passes` passes over the inputs. Returns (ratios by
  baseline, median batch examples/s by side).

  A neighbour's load that comes and goes over seconds lands on every side
  of a batch alike; a best round, by contrast, can be one lucky stretch.
  """
  names = list(sides)
  seconds = {name: [] for name in names}
  for _ in range(passes):
    for index, begin in enumerate(range(0, len(inputs), batch_size)):
      batch = inputs[begin:begin + batch_size]
      shift = index % len(names)
      for name in names[shift:] + names[:shift]:
        start = time.perf_counter()
        sides[name](batch)
        seconds[name].append(time.perf_counter() - start)
  ours = np.array(seconds[OURS])
  ratios = {name: np.array(seconds[name]) / ours
            for name in names if name != OURS}
  rates = {name: batch_size / np.median(seconds[name]) for name in names}
  return ratios, rates


def main():
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument('--examples', type=int, default=1024)
  parser.add_argument('--batch_sizes', default='32,128')
  parser.add_argument('--rounds', type=int, default=2)
  parser.add_argument('--skip_transformers', action='store_true')
  parser.add_argument('--skip_ctranslate2', action='store_true')
  parser.add_argument('--dtype', default='float32',
                      choices=('float32', 'bfloat16'))
  parser.add_argument('--halves', default='auto', choices=('auto', 'on', 'off'),
                      help='our concurrent halves (auto: the CPU default)')
  parser.add_argument('--screen', default='auto', choices=('auto', 'on', 'off'),
                      help='our screened arg-max (auto: the CPU default)')
  parser.add_argument('--paired_passes', type=int, default=2,
                      help='passes of batch-by-batch paired timing (0: none)')
  args = parser.parse_args()

  config, params, hf_model = shared_weights(args.dtype)
  choice = {'auto': None, 'on': True, 'off': False}
  model = InferenceModel(config, params,
                         concurrent_halves=choice[args.halves],
                         screen_argmax=choice[args.screen])
  print(cpu_report(model))
  sides = {OURS: lambda b: ours_batch(model, b)}
  if not args.skip_ctranslate2:
    ct2 = ctranslate2_decoder(hf_model, config, args.dtype)
    if ct2 is not None:
      sides['ctranslate2'] = ct2
    elif args.dtype == 'float32':
      print('ctranslate2 is not installed, so it is left out: '
            '.venv/bin/pip install -r bench/requirements.txt')
  rng = np.random.default_rng(0)
  inputs = rng.integers(2, config.vocab_size,
                        size=(args.examples, INPUT_LENGTH)).astype(np.int32)
  # In a bfloat16 run, each side's own float32 tokens on the same weights:
  # how far bfloat16 moves a side from its float32 results.
  float32_tokens = {}
  if args.dtype == 'bfloat16':
    model32 = InferenceModel(*shared_weights('float32')[:2])
    float32_tokens[OURS] = decode_all(lambda b: ours_batch(model32, b),
                                      inputs)
    del model32
    if not args.skip_transformers:
      float32_tokens['transformers'] = decode_all(
          lambda b: theirs_batch(hf_model, b), inputs)
  if not args.skip_transformers:
    if args.dtype == 'bfloat16':
      hf_model = hf_model.to(torch.bfloat16)
    sides['transformers'] = lambda b: theirs_batch(hf_model, b)
  print(f'nq-small-greedy: {args.examples} examples, {INPUT_LENGTH} input '
        f'tokens, {DECODE_LENGTH} decoded, {args.dtype}; torch threads '
        f'{torch.get_num_threads()}, cpus {os.cpu_count()}')
  for batch_size in [int(b) for b in args.batch_sizes.split(',')]:
    # Alternate the sides so a noisy neighbour hits all alike; report each
    # side's best round.
    rounds = {name: [] for name in sides}
    tokens, first_seconds = {}, None
    for _ in range(args.rounds):
      for name, decode in sides.items():
        rate, first, tokens[name] = time_side(decode, inputs, batch_size)
        rounds[name].append(rate)
        if name == OURS and first_seconds is None:
          first_seconds = first  # the first round's: it includes compiling
    ours = max(rounds[OURS])
    print(f'batch {batch_size:4d}: {OURS} {ours:6.1f} ex/s '
          f'({ours * GFLOP_PER_EXAMPLE:.0f} GFLOP/s; rounds '
          f'{", ".join(f"{r:.1f}" for r in rounds[OURS])}; first batch incl. '
          f'compile {first_seconds:.1f} s)')
    for name, reference_tokens in float32_tokens.items():
      equal = tokens[name] == reference_tokens
      print(f'            {name} bfloat16 against its own float32: '
            f'{equal.all(axis=1).mean():.1%} of sequences, '
            f'{equal.mean():.1%} of tokens equal')
    for name in sides:
      if name == OURS:
        continue
      best = max(rounds[name])
      agree = (tokens[OURS] == tokens[name]).all(axis=1).mean()
      print(f'            {name} {best:6.1f} ex/s (rounds '
            f'{", ".join(f"{r:.1f}" for r in rounds[name])})  ratio '
            f'{ours / best:.2f}x  identical decodes: {agree:.1%}')
    if len(sides) > 1 and args.paired_passes:
      ratios, rates = paired_ratios(sides, inputs, batch_size,
                                    args.paired_passes)
      for name, by_batch in ratios.items():
        low, median, high = np.percentile(by_batch, [10, 50, 90])
        print(f'            paired with {name} by batch ({len(by_batch)} '
              f'batches): ratio median {median:.2f}x (10th-90th percentile '
              f'{low:.2f}-{high:.2f}x); median batch {rates[OURS]:.1f} vs '
              f'{rates[name]:.1f} ex/s', flush=True)


if __name__ == '__main__':
  main()
