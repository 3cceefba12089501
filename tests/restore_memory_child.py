"""Run by tests/test_restore_memory.py in a child process: restores one
checkpoint (in its stored dtype) onto one device, or onto a (1, 8) mesh of
forced CPU devices, and prints the restore step's peak host memory above
the process's resident memory just before it, as JSON (one line, last).
The issue's `resource.getrusage` figure is read from /proc instead (see
peak_resident_bytes).

    python tests/restore_memory_child.py CHECKPOINT MODEL_AXIS [CONFIG_JSON]

CONFIG_JSON: the T5Config, for formats that do not store it.
"""

import json
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from model import runtime  # pylint: disable=g-import-not-at-top

runtime.configure_xla_cpu()
os.environ['XLA_FLAGS'] = (os.environ.get('XLA_FLAGS', '') +
                           ' --xla_force_host_platform_device_count=8')

import jax  # pylint: disable=g-import-not-at-top,wrong-import-position
import numpy as np  # pylint: disable=g-import-not-at-top,wrong-import-position

from model import partitioning  # pylint: disable=wrong-import-position
from model.config import T5Config  # pylint: disable=wrong-import-position
from model.inference import InferenceModel  # pylint: disable=wrong-import-position


def resident_bytes() -> int:
  with open('/proc/self/statm') as f:
    return int(f.read().split()[1]) * os.sysconf('SC_PAGE_SIZE')


def peak_resident_bytes() -> int:
  """This program's peak resident memory (VmHWM). Not getrusage's
  ru_maxrss, which keeps the forking parent's peak across exec."""
  with open('/proc/self/status') as f:
    for line in f:
      if line.startswith('VmHWM:'):
        return int(line.split()[1]) * 1024
  raise RuntimeError('no VmHWM in /proc/self/status')


def main():
  path, model_axis = sys.argv[1], int(sys.argv[2])
  config = (T5Config.from_dict(json.loads(sys.argv[3])) if len(sys.argv) > 3
            else None)
  # Everything but the restore first: imports, the backend, a compile.
  jax.jit(lambda x: x + 1)(np.ones(4)).block_until_ready()
  import orbax.checkpoint  # pylint: disable=g-import-not-at-top,unused-import
  import tensorflow  # pylint: disable=g-import-not-at-top,unused-import
  import tensorstore  # pylint: disable=g-import-not-at-top,unused-import
  before = resident_bytes()
  model = InferenceModel.load(
      path, config, dtype='float32', screen_argmax=False, concurrent_halves=False,
      partitioning=(partitioning.Partitioning(num_partitions=model_axis)
                    if model_axis > 1 else None))
  peak = peak_resident_bytes()
  kernel = model.variables['params']['decoder']['layers_0']['mlp']['wo'][
      'kernel']
  print(json.dumps({
      'restore_peak_bytes': peak - before,
      'parameter_bytes': sum(leaf.nbytes for leaf in
                             jax.tree_util.tree_leaves(model.variables)),
      'mesh': model.mesh_shape,
      'devices_holding_wo': len(kernel.addressable_shards),
      'wo_shard_fraction': (kernel.addressable_shards[0].data.nbytes /
                            kernel.nbytes),
      'digest': [sum(float(np.asarray(leaf, np.float64).sum())
                     for leaf in jax.tree_util.tree_leaves(model.variables)),
                 sum(float(np.square(np.asarray(leaf, np.float64)).sum())
                     for leaf in jax.tree_util.tree_leaves(
                         model.variables))]}))


if __name__ == '__main__':
  main()
