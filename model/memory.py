"""Will it fit? The per-device memory a run needs, estimated before any
device is opened: parameters on the device, decoding caches, and the
largest activations of a batch.

    need = estimate(config, batch_size=32, input_length=512,
                    target_length=128, mode='predict', num_decodes=1,
                    strategy='greedy', data=4, model=2)
    need.total            # bytes on each device

It counts what multiplies memory: the batch (split over the data axis),
samples and beams (each a decoded row), both caches (self-attention over
the targets, cross-attention over the inputs), the float32 logits, and in
score mode the teacher-forced decoder's logits for every target position.
Heads, MLP columns and the vocabulary are split over the model axis. It is
an estimate: XLA's own buffer assignment decides; tests/test_memory.py
holds it to within 25% of `compiled.memory_analysis()`.
"""

import dataclasses
import math
from typing import Dict, Optional, Tuple

from model import checkpoints, network, partitioning
from model.config import T5Config

GiB = 2**30
_BYTES = {'float32': 4, 'bfloat16': 2, 'float16': 2}

# Memory per device of the accelerators Dataflow offers, by the
# `worker_accelerator` type names, in bytes: what the device reports (GPUs:
# nvidia-smi's total MiB, e.g. 23034 MiB for an L4 sold as "24 GB"; TPUs:
# the HBM Cloud TPU documents, in GiB), not the marketing figure.
_MiB = 2**20
ACCELERATOR_MEMORY = {
    'tpu-v5-lite-podslice': 16 * 2**30,
    'tpu-v5p-slice': 95 * 2**30,
    'tpu-v6e-slice': 32 * 2**30,
    'nvidia-l4': 23034 * _MiB,
    'nvidia-tesla-t4': 15360 * _MiB,
    'nvidia-tesla-v100': 16160 * _MiB,
    'nvidia-tesla-a100': 40960 * _MiB,
    'nvidia-a100-80gb': 81920 * _MiB,
    'nvidia-h100-80gb': 81559 * _MiB,
    'nvidia-h100-mega-80gb': 81559 * _MiB,
}
# Of a device's memory, what a run may plan to use: XLA and the runtime
# keep some (GPU: XLA_PYTHON_CLIENT_MEM_FRACTION=0.90 in our images).
USABLE_FRACTION = 0.9


@dataclasses.dataclass(frozen=True)
class Estimate:
  """Bytes on each device."""
  parameters: int
  caches: int
  activations: int

  @property
  def total(self) -> int:
    return self.parameters + self.caches + self.activations

  def describe(self) -> str:
    return (f'{self.total / GiB:.2f} GiB per device (parameters '
            f'{self.parameters / GiB:.2f} GiB, decoding caches '
            f'{self.caches / GiB:.2f} GiB, activations '
            f'{self.activations / GiB:.2f} GiB)')


