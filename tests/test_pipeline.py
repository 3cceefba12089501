"""The Beam pipeline on real DirectRunner runs over real SeqIO tasks."""

import hashlib
import json
import logging
import os
import signal
import subprocess
import time

import numpy as np
import pytest
from apache_beam.options.pipeline_options import PipelineOptions

from tests import pipeline_helpers as helpers

IN_MEMORY = ['--runner=FnApiRunner']
MULTI_PROCESS = ['--runner=FnApiRunner',
                 '--direct_running_mode=multi_processing',
                 '--direct_num_workers=2']
TWO_FILES = 't5beam_test_two_files'  # 21 + 13 examples in two files


@pytest.fixture(scope='module')
def env(tmp_path_factory):
  return helpers.small_environment(tmp_path_factory)


def make_config(env, output_dir, **overrides):
  settings = dict(mixture_or_task_name=TWO_FILES,
                  task_feature_lengths={'inputs': 24, 'targets': 8},
                  checkpoint_path=env['checkpoint'],
                  output_dir=str(output_dir),
                  mixture_or_task_module='tests.tasks', batch_size=4,
                  checkpoint_period=2)
  settings.update(overrides)
  return helpers.infer_config(**settings)


def run(config, options=IN_MEMORY):
  from pipeline.run import run_inference  # pylint: disable=g-import-not-at-top
  return run_inference(config, PipelineOptions(options))


@pytest.fixture(scope='module')
def reference_run(env):
  """One uninterrupted in-memory run of the two-file task."""
  output = env['tmp'].mktemp('reference')
  result = run(make_config(env, output))
  return output, result


def test_one_worker_and_two_processes_give_identical_files(env, reference_run):
  reference_dir, reference = reference_run
  assert reference.counters['model_loads'] == 1
  output = env['tmp'].mktemp('multi')
  result = run(make_config(env, output), MULTI_PROCESS)
  assert helpers.output_files(output) == helpers.output_files(reference_dir)
  assert result.counters['chunks_inferred'] == 5
  # Once per worker process, not per chunk, bundle or thread.
  assert 1 <= result.counters['model_loads'] <= 2


def test_records_follow_input_order_and_match_predict_batch(env,
                                                           reference_run):
  import seqio  # pylint: disable=g-import-not-at-top
  from model.inference import InferenceModel  # pylint: disable=g-import-not-at-top
  output, result = reference_run
  records = helpers.read_records(
      os.path.join(output, f'{TWO_FILES}-predict.jsonl-00000-of-00001'))
  task = seqio.get_mixture_or_task(TWO_FILES)
  lengths = {'inputs': 24, 'targets': 8}
  expected_inputs, model_batches = [], []
  for shard in range(2):  # one input shard per file, in file order
    ds = task.get_dataset(lengths, split='test', shuffle=False,
                          shard_info=seqio.ShardInfo(shard, 2))
    expected_inputs += [ex['inputs_pretokenized'].decode()
                        for ex in ds.as_numpy_iterator()]
    model_ds = seqio.EncDecFeatureConverter(pack=False)(ds, lengths)
    model_batches += list(model_ds.as_numpy_iterator())
  assert [r['inputs']['inputs_pretokenized'] for r in records] == (
      expected_inputs)
  assert expected_inputs[0].startswith('first file 0')
  assert expected_inputs[21].startswith('second file 0')
  model = InferenceModel.load(env['checkpoint'], dtype='float32')
  batch = {k: np.stack([ex[k] for ex in model_batches])
           for k in model_batches[0]}
  tokens = model.predict_batch(batch)
  vocabulary = task.output_features['targets'].vocabulary
  assert [r['prediction'] for r in records] == [
      vocabulary.decode([t for t in row.tolist() if t]) for row in tokens]
  assert result.manifests[TWO_FILES]['records'] == 34


