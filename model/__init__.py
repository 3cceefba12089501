"""t5beam's model layer: the T5 network in Flax, decoding, scoring, checkpoints.

Importing this package tunes XLA's CPU backend for T5 decoding, before JAX
starts a backend: the pinned jaxlib fuses elementwise work and reductions
into its YNN library calls by default, which makes the small per-step
reductions of cached decoding several times slower; keeping YNN to
individual matmuls makes greedy decoding about 10% faster on CPU
(`bench/nq_small_greedy.py`). An `xla_cpu_experimental_ynn_fusion_type`
already in XLA_FLAGS is left alone, and T5BEAM_XLA_CPU_TUNING=0 turns this
off. It has no effect on GPU or TPU.
"""

import importlib.metadata
import os

_YNN_FLAG = 'xla_cpu_experimental_ynn_fusion_type'
# The flag is experimental: XLA aborts on flags it does not know, so it is set
# only for the jaxlib releases it was measured on.
_TUNED_JAXLIB_PREFIXES = ('0.10.',)


def _tune_xla_cpu():
  if os.environ.get('T5BEAM_XLA_CPU_TUNING', '1') == '0':
    return
  flags = os.environ.get('XLA_FLAGS', '')
  if _YNN_FLAG in flags:
    return
  try:
    jaxlib_version = importlib.metadata.version('jaxlib')
  except importlib.metadata.PackageNotFoundError:
    return
  if jaxlib_version.startswith(_TUNED_JAXLIB_PREFIXES):
    os.environ['XLA_FLAGS'] = f'{flags} --{_YNN_FLAG}=individual_dot'.strip()


_tune_xla_cpu()