def estimate(config: T5Config, *, batch_size: int, input_length: int,
             target_length: int, mode: str = 'predict',
             strategy: str = 'greedy', num_decodes: int = 1,
             param_dtype: str = 'float32',
             activation_dtype: Optional[str] = None, data: int = 1,
             model: int = 1,
             rules: partitioning.Rules = partitioning.STANDARD_RULES
             ) -> Estimate:
  """The per-device memory of a run on a (data, model) mesh."""
  act = _BYTES[activation_dtype or param_dtype]
  specs = partitioning.parameter_specs(config, rules)
  parameters = 0
  for name, shape in checkpoints.expected_shapes(config).items():
    split = model if partitioning.MODEL in specs[name][1] else 1
    # Kernels joined for one matmul are kept in the activation dtype.
    stored = act if network.is_fused_kernel(name) else _BYTES[param_dtype]
    parameters += math.prod(shape) * stored // split
  heads = math.ceil(config.num_heads / model)
  vocab = math.ceil(config.vocab_size / model)
  mlp = math.ceil(config.d_ff / model) * (2 if config.gated else 1)
  examples = math.ceil(batch_size / data)
  encoder = _stack_peak(config, examples, input_length, input_length, heads,
                        mlp, act)
  if mode == 'score':
    # Teacher-forced decoder over every target position: its float32
    # logits (the log-softmax is fused into them), beside the cross
    # keys/values.
    cross = (2 * config.num_decoder_layers * examples * heads *
             input_length * config.d_kv * act)
    logits = examples * target_length * vocab * 4
    decoder = _stack_peak(config, examples, target_length, input_length,
                          heads, mlp, act)
    return Estimate(parameters, cross, max(encoder, decoder + logits))
  copies = num_decodes if strategy != 'greedy' else 1
  rows = examples * copies
  per_row = 2 * config.num_decoder_layers * heads * config.d_kv * act
  caches = rows * per_row * (target_length + input_length)
  if strategy == 'beam_search':
    caches += rows * per_row * target_length  # reordered copy per step
  elif copies > 1:  # the encoder output repeated for each sample
    caches += rows * input_length * config.d_model * act
  # A decoding step's float32 logits [rows, vocab] and what is derived from
  # them: the log-softmax (scores, sampling), beam search's candidates.
  logit_copies = {'greedy': 2, 'temperature_sample': 3, 'beam_search': 4}
  logits = logit_copies[strategy] * rows * vocab * 4
  # Products accumulate in float32 (model.network): a step's outputs are
  # float32 before their cast to the activation dtype.
  step = rows * (config.d_model + mlp + 3 * heads * config.d_kv) * (act + 4)
  return Estimate(parameters, caches, max(encoder, logits + step))


def _stack_peak(config: T5Config, examples: int, length: int,
                key_length: int, heads: int, mlp: int, act: int) -> int:
  """The peak of one layer of a full-sequence pass: the residual stream
  (and part of its normed copy, which XLA often fuses away), plus the larger of the attention (float32 weights
  and a projection of the heads) and the MLP's hidden units. Products
  accumulate in float32 (model.network), so a product's output is float32
  until its cast to the activation dtype."""
  hidden = examples * length * config.d_model * act
  attention = (examples * heads * length * key_length * 4 +
               examples * length * heads * config.d_kv * max(act, 4))
  feed_forward = examples * length * mlp * max(act, 4)
  return 3 * hidden // 2 + max(attention, feed_forward)


def largest_fitting_batch(config: T5Config, data: int, model: int,
                          memory: int, **settings) -> int:
  """The largest batch (a multiple of the data axis, at most 4096) whose
  estimate fits `memory` per device on a (data, model) mesh; 0 if none."""
  best, batch = 0, data
  while batch <= 4096:
    need = estimate(config, batch_size=batch, data=data, model=model,
                    **settings).total
    if need > USABLE_FRACTION * memory:
      break
    best, batch = batch, batch * 2
  return best


def smallest_fitting_model_axis(config: T5Config, devices: int,
                                memory: int, *, batch_size: int,
                                rules: partitioning.Rules =
                                partitioning.STANDARD_RULES, **settings
                                ) -> Tuple[Optional[int], Dict[int, int]]:
  """(the smallest model axis that divides `devices` and the model by
  `rules`, leaves a data axis dividing `batch_size`, and fits `memory` per
  device; or None. And {model axis: total bytes} of those tried.)"""
  totals = {}
  for model in range(1, devices + 1):
    if devices % model or batch_size % (devices // model):
      continue
    try:
      partitioning.Partitioning(num_partitions=model,
                                logical_axis_rules=rules).check_model(config)
    except partitioning.PartitioningError:
      continue
    totals[model] = estimate(config, batch_size=batch_size,
                             data=devices // model, model=model, rules=rules,
                             **settings).total
  fitting = [m for m, total in totals.items()
             if total <= USABLE_FRACTION * memory]
  return (min(fitting) if fitting else None), totals
