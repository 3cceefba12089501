"""Writes the demo's data and trains its model (run by hand; the results are
committed, so the demo needs neither).

    .venv/bin/python -m launch.demo.train [--steps 4000]

The data: every a + b with 0 <= a, b < 100, shuffled with a fixed seed;
200 pairs are held out for 'test' and 200 for 'validation', the rest is
'train'. The model: the T5 1.1 design, tiny, on bytes, trained with Adam
on teacher-forced cross-entropy using model.network, then saved with Orbax
in float32 to launch/demo/checkpoint.
"""

import argparse
import os
import shutil
import time

import jax
import jax.numpy as jnp
import numpy as np
import optax

from model import checkpoints, network
from model.config import T5Config
from model.inference import InferenceModel

HERE = os.path.dirname(os.path.abspath(__file__))
DATA_DIR = os.path.join(HERE, 'data')
CHECKPOINT_DIR = os.path.join(HERE, 'checkpoint')
INPUT_LENGTH, TARGET_LENGTH = 16, 8
CONFIG = T5Config(vocab_size=259, d_model=128, num_heads=4, d_kv=32,
                  d_ff=256, num_encoder_layers=2, num_decoder_layers=2,
                  feed_forward='gated-gelu', logits_via_embedding=False,
                  relative_attention_num_buckets=16,
                  relative_attention_max_distance=32)


def write_data():
  pairs = [(a, b) for a in range(100) for b in range(100)]
  order = np.random.default_rng(2026).permutation(len(pairs))
  splits = {'test': order[:200], 'validation': order[200:400],
            'train': order[400:]}
  os.makedirs(DATA_DIR, exist_ok=True)
  for split, indices in splits.items():
    with open(os.path.join(DATA_DIR, f'{split}.tsv'), 'w') as f:
      for i in sorted(indices):
        a, b = pairs[i]
        f.write(f'{a} + {b}\t{a + b}\n')


def encode(texts, length):
  """UTF-8 bytes + 3 (ByteVocabulary's offset), EOS (1), 0-padded."""
  out = np.zeros((len(texts), length), np.int32)
  for row, text in enumerate(texts):
    ids = [b + 3 for b in text.encode()] + [1]
    out[row, :len(ids)] = ids
  return out


def load_split(split):
  with open(os.path.join(DATA_DIR, f'{split}.tsv')) as f:
    rows = [line.rstrip('\n').split('\t') for line in f]
  return ([r[0] for r in rows], [r[1] for r in rows],
          encode([r[0] for r in rows], INPUT_LENGTH),
          encode([r[1] for r in rows], TARGET_LENGTH))


def exact_match(params, split):
  inputs_text, targets_text, inputs, _ = load_split(split)
  model = InferenceModel(CONFIG, params)
  tokens = model.predict_batch({'encoder_input_tokens': inputs},
                               max_length=TARGET_LENGTH)
  predictions = [bytes(t - 3 for t in row if t > 2).decode() for row in tokens]
  return np.mean([p == t for p, t in zip(predictions, targets_text)])


def train(steps: int, batch_size: int = 128, seed: int = 0):
  module = network.Transformer(CONFIG)
  params = network.init_params(CONFIG, seed)
  _, _, inputs, targets = load_split('train')
  schedule = optax.warmup_cosine_decay_schedule(0.0, 3e-3, 200, steps, 1e-4)
  optimizer = optax.adamw(schedule, weight_decay=0.01)
  state = optimizer.init(params)

  @jax.jit
  def step(params, state, encoder, decoder_targets):
    decoder_inputs = jnp.pad(decoder_targets[:, :-1], ((0, 0), (1, 0)))

    def loss_fn(p):
      logits = module.apply({'params': p}, encoder, decoder_inputs)
      losses = optax.softmax_cross_entropy_with_integer_labels(
          logits, decoder_targets)
      weights = (decoder_targets > 0).astype(jnp.float32)
      return jnp.sum(losses * weights) / jnp.sum(weights)

    loss, grads = jax.value_and_grad(loss_fn)(params)
    updates, state = optimizer.update(grads, state, params)
    return optax.apply_updates(params, updates), state, loss

  rng = np.random.default_rng(seed)
  start = time.time()
  for i in range(steps):
    rows = rng.integers(0, len(inputs), batch_size)
    params, state, loss = step(params, state, inputs[rows], targets[rows])
    if (i + 1) % 500 == 0:
      print(f'step {i + 1}: loss {float(loss):.4f}, validation exact match '
            f'{exact_match(params, "validation"):.1%} '
            f'({time.time() - start:.0f} s)', flush=True)
  return params


def main():
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument('--steps', type=int, default=4000)
  args = parser.parse_args()
  write_data()
  params = train(args.steps)
  print(f'test exact match: {exact_match(params, "test"):.1%}')
  shutil.rmtree(CHECKPOINT_DIR, ignore_errors=True)
  checkpoints.save_orbax(CHECKPOINT_DIR, CONFIG, jax.device_get(params))
  print(f'saved {CHECKPOINT_DIR}')


if __name__ == '__main__':
  main()
