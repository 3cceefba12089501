"""Process-wide settings for running T5 decoding, applied by an explicit call.

    from model import runtime
    runtime.configure_xla_cpu()   # where a process starts, before JAX runs

Importing `model` changes nothing in the process. Entry points that own
their process (the launcher, a Beam worker's model load, the RunInference
handler's `load_model`, the benchmarks) call `configure_xla_cpu` before JAX
starts a backend. Called after that (JAX already running in a user's
process) it changes nothing and logs one line saying so.

What it may set: the pinned jaxlib fuses elementwise work and reductions
into its YNN library calls by default; XLA_FLAGS
`--xla_cpu_experimental_ynn_fusion_type=individual_dot` keeps YNN to
individual matmuls. It is set only with T5BEAM_XLA_CPU_TUNING=1, on no CPU
by default: measured with `bench/nq_small_greedy.py` (512 examples,
examples/s at batch 32 / 128, processes alternated), it helps on none of
the CPUs we have. On AMD Zen 4 (AuthenticAMD family 25, `avx512_bf16`),
where it was once about 10% faster and so was on by default until
2026-12-03, the code of that day ran no faster with it: float32 36.4,
41.8, 38.7 / 48.8, 54.8, 51.3 with it against 43.1, 42.5, 39.0 / 49.0,
56.4, 53.0 without; bfloat16 60.8, 58.3, 53.8 / 83.7, 71.9, 78.8 against
57.8, 56.6, 58.6 / 83.1, 76.9, 82.1. On an Intel Xeon with AMX
(`amx_tile`) it made float32 5-10% slower (45.8 and 43.6 with it against
49.2 and 46.0 without at batch 32; 69.8 and 66.6 against 76.8 and 71.1 at
batch 128) and bfloat16 the same; on AMD Zen 5 (family 26) it gained
nothing (float32 at batch 128: 77.6, 71.6, 81.7, 84.0, 83.3 with it, 82.3,
80.3, 92.5, 95.2 without). An `xla_cpu_experimental_ynn_fusion_type`
already in XLA_FLAGS is left alone; T5BEAM_XLA_CPU_TUNING=0 (the default)
sets nothing. It has no effect on GPU or TPU.
"""

import ctypes
import functools
import importlib.metadata
import logging
import os
import sys
from typing import FrozenSet, NamedTuple, Optional

TUNING_ENV = 'T5BEAM_XLA_CPU_TUNING'
_YNN_FLAG = 'xla_cpu_experimental_ynn_fusion_type'
# The flag is experimental: XLA aborts on flags it does not know, so it is set
# only for the jaxlib releases it was measured on.
_TUNED_JAXLIB_PREFIXES = ('0.10.',)


def jax_backend_started() -> bool:
  """Whether JAX has already created a backend in this process (after which
  XLA_FLAGS are no longer read)."""
  if 'jax' not in sys.modules:
    return False
  try:
    from jax._src import xla_bridge  # pylint: disable=g-import-not-at-top
  except ImportError:
    return True  # cannot tell: assume the worst, change nothing
  return xla_bridge.backends_are_initialized()


class Cpu(NamedTuple):
  """What /proc/cpuinfo says of this CPU's first processor."""
  vendor: str  # vendor_id: 'AuthenticAMD', 'GenuineIntel', ...
  family: int  # cpu family (AMD: 25 is Zen 3 and Zen 4, 26 is Zen 5)
  flags: FrozenSet[str]


@functools.lru_cache(maxsize=None)
def this_cpu() -> Cpu:
  """This (Linux) CPU's vendor, family and feature flags; empty elsewhere."""
  fields = {}
  try:
    with open('/proc/cpuinfo') as f:
      for line in f:
        if not line.strip():
          break  # the end of the first processor's block
        key, _, value = line.partition(':')
        fields[key.strip()] = value.strip()
  except OSError:
    pass
  try:
    family = int(fields.get('cpu family', ''))
  except ValueError:
    family = 0
  return Cpu(fields.get('vendor_id', ''), family,
             frozenset(fields.get('flags', '').split()))


def cpu_flags() -> FrozenSet[str]:
  """The feature flags of this (Linux) CPU from /proc/cpuinfo; empty
  elsewhere."""
  return this_cpu().flags


def xla_cpu_flags() -> str:
  """The XLA flags `configure_xla_cpu` adds: the YNN flag with
  T5BEAM_XLA_CPU_TUNING=1 (unless XLA_FLAGS already set it, or the jaxlib
  is not one it was measured on), else ''."""
  if os.environ.get(TUNING_ENV, '') != '1':
    return ''
  if _YNN_FLAG in os.environ.get('XLA_FLAGS', ''):
    return ''
  try:
    jaxlib_version = importlib.metadata.version('jaxlib')
  except importlib.metadata.PackageNotFoundError:
    return ''
  if not jaxlib_version.startswith(_TUNED_JAXLIB_PREFIXES):
    return ''
  return f'--{_YNN_FLAG}=individual_dot'


