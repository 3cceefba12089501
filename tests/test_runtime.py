"""Process-wide settings: importing t5beam changes none; the explicit call
applies the XLA CPU flags before JAX starts, and only then; a thread can
be named in the operating system."""

import os
import subprocess
import sys

from tests import pipeline_helpers as helpers


def _python(code: str, **env_changes) -> subprocess.CompletedProcess:
  env = dict(os.environ, **env_changes)
  env.pop('XLA_FLAGS', None)
  return subprocess.run([sys.executable, '-c', code], cwd=helpers.REPO,
                        env=env, capture_output=True, text=True, check=True,
                        timeout=300)


def test_importing_the_packages_changes_no_xla_flag():
  result = _python(
      'import os\n'
      'import model, model.inference, pipeline.run, pipeline.model_handler\n'
      "print(repr(os.environ.get('XLA_FLAGS')))")
  assert result.stdout.strip().splitlines()[-1] == 'None'


def test_the_flags_apply_before_jax_starts_and_not_after():
  result = _python(
      'import logging, os\n'
      'logging.basicConfig(level=logging.INFO)\n'
      'from model import runtime\n'
      'print(runtime.configure_xla_cpu(), os.environ.get("XLA_FLAGS"))\n'
      'os.environ.pop("XLA_FLAGS")\n'
      'import jax; jax.devices()\n'
      'print(runtime.configure_xla_cpu(), os.environ.get("XLA_FLAGS"))\n',
      T5BEAM_XLA_CPU_TUNING='1')
  before, after = result.stdout.strip().splitlines()[-2:]
  assert before == ('True --xla_cpu_experimental_ynn_fusion_type='
                    'individual_dot')
  assert after == 'False None'
  assert 'JAX is already running in this process' in result.stderr


def test_tuning_can_be_turned_off():
  result = _python('from model import runtime\n'
                   'print(runtime.configure_xla_cpu())',
                   T5BEAM_XLA_CPU_TUNING='0')
  assert result.stdout.strip().splitlines()[-1] == 'False'


def test_the_flag_is_set_only_when_asked(monkeypatch):
  """No CPU gets the YNN flag by default (measured to help on none: see
  model/runtime.py); T5BEAM_XLA_CPU_TUNING=1 sets it, unless XLA_FLAGS
  already says otherwise."""
  from model import runtime  # pylint: disable=g-import-not-at-top
  monkeypatch.delenv(runtime.TUNING_ENV, raising=False)
  monkeypatch.delenv('XLA_FLAGS', raising=False)
  flag = '--xla_cpu_experimental_ynn_fusion_type=individual_dot'
  assert runtime.xla_cpu_flags() == ''
  monkeypatch.setenv(runtime.TUNING_ENV, '1')
  assert runtime.xla_cpu_flags() == flag
  monkeypatch.setenv('XLA_FLAGS',
                     '--xla_cpu_experimental_ynn_fusion_type=default')
  assert runtime.xla_cpu_flags() == ''
  monkeypatch.setenv(runtime.TUNING_ENV, '0')
  monkeypatch.delenv('XLA_FLAGS')
  assert runtime.xla_cpu_flags() == ''


def test_this_cpu_is_read_from_proc_cpuinfo():
  from model import runtime  # pylint: disable=g-import-not-at-top
  cpu = runtime.this_cpu()
  if not os.path.exists('/proc/cpuinfo'):
    assert cpu == runtime.Cpu('', 0, frozenset())
    return
  with open('/proc/cpuinfo') as f:
    text = f.read()
  assert f'vendor_id\t: {cpu.vendor}\n' in text
  assert f'cpu family\t: {cpu.family}\n' in text
  assert cpu.flags and all(f' {flag}' in text for flag in cpu.flags)


def test_a_thread_is_named_in_the_os_and_only_that_thread():
  import threading  # pylint: disable=g-import-not-at-top
  from model import runtime  # pylint: disable=g-import-not-at-top
  if not os.path.exists(f'/proc/self/task/{threading.get_native_id()}'):
    return  # not Linux: nothing to name
  main_name = helpers.os_thread_name()
  seen = {}

  def named(name):
    runtime.name_os_thread(name)
    seen[name] = helpers.os_thread_name()

  for name in ('t5beam-writer', 'a-name-longer-than-fifteen-bytes'):
    thread = threading.Thread(target=named, args=(name,))
    thread.start()
    thread.join()
  assert seen == {'t5beam-writer': 't5beam-writer',
                  'a-name-longer-than-fifteen-bytes': 'a-name-longer-t'}
  assert helpers.os_thread_name() == main_name