def test_manifest_and_markers_describe_the_outputs(reference_run):
  output, _ = reference_run
  name = f'{TWO_FILES}-predict.jsonl-00000-of-00001'
  manifest = json.loads(
      (output / f'{TWO_FILES}-predict.manifest.json').read_text())
  data = (output / name).read_bytes()
  assert manifest['files'] == [{
      'index': 0, 'name': name, 'records': 34, 'bytes': len(data),
      'sha256': hashlib.sha256(data).hexdigest()}]
  # The test tasks have no metric functions: none computed, and why.
  assert 'metrics' not in manifest
  assert 'has no metric functions' in manifest['metrics_skipped']
  assert manifest['settings']['split'] == 'test'
  assert manifest['this_run']['examples_inferred'] == 34
  assert manifest['this_run']['examples_per_second'] > 0
  assert (output / f'{name}.COMPLETED').exists()
  assert not (output / f'tmp-{TWO_FILES}-predict').exists()


def test_finished_output_returns_without_loading_the_model(env, reference_run):
  output, _ = reference_run
  before = helpers.output_files(output)
  result = run(make_config(env, output))
  assert result.status == 'already_complete'
  assert result.counters == {}
  assert helpers.output_files(output) == before


def test_different_run_is_refused_and_overwrite_replaces_it(env):
  from pipeline.plan import PlanError  # pylint: disable=g-import-not-at-top
  output = env['tmp'].mktemp('refuse')
  run(make_config(env, output, mixture_or_task_name='t5beam_test_one_file'))
  before = helpers.output_files(output)
  with pytest.raises(PlanError, match=r"holds a different run.*split: "
                     r"'test' -> 'train'.*infer.overwrite"):
    run(make_config(env, output, mixture_or_task_name='t5beam_test_one_file',
                    split='train'))
  assert helpers.output_files(output) == before
  result = run(make_config(env, output, output_ids=True,
                           mixture_or_task_name='t5beam_test_one_file',
                           overwrite=True))
  assert result.status == 'completed'
  records = helpers.read_records(
      output / 't5beam_test_one_file-predict.jsonl-00000-of-00001')
  assert len(records) == 11 and 'prediction_tokens' in records[0]


def test_output_of_an_older_t5beam_version_is_refused_by_name(env, tmp_path,
                                                              reference_run):
  """An output written before the fingerprint had a version (sampling keys
  per batch) must not be resumed or mixed with this version's."""
  from pipeline.plan import PlanError  # pylint: disable=g-import-not-at-top
  reference_dir, _ = reference_run
  output = tmp_path / 'old'
  output.mkdir()
  for name in os.listdir(reference_dir):  # the same records and markers
    if name.startswith(TWO_FILES):
      (output / name).write_bytes((reference_dir / name).read_bytes())
  record = json.loads((reference_dir / 't5beam-run.json').read_text())
  del record['settings']['fingerprint_version']
  record['fingerprint'] = 'a1b2c3d4e5f60718'
  (output / 't5beam-run.json').write_text(json.dumps(record))
  manifest_path = output / f'{TWO_FILES}-predict.manifest.json'
  manifest = json.loads(manifest_path.read_text())
  manifest['fingerprint'] = record['fingerprint']
  manifest_path.write_text(json.dumps(manifest))
  before = helpers.output_files(output)
  from pipeline.config import FINGERPRINT_VERSION  # pylint: disable=g-import-not-at-top
  with pytest.raises(PlanError, match=r'holds output written by another '
                     r't5beam version \(fingerprint version 1; this t5beam '
                     f'writes version {FINGERPRINT_VERSION}.*'
                     r'infer.overwrite=True'):
    run(make_config(env, output))
  assert helpers.output_files(output) == before


def test_chunk_files_are_named_and_found_past_five_digits(tmp_path):
  from model import files  # pylint: disable=g-import-not-at-top
  from pipeline import layout  # pylint: disable=g-import-not-at-top
  task_layout = layout.TaskLayout(str(tmp_path), 't', 'predict', 1, 3200)
  for shard, chunk in ((0, 7), (1, 99_999), (1, 100_000), (1, 312_499)):
    files.write_atomically(task_layout.chunk_path(shard, 2, chunk), b'')
  files.write_atomically(task_layout.chunk_path(0, 3, 5), b'')  # other run
  assert set(task_layout.finished_chunks(2)) == {
      (0, 7), (1, 99_999), (1, 100_000), (1, 312_499)}
  assert layout.parse_chunk_name('chunk-00001-of-00002-312499.jsonl') == (
      1, 2, 312_499)
  assert task_layout.chunk_of(3199) == 0 and task_layout.chunk_of(3200) == 1
  assert task_layout.chunk_sizes(6500) == [3200, 3200, 100]


