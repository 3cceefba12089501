"""What a scheduler relies on: output-directory placeholders, the newest
checkpoint, a fast no-op rerun, and one live run per output directory."""

import dataclasses
import datetime
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import time

import pytest

from tests import pipeline_helpers as helpers


@pytest.fixture(scope='module')
def env(tmp_path_factory):
  return helpers.small_environment(tmp_path_factory)


def gin_file(directory, checkpoint, *extra_lines) -> str:
  path = os.path.join(str(directory), 'scheduled.gin')
  with open(path, 'w') as f:
    f.write('\n'.join([
        "include 'runs/infer.gin'",
        "include 'models/t5beam_demo.gin'",
        f"CHECKPOINT_PATH = '{checkpoint}'",
        "MIXTURE_OR_TASK_NAME = 't5beam_test_one_file'",
        "MIXTURE_OR_TASK_MODULE = 'tests.tasks'",
        "TASK_FEATURE_LENGTHS = {'inputs': 24, 'targets': 8}",
        "RestoreCheckpointConfig.dtype = 'float32'",
        'DatasetConfig.batch_size = 4',
        *extra_lines]) + '\n')
  return path


def training_dir(env, tmp_path, steps=(100, 250)) -> str:
  """A T5X-style training directory: checkpoint_<step> for each step."""
  directory = tmp_path / 'train'
  for step in steps:
    shutil.copytree(env['checkpoint'], directory / f'checkpoint_{step}')
  return str(directory)


def file_times(directory):
  return {name: os.stat(os.path.join(directory, name)).st_mtime_ns
          for name in os.listdir(directory)}


def lock_files(directory):
  return sorted(n for n in os.listdir(directory)
                if n.startswith('t5beam-run.lock'))


def test_placeholders_and_latest_checkpoint_then_a_rerun_is_a_no_op(
    env, tmp_path):
  checkpoint_dir = training_dir(env, tmp_path)
  config = gin_file(tmp_path, checkpoint_dir,
                    "RestoreCheckpointConfig.mode = 'latest'")
  pattern = str(tmp_path / 'runs' / '{date:%Y%m%d}' / 'step_{checkpoint_step}')
  before = datetime.datetime.now(datetime.timezone.utc).strftime('%Y%m%d')
  status, stderr = helpers.launch(
      [f'--gin_file={config}', f'--gin.INFER_OUTPUT_DIR="{pattern}"'])
  after = datetime.datetime.now(datetime.timezone.utc).strftime('%Y%m%d')
  assert status == 0, stderr
  (day,) = os.listdir(tmp_path / 'runs')
  assert day in (before, after)
  output = tmp_path / 'runs' / day / 'step_250'
  assert os.listdir(tmp_path / 'runs' / day) == ['step_250']
  manifest = json.loads(
      (output / 't5beam_test_one_file-predict.manifest.json').read_text())
  assert manifest['records'] == 11
  assert manifest['settings']['checkpoint_path'] == os.path.join(
      checkpoint_dir, 'checkpoint_250')
  assert lock_files(output) == []
  times = file_times(output)

  status, stderr = helpers.launch(
      [f'--gin_file={config}', f'--gin.INFER_OUTPUT_DIR="{pattern}"'])
  assert status == 0, stderr
  assert 'already holds this run' in stderr
  assert file_times(output) == times  # nothing rewritten, no lock taken


@pytest.mark.parametrize('output,message', [
    ('out/{checkpoint_step}', r'names no step'),
    ('out/{run_id}', r"unknown placeholder '\{run_id\}'"),
])
def test_bad_placeholders_are_refused(env, tmp_path, output, message):
  config = gin_file(tmp_path, env['checkpoint'])
  status, stderr = helpers.launch(
      [f'--gin_file={config}',
       f'--gin.INFER_OUTPUT_DIR="{tmp_path / output}"'])
  assert status == 2
  (line,) = [l for l in stderr.splitlines() if l.startswith('t5beam: error')]
  assert re.search(message, line), line
  helpers.assert_short_refusal(line)
  assert not os.path.exists(tmp_path / 'out')


def test_latest_without_checkpoints_is_refused(env, tmp_path):
  (tmp_path / 'empty').mkdir()
  config = gin_file(tmp_path, tmp_path / 'empty',
                    "RestoreCheckpointConfig.mode = 'latest'")
  status, stderr = helpers.launch(
      [f'--gin_file={config}', f'--gin.INFER_OUTPUT_DIR="{tmp_path}/out"'])
  assert status == 2
  (line,) = [l for l in stderr.splitlines() if l.startswith('t5beam: error')]
  assert "no checkpoint_<step> or <step> directory for mode 'latest'" in line
  helpers.assert_short_refusal(line)


def test_a_live_run_is_refused_and_a_stale_lock_is_taken_over(env, tmp_path):
  from pipeline import lock  # pylint: disable=g-import-not-at-top
  config = gin_file(tmp_path, env['checkpoint'])
  output = tmp_path / 'out'
  argv = [f'--gin_file={config}', f'--gin.INFER_OUTPUT_DIR="{output}"']
  # Another run, on another machine, heartbeating now.
  lock.acquire(str(output), 'worker-7:123:abc', expiry_seconds=600,
               description='the nightly run')
  status, stderr = helpers.launch(argv)
  assert status == 2
  (line,) = [l for l in stderr.splitlines() if l.startswith('t5beam: error')]
  assert 'in use by another live run worker-7:123:abc (the nightly run)' in (
      line)
  helpers.assert_short_refusal(line)
  assert lock_files(output) == ['t5beam-run.lock-00000001']
  assert not [n for n in os.listdir(output) if '.jsonl' in n]

  # The same run, its heartbeat now older than its expiry: it died.
  path = output / 't5beam-run.lock-00000001'
  record = json.loads(path.read_text())
  record['heartbeat'] -= 601
  path.write_text(json.dumps(record))
  status, stderr = helpers.launch(argv)
  assert status == 0, stderr
  assert (output / 't5beam_test_one_file-predict.jsonl-00000-of-00001'
          ).exists()
  assert lock_files(output) == []


