"""Costs that must grow with their own work only, at any task size: the
merge streams, the lock's heartbeat rate stays within GCS's per-object limit,
a resume over changed input is refused, other Beam runners work."""

import hashlib
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
    with_targets = [json.loads(l) for l in lines]
    with_targets = [r for r in with_targets
                    if 'targets_pretokenized' in r['inputs']]
    assert output.with_targets == len(with_targets) == 12_000
    assert output.exact_matches == sum(
        r['prediction'] == r['inputs']['targets_pretokenized']
        for r in with_targets)
    written += data
  assert not [n for n in os.listdir(tmp_path) if n.startswith('.inprogress')]


def _plan(config, counts):
  """The merge jobs and the summary PlanMerge makes of shard counts."""
  from pipeline import merge  # pylint: disable=g-import-not-at-top
  jobs, summary = [], None
  for item in merge.PlanMerge(config).process(
      ('big', {'counts': list(counts.items()), 'stats': []})):
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
