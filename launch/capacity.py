"""The capacity table: which num_partitions, and how big a batch, fit each
model on each accelerator VM, by the launcher's own memory estimate
(model.memory). Prints the README's table as Markdown.

    python -m launch.capacity [--inputs 512] [--targets 128] [--dtype bfloat16]
"""

import argparse
from typing import Optional, Sequence

from model import config as config_lib
from model import memory

MODELS = ('t5_1_1_small', 't5_1_1_base', 't5_1_1_large', 't5_1_1_xl',
          't5_1_1_xxl', 'mt5_xxl')
# (column heading, worker_accelerator type, devices per VM)
MACHINES = (
    ('TPU v5e 1x1', 'tpu-v5-lite-podslice', 1),
    ('TPU v5e 2x2', 'tpu-v5-lite-podslice', 4),
    ('TPU v5e 2x4', 'tpu-v5-lite-podslice', 8),
    ('1 L4', 'nvidia-l4', 1),
    ('4 L4', 'nvidia-l4', 4),
    ('1 A100 40GB', 'nvidia-tesla-a100', 1),
    ('8 H100', 'nvidia-h100-80gb', 8),
)


def cell(name: str, accelerator: str, devices: int, **settings) -> str:
  """'m / B': the smallest model axis that fits a batch of one per data
  device, and the largest batch that then fits; '-' if none does."""
  model_config = config_lib.preset(name)
  capacity = memory.ACCELERATOR_MEMORY[accelerator]
  for model in range(1, devices + 1):
    if devices % model:
      continue
    data = devices // model
    try:
      batch = memory.largest_fitting_batch(model_config, data, model,
                                           capacity, **settings)
    except ValueError:
      continue
    if batch:
      return f'{model} / {batch}'
  return '-'


def table(inputs: int, targets: int, dtype: str) -> str:
  settings = dict(input_length=inputs, target_length=targets,
                  param_dtype=dtype)
  lines = ['| model | ' + ' | '.join(m[0] for m in MACHINES) + ' |',
           '|---|' + '---|' * len(MACHINES)]
  for name in MODELS:
    lines.append(f'| {name} | ' + ' | '.join(
        cell(name, accelerator, devices, **settings)
        for _, accelerator, devices in MACHINES) + ' |')
  return '\n'.join(lines)


def main(argv: Optional[Sequence[str]] = None):
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument('--inputs', type=int, default=512)
  parser.add_argument('--targets', type=int, default=128)
  parser.add_argument('--dtype', default='bfloat16')
  args = parser.parse_args(argv)
  print(table(args.inputs, args.targets, args.dtype))


if __name__ == '__main__':
  main()