def test_output_shards_split_the_records_in_order(env, reference_run):
  reference_dir, _ = reference_run
  output = env['tmp'].mktemp('sharded')
  result = run(make_config(env, output, num_output_shards=3))
  names = [f'{TWO_FILES}-predict.jsonl-{i:05d}-of-00003' for i in range(3)]
  parts = [(output / n).read_bytes() for n in names]
  whole = (reference_dir /
           f'{TWO_FILES}-predict.jsonl-00000-of-00001').read_bytes()
  assert b''.join(parts) == whole
  assert [f['records'] for f in result.manifests[TWO_FILES]['files']] == [
      11, 11, 12]


def test_mixture_gives_one_output_set_per_sub_task(env):
  output = env['tmp'].mktemp('mixture')
  result = run(make_config(env, output,
                           mixture_or_task_name='t5beam_test_mixture'))
  assert sorted(result.manifests) == ['t5beam_test_one_file', TWO_FILES]
  assert len(helpers.read_records(
      output / 't5beam_test_one_file-predict.jsonl-00000-of-00001')) == 11
  assert len(helpers.read_records(
      output / f'{TWO_FILES}-predict.jsonl-00000-of-00001')) == 34


def test_empty_split_gives_an_empty_output_with_a_warning(env, caplog):
  output = env['tmp'].mktemp('empty')
  with caplog.at_level(logging.WARNING):
    result = run(make_config(env, output,
                             mixture_or_task_name='t5beam_test_empty'))
  assert (output / 't5beam_test_empty-predict.jsonl-00000-of-00001'
          ).read_bytes() == b''
  assert result.manifests['t5beam_test_empty']['records'] == 0
  assert (output / 't5beam_test_empty-predict.jsonl-00000-of-00001.COMPLETED'
          ).exists()
  assert 'has no examples' in caplog.text


def test_a_fault_retried_by_beam_loses_and_duplicates_nothing(
    env, reference_run, tmp_path, monkeypatch):
  from pipeline import infer_chunks  # pylint: disable=g-import-not-at-top
  reference_dir, _ = reference_run
  marker = tmp_path / 'fault-fired'
  monkeypatch.setenv(infer_chunks.FAULT_ONCE_ENV,
                     f'{TWO_FILES}:0:1={marker}')
  output = tmp_path / 'out'
  result = run(make_config(env, output), ['--runner=BundleBasedDirectRunner'])
  assert marker.exists()  # the fault fired, and Beam retried the bundle
  assert helpers.output_files(output) == helpers.output_files(reference_dir)
  assert result.manifests[TWO_FILES]['records'] == 34


