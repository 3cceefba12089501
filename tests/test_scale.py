"""Costs that must grow with their own work only, at any task size: the
merge streams, the lock's heartbeat rate stays within GCS's per-object limit,
a resume over changed input is refused, other Beam runners work."""

import hashlib
import time
import json
import os
import tracemalloc

from tests import pipeline_helpers as helpers


def _write_chunk_files(task_layout, num_chunks, records_per_chunk):
  """Chunk files made directly: records of about 1 KB, every other one with
  a target that its prediction matches when the record number is even."""
  expected = []
  for chunk in range(num_chunks):
    lines = []
    for i in range(records_per_chunk):
      number = chunk * records_per_chunk + i
      record = {'inputs': {'inputs_pretokenized': f'q{number} ' + 'x' * 1000},
                'prediction': str(number % 4)}
      if number % 2:
        record['inputs']['targets_pretokenized'] = str(number % 4 if
                                                      number % 3 else 9)
      lines.append(json.dumps(record) + '\n')
    data = ''.join(lines).encode()
    path = task_layout.chunk_path(0, 1, chunk)
    os.makedirs(os.path.dirname(path), exist_ok=True)
    with open(path, 'wb') as f:
      f.write(data)
    expected.extend(lines)
  return expected


def test_the_merge_streams_an_output_much_larger_than_its_buffer(tmp_path):
  """48 MB of records merged into two output files with a 256 KiB buffer:
  the files hold the records in order, the manifest's checksums and counts
  are the files', and the merge's peak allocation stays near the buffer."""
  from pipeline import merge  # pylint: disable=g-import-not-at-top
  config = helpers.infer_config(
      checkpoint_path='unused', task_feature_lengths={'inputs': 8,
                                                      'targets': 4},
      batch_size=500, checkpoint_period=2, num_output_shards=2,
      output_dir=str(tmp_path), mixture_or_task_name='big')
  task_layout = config.layout('big')
  expected = _write_chunk_files(task_layout, 48, 1000)
  (job_a, job_b), summary = _plan(config, {0: 48_000})
  assert summary['chunks'] == 48
  merger = merge.MergeOutputShard(config, buffer_bytes=256 << 10)
  tracemalloc.start()
  try:
    outputs = [output for job in (job_a, job_b)
               for _, output in merger.process(('big', job))]
    _, peak = tracemalloc.get_traced_memory()
  finally:
    tracemalloc.stop()
  total = sum(len(line) for line in expected)
  assert total > 48_000_000
  assert peak < 3 << 20, f'the merge held {peak} bytes at its peak'
  written = b''
  for output, lines in zip(outputs, (expected[:24_000], expected[24_000:])):
    data = open(task_layout.output_path(output.index), 'rb').read()
    assert data == ''.join(lines).encode()
    assert output.records == len(lines) and output.bytes == len(data)
    assert output.sha256 == hashlib.sha256(data).hexdigest()
    written += data
  assert not [n for n in os.listdir(tmp_path) if n.startswith('.inprogress')]


def _plan(config, counts):
  """The merge jobs and the summary PlanMerge makes of shard counts."""
  from pipeline import merge  # pylint: disable=g-import-not-at-top
  jobs, summary = [], None
  for item in merge.PlanMerge(config).process(
      ('big', {'counts': [(s, n, {}, 0) for s, n in counts.items()],
               'stats': []})):
    if hasattr(item, 'tag'):
      summary = item.value[1]
    else:
      jobs.append(item[1])
  return jobs, summary


def test_a_truncated_chunk_file_fails_the_merge_and_writes_nothing(tmp_path):
  from pipeline import merge  # pylint: disable=g-import-not-at-top
  import pytest  # pylint: disable=g-import-not-at-top
  config = helpers.infer_config(
      checkpoint_path='unused', task_feature_lengths={'inputs': 8,
                                                      'targets': 4},
      batch_size=5, checkpoint_period=2, output_dir=str(tmp_path),
      mixture_or_task_name='big')
  task_layout = config.layout('big')
  _write_chunk_files(task_layout, 3, 10)
  path = task_layout.chunk_path(0, 1, 1)
  data = open(path, 'rb').read()
  with open(path, 'wb') as f:
    f.write(data[:-100])  # the last record cut short
  (job,), _ = _plan(config, {0: 30})
  with pytest.raises(RuntimeError, match='00001.jsonl has 9 whole records, expected at '
                     'least 10'):
    list(merge.MergeOutputShard(config).process(('big', job)))
  assert sorted(os.listdir(tmp_path)) == ['tmp-big-predict']