HOLD_SCRIPT = r'''
import sys, time
sys.path.insert(0, {repo!r})
from pipeline import lock
lock.acquire(sys.argv[1], lock.new_owner(), expiry_seconds=3600,
             bound_to_process=True)
print('HELD', flush=True)
time.sleep(600)
'''


def test_the_lock_of_a_killed_local_launcher_is_taken_over_at_once(
    env, tmp_path):
  config = gin_file(tmp_path, env['checkpoint'])
  output = tmp_path / 'out'
  holder = subprocess.Popen(
      [sys.executable, '-c', HOLD_SCRIPT.format(repo=helpers.REPO),
       str(output)], stdout=subprocess.PIPE, text=True)
  try:
    assert holder.stdout.readline().strip() == 'HELD'
    argv = [f'--gin_file={config}', f'--gin.INFER_OUTPUT_DIR="{output}"']
    status, stderr = helpers.launch(argv)
    assert status == 2 and 'in use by another live run' in stderr
    holder.send_signal(signal.SIGKILL)
    holder.wait()
    status, stderr = helpers.launch(argv)
    assert status == 0, stderr
    assert lock_files(output) == []
  finally:
    if holder.poll() is None:
      holder.kill()


def test_exactly_one_of_racing_runs_takes_the_lock(tmp_path):
  output = str(tmp_path / 'out')
  # Round 1: a free directory. Round 2: the holder died (stale heartbeat).
  for generation in (1, 2):
    results = helpers.race_for_lock(output, 8, str(generation))
    assert results == [str(generation)] + ['refused'] * 7
    assert lock_files(output) == [f't5beam-run.lock-{generation:08d}']


def test_heartbeats_keep_the_lock_alive_and_the_job_releases_it(env, tmp_path):
  from apache_beam.options.pipeline_options import PipelineOptions  # pylint: disable=g-import-not-at-top
  from pipeline import lock, run  # pylint: disable=g-import-not-at-top
  output = str(tmp_path / 'beat')
  generation = lock.acquire(output, 'me:1:x', expiry_seconds=1.5)
  ref = lock.LockRef(output, 'me:1:x', generation, 1.5)
  taken = lock.current_holder(output).heartbeat
  with lock.Heartbeat(ref):
    time.sleep(2.5)  # longer than the expiry
    holder = lock.current_holder(output)
    assert holder.heartbeat > taken + 1 and holder.is_live(time.time())
    with pytest.raises(lock.LockHeldError):
      lock.acquire(output, 'other:2:y', expiry_seconds=1.5)

  # Submitted without waiting: the job's last step releases the lock.
  config = helpers.infer_config(
      mixture_or_task_name='t5beam_test_two_files',
      task_feature_lengths={'inputs': 24, 'targets': 8},
      checkpoint_path=env['checkpoint'], output_dir=str(tmp_path / 'job'),
      mixture_or_task_module='tests.tasks', batch_size=4,
      wait_until_finish=False, lock_startup_seconds=1234)
  expiry_when_claimed = []
  result = run.run_inference(
      config, PipelineOptions(['--runner=FnApiRunner']),
      on_claimed=lambda c: expiry_when_claimed.append(
          lock.current_holder(c.output_dir).expiry_seconds))
  assert result.status == 'submitted'
  # The job, not the launcher, will keep the lock: it is taken with the
  # start-up expiry.
  assert expiry_when_claimed == [1234]
  result.beam_result.wait_until_finish()
  assert lock_files(tmp_path / 'job') == []
  assert (tmp_path / 'job' / 't5beam_test_two_files-predict.manifest.json'
          ).exists()


def test_a_job_keeps_its_lock_through_startup_until_a_worker_heartbeats(
    tmp_path):
  from pipeline import lock  # pylint: disable=g-import-not-at-top
  output = str(tmp_path / 'out')
  ref = lock.LockRef(output, 'launcher:1:x', 0, expiry_seconds=1.5,
                     release_at_end=True, startup_seconds=30)
  generation = lock.acquire(output, ref.owner, ref.startup_expiry_seconds)
  ref = dataclasses.replace(ref, generation=generation)
  with lock.Heartbeat(ref):  # the launcher, until it returns
    time.sleep(0.8)
  assert lock.current_holder(output).expiry_seconds == 30
  # Longer than the normal expiry without a heartbeat (workers still
  # starting): the directory is still in use.
  time.sleep(2.0)
  with pytest.raises(lock.LockHeldError):
    lock.acquire(output, 'other:2:y', expiry_seconds=1.5)
  # A worker's first heartbeat ends the start-up period...
  lock.worker_heartbeat(ref)
  assert lock.current_holder(output).expiry_seconds == 1.5
  # ...so a job that then dies frees the directory after the normal expiry.
  time.sleep(2.0)
  assert lock.acquire(output, 'other:2:y', expiry_seconds=1.5) == (
      generation + 1)