def test_killed_run_resumes_to_identical_files_inferring_only_the_rest(
    env, reference_run, tmp_path):
  from pipeline import plan  # pylint: disable=g-import-not-at-top
  reference_dir, _ = reference_run
  output = tmp_path / 'out'
  config = make_config(env, output, batch_size=1, checkpoint_period=2)
  command = helpers.run_script_command(config, IN_MEMORY, tmp_path)
  chunk_dir = config.layout(TWO_FILES).chunk_dir
  child = subprocess.Popen(command, start_new_session=True,
                           stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
  try:
    deadline = time.time() + 300
    finished = set()
    while time.time() < deadline and not finished:
      finished = set(config.layout(TWO_FILES).finished_chunks(2))
      time.sleep(0.005)
  finally:
    os.killpg(child.pid, signal.SIGKILL)
    child.wait()
  finished = config.layout(TWO_FILES).finished_chunks(2)
  total_chunks = 11 + 7  # 21 and 13 examples, 2 per chunk
  assert 1 <= len(finished) < total_chunks, (
      f'the kill came too late to test resuming: {len(finished)} chunks')
  assert not (output / f'{TWO_FILES}-predict.jsonl-00000-of-00001').exists()
  assert os.path.isdir(chunk_dir)
  result = run(config)
  assert result.counters['chunks_inferred'] == total_chunks - len(finished)
  assert result.counters['chunks_skipped'] == len(finished)
  assert helpers.output_files(output) == helpers.output_files(reference_dir)


def _sampling(**overrides):
  from model.decoding import DecodingConfig  # pylint: disable=g-import-not-at-top
  settings = dict(strategy='temperature_sample', topk=0, temperature=1.0,
                  num_decodes=2, return_all_decodes=True)
  settings.update(overrides)
  return DecodingConfig(**settings)


@pytest.fixture(scope='module')
def sampling_run(env):
  output = env['tmp'].mktemp('sampling')
  run(make_config(env, output, mode='predict_with_aux', decoding=_sampling()))
  return output


def test_samples_are_all_decodes_sorted_with_their_scores(sampling_run):
  records = helpers.read_records(
      sampling_run / f'{TWO_FILES}-predict_with_aux.jsonl-00000-of-00001')
  assert len(records) == 34
  for record in records:
    assert len(record['prediction']) == 2
    scores = record['aux']['scores']
    assert len(scores) == 2 and scores[0] <= scores[1] <= 0
  # Not all examples drew the same two samples.
  assert len({tuple(r['prediction']) for r in records}) > 20


def test_samples_do_not_depend_on_workers_or_retries(env, sampling_run,
                                                     tmp_path, monkeypatch):
  from pipeline import infer_chunks  # pylint: disable=g-import-not-at-top
  expected = helpers.output_files(sampling_run)
  multi = tmp_path / 'multi'
  run(make_config(env, multi, mode='predict_with_aux', decoding=_sampling()),
      MULTI_PROCESS)
  assert helpers.output_files(multi) == expected
  marker = tmp_path / 'fault-fired'
  monkeypatch.setenv(infer_chunks.FAULT_ONCE_ENV, f'{TWO_FILES}:1:0={marker}')
  retried = tmp_path / 'retried'
  run(make_config(env, retried, mode='predict_with_aux', decoding=_sampling()),
      ['--runner=BundleBasedDirectRunner'])
  assert marker.exists()
  assert helpers.output_files(retried) == expected


def test_samples_do_not_depend_on_the_batch_an_example_is_in(env,
                                                             sampling_run,
                                                             tmp_path):
  """Each example's key comes from (seed, task, input shard, index), so
  other batch and chunk sizes draw the same samples."""
  def records(directory):
    return helpers.read_records(
        directory / f'{TWO_FILES}-predict_with_aux.jsonl-00000-of-00001')
  output = tmp_path / 'other-batches'
  run(make_config(env, output, mode='predict_with_aux', decoding=_sampling(),
                  batch_size=3, checkpoint_period=3))
  expected = records(sampling_run)
  got = records(output)
  assert [r['prediction'] for r in got] == [r['prediction'] for r in expected]
  np.testing.assert_allclose([r['aux']['scores'] for r in got],
                             [r['aux']['scores'] for r in expected],
                             rtol=1e-5)


def test_resumed_sampling_run_draws_the_same_samples(env, sampling_run,
                                                      tmp_path):
  from model import files  # pylint: disable=g-import-not-at-top
  from pipeline import plan  # pylint: disable=g-import-not-at-top
  output = tmp_path / 'resumed'
  config = make_config(env, output, mode='predict_with_aux',
                       decoding=_sampling())
  run(config)
  layout = config.layout(TWO_FILES)
  # Make the finished run look like one killed after two chunks: keep the
  # chunk files of shard 0 chunks 0 and 1 (recomputed here from a straight
  # run's records) and remove the final outputs.
  records = (output / f'{TWO_FILES}-predict_with_aux.jsonl-00000-of-00001'
             ).read_text().splitlines(keepends=True)
  for name in os.listdir(output):
    if name.startswith(TWO_FILES):
      os.remove(output / name)
  files.write_atomically(layout.chunk_path(0, 2, 0),
                         ''.join(records[:8]).encode())
  files.write_atomically(layout.chunk_path(0, 2, 1),
                         ''.join(records[8:16]).encode())
  result = run(config)
  assert result.counters['chunks_inferred'] == 3
  assert helpers.output_files(output) == helpers.output_files(sampling_run)


def test_score_mode_writes_the_targets_log_likelihood(env, tmp_path):
  import seqio  # pylint: disable=g-import-not-at-top
  from model.inference import InferenceModel  # pylint: disable=g-import-not-at-top
  output = tmp_path / 'score'
  run(make_config(env, output, mode='score', return_intermediates=True,
                  mixture_or_task_name='t5beam_test_one_file'))
  records = helpers.read_records(
      output / 't5beam_test_one_file-score.jsonl-00000-of-00001')
  task = seqio.get_mixture_or_task('t5beam_test_one_file')
  lengths = {'inputs': 24, 'targets': 8}
  ds = seqio.EncDecFeatureConverter(pack=False)(
      task.get_dataset(lengths, split='test', shuffle=False), lengths)
  examples = list(ds.as_numpy_iterator())
  batch = {k: np.stack([e[k] for e in examples]) for k in examples[0]}
  expected = InferenceModel.load(env['checkpoint'], dtype='float32').score_batch(batch)
  np.testing.assert_allclose([r['score'] for r in records], expected,
                             atol=1e-5)
  assert set(records[0]) == {'inputs', 'score', 'aux'}
  for record, example in zip(records, examples):
    token_scores = record['aux']['token_scores']
    assert len(token_scores) == int(example['decoder_loss_weights'].sum())
    np.testing.assert_allclose(sum(token_scores), record['score'], atol=1e-4)


def test_input_options_choose_the_inputs_fields(env, tmp_path):
  output = tmp_path / 'all'
  run(make_config(env, output, include_all_inputs=True,
                  mixture_or_task_name='t5beam_test_one_file'))
  record = helpers.read_records(
      output / 't5beam_test_one_file-predict.jsonl-00000-of-00001')[0]
  assert set(record['inputs']) == {'inputs', 'inputs_pretokenized',
                                   'targets', 'targets_pretokenized'}
  assert record['inputs']['inputs'][-1] == 1  # token ids, EOS last
  output = tmp_path / 'some'
  run(make_config(env, output, input_fields_to_include=('targets',),
                  mixture_or_task_name='t5beam_test_one_file'))
  record = helpers.read_records(
      output / 't5beam_test_one_file-predict.jsonl-00000-of-00001')[0]
  assert set(record['inputs']) == {'targets', 'targets_pretokenized'}
  with pytest.raises(ValueError, match='cannot both be set'):
    make_config(env, output, include_all_inputs=True,
                input_fields_to_include=('targets',))


def test_json_conversions_follow_t5x():
  from pipeline.read import _json_value  # pylint: disable=g-import-not-at-top
  assert _json_value(b'caf\xc3\xa9') == 'café'
  assert _json_value(np.int32(7)) == 7.0 and isinstance(
      _json_value(np.int64(7)), float)
  assert _json_value(np.float32(0.5)) == 0.5
  assert _json_value(np.array([1, 2], np.int32)) == [1, 2]
  assert _json_value(np.array([b'a', b'b'])) == ['a', 'b']


def test_inputs_longer_than_their_length_are_counted(env, reference_run,
                                                     tmp_path):
  """The two-file task's inputs (UTF-8 bytes + EOS) against a length of 16:
  the manifest counts those cut and the longest, and the summary warns; at
  24 none is cut."""
  from launch import progress  # pylint: disable=g-import-not-at-top
  data = os.environ['T5BEAM_TEST_DATA']
  lengths = []
  for name in ('two-00000.tsv', 'two-00001.tsv'):
    with open(os.path.join(data, name), encoding='utf-8') as f:
      lengths += [len(line.split('\t')[0].encode()) + 1 for line in f]
  output = tmp_path / 'cut'
  config = make_config(env, output, task_feature_lengths={'inputs': 16,
                                                          'targets': 8})
  result = run(config)
  manifest = result.manifests[TWO_FILES]
  expected = sum(n > 16 for n in lengths)
  assert 0 < expected < len(lengths)
  assert manifest['truncated'] == {'inputs': {
      'examples': expected, 'longest': max(lengths), 'limit': 16,
      'unmeasured_at_limit': 0, 'empty': 0}}
  summary = progress.summary(config, result, 1.0)
  assert (f'warning: {expected} example(s) had inputs longer than 16 tokens '
          f'(the longest {max(lengths)}) and were cut') in summary
  reference = json.loads((reference_run[0] / f'{TWO_FILES}-predict'
                          '.manifest.json').read_text())
  assert reference['truncated']['inputs']['examples'] == 0
  assert reference['truncated']['inputs']['longest'] == max(lengths)