def test_auto_output_shards_are_sized_from_the_chunk_files(tmp_path):
  """num_output_shards='auto': the merge picks as many files as make about
  output_shard_bytes each, the manifest records them, and completion is
  judged by the manifest's files."""
  from pipeline import merge, plan  # pylint: disable=g-import-not-at-top
  config = helpers.infer_config(
      checkpoint_path='unused', task_feature_lengths={'inputs': 8,
                                                      'targets': 4},
      batch_size=50, checkpoint_period=2, num_output_shards='auto',
      output_shard_bytes=1_000_000, output_dir=str(tmp_path),
      mixture_or_task_name='big')
  task_layout = config.layout('big')
  expected = _write_chunk_files(task_layout, 48, 100)
  total = sum(len(line) for line in expected)
  jobs, summary = _plan(config, {0: 4800})
  assert len(jobs) == -(-total // 1_000_000) == 6
  outputs = [output for job in jobs
             for _, output in merge.MergeOutputShard(config).process(
                 ('big', job))]
  assert [o.name for o in outputs] == [
      f'big-predict.jsonl-{i:05d}-of-00006' for i in range(6)]
  merged = b''.join(open(tmp_path / o.name, 'rb').read() for o in outputs)
  assert merged == ''.join(expected).encode()
  assert not plan.is_task_complete(task_layout, 'f')
  ((_, manifest),) = merge.WriteManifest(config, 'f', {}, 0).process(
      ('big', {'summary': [summary], 'outputs': outputs}))
  assert manifest['num_output_shards'] == 6
  assert plan.is_task_complete(task_layout, 'f')
  os.remove(tmp_path / (outputs[3].name + '.COMPLETED'))
  assert not plan.is_task_complete(task_layout, 'f')


def test_a_resume_over_changed_input_is_refused_naming_the_file(
    tmp_path, monkeypatch):
  """A run over two input files fails part-way; one file is then replaced:
  the resume is refused in one line naming that file, and the finished
  chunk files stay. With the file restored, the resume finishes."""
  from pipeline import infer_chunks  # pylint: disable=g-import-not-at-top
  from tests.test_file_inputs import gin_file  # pylint: disable=g-import-not-at-top
  from tests.test_launch import launch  # pylint: disable=g-import-not-at-top
  inputs = tmp_path / 'in'
  inputs.mkdir()
  for f in range(2):
    with open(inputs / f'part-{f}.jsonl', 'w') as out:
      out.writelines(json.dumps({'question': f'{f} + {i}'}) + '\n'
                     for i in range(12))
  config_file = gin_file(tmp_path, str(inputs / '*.jsonl'), 'jsonl',
                         'DatasetConfig.batch_size = 4\n'
                         'infer.checkpoint_period = 1\n')
  output = tmp_path / 'out'
  argv = [f'--gin_file={config_file}', f'--gin.INFER_OUTPUT_DIR="{output}"']
  from pipeline import file_tasks  # pylint: disable=g-import-not-at-top
  import seqio  # pylint: disable=g-import-not-at-top
  task = file_tasks.FileTaskSpec((str(inputs / '*.jsonl'),), 'jsonl',
                                 'question', seqio.ByteVocabulary()).task_name
  monkeypatch.setenv(infer_chunks.FAULT_ONCE_ENV,
                     f'{task}:1:2={tmp_path / "fired"}')
  status, stderr = launch(argv)
  assert status != 0 and 'injected fault' in stderr
  chunk_dir = output / f'tmp-{task}-predict'
  finished = sorted(os.listdir(chunk_dir))
  original = (inputs / 'part-1.jsonl').read_bytes()
  stat = os.stat(inputs / 'part-1.jsonl')
  with open(inputs / 'part-1.jsonl', 'a') as out:
    out.write(json.dumps({'question': '9 + 9'}) + '\n')
  status, stderr = launch(argv)
  errors = [l for l in stderr.splitlines() if l.startswith('t5beam: error')]
  assert status != 0 and len(errors) == 1, stderr
  assert 'part-1.jsonl' in errors[0] and 'changed' in errors[0], errors[0]
  helpers.assert_short_refusal(errors[0])
  assert sorted(os.listdir(chunk_dir)) == finished
  (inputs / 'part-1.jsonl').write_bytes(original)
  os.utime(inputs / 'part-1.jsonl', ns=(stat.st_atime_ns, stat.st_mtime_ns))
  status, stderr = launch(argv)
  assert status == 0, stderr
  records = helpers.read_records(
      output / f'{task}-predict.jsonl-00000-of-00001')
  assert [r['inputs']['inputs_pretokenized'] for r in records] == [
      f'{f} + {i}' for f in range(2) for i in range(12)]


def test_300_workers_heartbeat_within_gcs_per_object_write_rate(
    tmp_path, monkeypatch):
  """300 simulated workers finishing a chunk every 0.2 s for ten minutes:
  each writes only its own heartbeat object, at most once per heartbeat
  interval (GCS allows about one write per second per object); the lock
  file is never rewritten by them. The lock is live while they beat and
  expires once they stop."""
  from model import files  # pylint: disable=g-import-not-at-top
  from pipeline import lock  # pylint: disable=g-import-not-at-top
  output = str(tmp_path / 'out')
  ref = lock.LockRef(output, 'launcher:1:x', 0, expiry_seconds=900,
                     release_at_end=True, startup_seconds=3600)
  generation = lock.acquire(output, ref.owner, ref.startup_expiry_seconds)
  ref = lock.LockRef(output, ref.owner, generation, 900, True, 3600)
  writes = []
  real_write = files.write_atomically
  monkeypatch.setattr(files, 'write_atomically', lambda path, data: (
      writes.append((os.path.basename(path), json.loads(data)['heartbeat'])),
      real_write(path, data)))
  start = time.time()
  for step in range(3000):  # 600 s of simulated time
    now = start + 0.2 * step
    for worker in range(300):
      lock.worker_heartbeat(ref, worker=f'w{worker}', now=now)
  by_object = {}
  for name, at in writes:
    by_object.setdefault(name, []).append(at)
  assert len(by_object) == 300
  assert not any(name.startswith(lock.LOCK_PREFIX) for name in by_object)
  for times in by_object.values():
    gaps = [b - a for a, b in zip(times, times[1:])]
    assert min(gaps) >= ref.heartbeat_interval >= 1.0
  assert len(writes) / 600 <= 300 / ref.heartbeat_interval + 300 / 600
  holder = lock.current_holder(output)
  assert holder.expiry_seconds == 900  # the workers' expiry, not start-up's
  assert now - ref.heartbeat_interval < holder.heartbeat <= now
  assert holder.is_live(now) and not holder.is_live(now + 901)
  lock.release(output, ref.owner, generation)
  assert os.listdir(output) == []


def test_input_shards_beyond_a_file_source_are_refused_and_others_warned(
    tmp_path_factory, caplog):
  """A file source splits by files: more shards than files is refused at
  planning. A function source splits with Dataset.shard, where every reader
  scans every example: allowed, with a warning that says so."""
  import pytest  # pylint: disable=g-import-not-at-top
  import seqio  # pylint: disable=g-import-not-at-top
  from pipeline import plan  # pylint: disable=g-import-not-at-top
  helpers.small_environment(tmp_path_factory)
  from tests import tasks  # pylint: disable=g-import-not-at-top,unused-import

  def config(task, shards):
    return helpers.infer_config(
        checkpoint_path='unused', task_feature_lengths={'inputs': 8,
                                                        'targets': 4},
        output_dir='unused', mixture_or_task_name=task,
        num_input_shards=shards)
  two_files = seqio.get_mixture_or_task('t5beam_test_two_files')
  assert plan.num_input_shards(two_files, config(two_files.name, None)) == 2
  assert plan.num_input_shards(two_files, config(two_files.name, 2)) == 2
  with pytest.raises(plan.PlanError, match=r'num_input_shards = 3 but task '
                     r"'t5beam_test_two_files' has 2 input file"):
    plan.num_input_shards(two_files, config(two_files.name, 3))
  token_ids = seqio.get_mixture_or_task('t5beam_test_token_ids')
  assert plan.num_input_shards(token_ids, config(token_ids.name, 4)) == 4
  assert 'each of its 4 input shards scans every example' in caplog.text