def xla_cpu_tuning_on() -> bool:
  """Whether this process's XLA_FLAGS keep YNN to individual matmuls."""
  return _YNN_FLAG in os.environ.get('XLA_FLAGS', '')


def keep_tensorflow_off_accelerators():
  """Keeps TensorFlow (SeqIO's tf.data, TF checkpoint reading) off GPUs and
  TPUs, which JAX owns: TensorFlow would otherwise reserve most of the GPU
  memory on first use."""
  import tensorflow as tf  # pylint: disable=g-import-not-at-top
  try:
    tf.config.set_visible_devices([], 'GPU')
    tf.config.set_visible_devices([], 'TPU')
  except (RuntimeError, ValueError):
    pass  # already initialised, or no such device type


_FREED_BYTES_PER_TRIM = 64 << 20
_freed_since_trim = 0


def release_freed_memory(freed_bytes: int):
  """Counts `freed_bytes` just dropped and, every 64 MB, hands the C
  heap's free memory back to the OS (glibc's malloc_trim; a no-op
  elsewhere).

  Restoring frees host buffers as fast as it allocates device ones; glibc
  keeps freed buffers of a few MB on its heap (its mmap threshold grows
  with the largest buffer freed), so without this the host memory of a
  restore peaks near twice the checkpoint's size. Changes no setting."""
  global _freed_since_trim
  _freed_since_trim += freed_bytes
  if _freed_since_trim < _FREED_BYTES_PER_TRIM:
    return
  _freed_since_trim = 0
  trim = _libc_function('malloc_trim')
  if trim is not None:
    trim(0)


@functools.lru_cache(maxsize=None)
def _libc_function(name: str):
  """glibc's function `name`, or None where there is none (not Linux, or
  another C library)."""
  try:
    return getattr(ctypes.CDLL('libc.so.6'), name, None)
  except OSError:
    return None


_PR_SET_NAME = 15  # prctl: the calling thread's name (Linux)


def name_os_thread(name: str):
  """Gives the calling thread `name` (its first 15 bytes) in the operating
  system, where `top -H`, `ps -L` and /proc/<pid>/task/*/comm show it:
  CPython before 3.14 leaves every thread it starts named after the
  process. A no-op off Linux. Changes no setting."""
  prctl = _libc_function('prctl')
  if prctl is not None:
    prctl(_PR_SET_NAME, ctypes.c_char_p(name.encode('utf-8')[:15]), 0, 0, 0)


def configure_xla_cpu() -> bool:
  """Adds the CPU decoding flags to XLA_FLAGS if JAX has not started yet.

  Returns whether XLA_FLAGS changed. Idempotent."""
  flags = xla_cpu_flags()
  if not flags:
    return False
  if jax_backend_started():
    logging.info('t5beam: JAX is already running in this process, so the '
                 'XLA CPU tuning (%s) is not applied; set it in XLA_FLAGS '
                 'before JAX starts to have it', flags)
    return False
  current = os.environ.get('XLA_FLAGS', '')
  os.environ['XLA_FLAGS'] = f'{current} {flags}'.strip()
  return True


# JAX's persistent compilation cache: where compiled executables are kept
# between processes (a local directory, or gs:// for Dataflow workers and
# scheduled reruns). T5BEAM_COMPILATION_CACHE overrides; '' turns it off.
COMPILATION_CACHE_ENV = 'T5BEAM_COMPILATION_CACHE'
DEFAULT_COMPILATION_CACHE = os.path.join(
    os.path.expanduser('~'), '.cache', 't5beam', 'jax-compilation-cache')


def enable_compilation_cache(directory: Optional[str]) -> Optional[str]:
  """Points JAX's persistent compilation cache at `directory` (every
  compilation is kept, however quick); returns the directory in use, None
  when off. An executable is looked up by its program, devices, flags and
  JAX version, so a hit gives the executable a compilation would give."""
  directory = os.environ.get(COMPILATION_CACHE_ENV, directory)
  if not directory:
    return None
  import jax  # pylint: disable=g-import-not-at-top
  if '://' not in directory:
    os.makedirs(directory, exist_ok=True)
  jax.config.update('jax_compilation_cache_dir', directory)
  jax.config.update('jax_persistent_cache_min_compile_time_secs', 0.0)
  jax.config.update('jax_persistent_cache_min_entry_size_bytes', 0)
  return directory
