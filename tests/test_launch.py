"""The command line: Gin files as T5X users write them, the embedded demo,
progress, and one clear line for every configuration error."""

import json
import os
import re
import subprocess
import sys

import pytest

from tests import pipeline_helpers as helpers

REPO = helpers.REPO


@pytest.fixture(scope='module')
def env(tmp_path_factory):
  return helpers.small_environment(tmp_path_factory)


def write_gin(directory, body: str) -> str:
  path = os.path.join(directory, 'my_infer.gin')
  with open(path, 'w') as f:
    f.write(body)
  return path


def user_gin(env, **replace) -> str:
  lines = {
      'include_run': "include 'runs/infer.gin'",
      'include_model': "include 'models/t5beam_demo.gin'",
      'CHECKPOINT_PATH': f"CHECKPOINT_PATH = '{env['checkpoint']}'",
      'MIXTURE_OR_TASK_NAME': "MIXTURE_OR_TASK_NAME = 't5beam_test_one_file'",
      'MIXTURE_OR_TASK_MODULE': "MIXTURE_OR_TASK_MODULE = 'tests.tasks'",
      'TASK_FEATURE_LENGTHS':
          "TASK_FEATURE_LENGTHS = {'inputs': 24, 'targets': 8}",
      'dtype': "RestoreCheckpointConfig.dtype = 'float32'",
      'batch': 'DatasetConfig.batch_size = 4',
  }
  lines.update(replace)
  return '\n'.join(v for v in lines.values() if v) + '\n'


launch = helpers.launch


def launch_user_gin(env, tmp_path, *extra_args, **replace):
  """Launches user_gin(env, **replace) into tmp_path/out with extra flags:
  (status, stderr, output directory)."""
  gin_file = write_gin(tmp_path, user_gin(env, **replace))
  output = tmp_path / 'out'
  status, stderr = launch([f'--gin_file={gin_file}',
                           f'--gin.INFER_OUTPUT_DIR="{output}"',
                           *extra_args])
  return status, stderr, output


assert_refused = helpers.assert_refused


def test_user_gin_file_runs_and_writes_t5x_style_outputs(env, tmp_path):
  status, stderr, output = launch_user_gin(env, tmp_path)
  assert status == 0, stderr
  records = helpers.read_records(
      output / 't5beam_test_one_file-predict.jsonl-00000-of-00001')
  assert len(records) == 11
  assert set(records[0]) == {'inputs', 'prediction'}
  config_gin = (output / 'config.gin').read_text()
  assert "DatasetConfig.batch_size = 4" in config_gin
  model_info = (output / 'model-info.txt').read_text()
  assert re.search(r'decoder/logits_dense/kernel\s+\(32, 260\)', model_info)
  assert 'examples' in stderr and 'output' not in stderr.split('\n')[0]
  assert str(output / 't5beam_test_one_file-predict.jsonl-00000-of-00001') in (
      stderr)


def test_gin_overrides_reach_the_run(env, tmp_path):
  status, stderr, output = launch_user_gin(
      env, tmp_path,
      '--gin.infer.num_output_shards=2', '--gin.infer.output_ids=True',
      "--gin_bindings=DatasetConfig.split = 'test'")
  assert status == 0, stderr
  first = helpers.read_records(
      output / 't5beam_test_one_file-predict.jsonl-00000-of-00002')
  second = helpers.read_records(
      output / 't5beam_test_one_file-predict.jsonl-00001-of-00002')
  assert len(first) + len(second) == 11
  assert 'prediction_tokens' in first[0]


def test_rerun_of_a_finished_output_says_so(env, tmp_path):
  gin_file = write_gin(tmp_path, user_gin(env))
  argv = [f'--gin_file={gin_file}',
          f'--gin.INFER_OUTPUT_DIR="{tmp_path / "out"}"']
  assert launch(argv)[0] == 0
  status, stderr = launch(argv)
  assert status == 0
  assert 'already holds this run' in stderr


def test_required_macro_not_set(env, tmp_path):
  assert_refused(*launch_user_gin(env, tmp_path, MIXTURE_OR_TASK_NAME=''),
                 'MIXTURE_OR_TASK_NAME is not set', '--gin.MIXTURE_OR_TASK')


def test_output_dir_not_set(env, tmp_path):
  gin_file = write_gin(tmp_path, user_gin(env))
  assert_refused(*launch([f'--gin_file={gin_file}']), tmp_path / 'out',
                 'INFER_OUTPUT_DIR is not set')


def test_gin_syntax_error_names_file_and_line(env, tmp_path):
  assert_refused(*launch_user_gin(
      env, tmp_path, batch='DatasetConfig.batch_size = (4'),
                 'syntax error', 'my_infer.gin')


def test_unknown_binding(env, tmp_path):
  assert_refused(*launch_user_gin(env, tmp_path,
                                  '--gin.infer.no_such_setting=3'),
                 'no_such_setting')


@pytest.mark.parametrize('macro,line,patterns', [
    # An unknown task: the message names the closest registered one.
    ('MIXTURE_OR_TASK_NAME',
     "MIXTURE_OR_TASK_NAME = 't5beam_test_one_fil'",
     ("'t5beam_test_one_fil' is not a registered", 't5beam_test_one_file')),
    ('MIXTURE_OR_TASK_MODULE',
     "MIXTURE_OR_TASK_MODULE = 'no_such.tasks'",
     ("'no_such.tasks' failed to import", 'ModuleNotFoundError')),
    ('TASK_FEATURE_LENGTHS',
     "TASK_FEATURE_LENGTHS = {'inputs': 24}",
     ("lacks 'targets'",)),
])
def test_bad_task_settings_are_refused(env, tmp_path, macro, line, patterns):
  assert_refused(*launch_user_gin(env, tmp_path, **{macro: line}), *patterns)


@pytest.mark.parametrize('make_path,message', [
    (lambda tmp: str(tmp / 'missing'), 'not found'),
    (lambda tmp: str(tmp), 'holds no checkpoint'),
])
def test_checkpoint_missing_or_unrecognised(env, tmp_path, make_path,
                                            message):
  path = make_path(tmp_path)
  assert_refused(*launch_user_gin(
      env, tmp_path, CHECKPOINT_PATH=f"CHECKPOINT_PATH = '{path}'"),
                 message, re.escape(path[-24:]))


def test_task_vocabulary_that_differs_from_the_models(env, tmp_path):
  assert_refused(*launch_user_gin(
      env, tmp_path, '--gin.VOCABULARY=@seqio.PassThroughVocabulary()',
      '--gin.seqio.PassThroughVocabulary.size=260'),
                 "task 't5beam_test_one_file' feature 'inputs' has "
                 'ByteVocabulary', 'the model PassThroughVocabulary')


def test_output_dir_holding_a_different_run(env, tmp_path):
  gin_file = write_gin(tmp_path, user_gin(env))
  output = tmp_path / 'out'
  argv = [f'--gin_file={gin_file}', f'--gin.INFER_OUTPUT_DIR="{output}"']
  assert launch(argv)[0] == 0
  before = helpers.output_files(output)
  status, stderr = launch(argv + ['--gin.infer.checkpoint_period=7'])
  assert status != 0
  assert 'holds a different run' in stderr and 'checkpoint_period' in stderr
  assert helpers.output_files(output) == before


def test_progress_line_counts_chunks_and_examples(tmp_path):
  from launch import progress  # pylint: disable=g-import-not-at-top
  from model import files  # pylint: disable=g-import-not-at-top
  config = helpers.infer_config(
      mixture_or_task_name='t', checkpoint_path='c',
      task_feature_lengths={'inputs': 4, 'targets': 4},
      output_dir=str(tmp_path), batch_size=2, checkpoint_period=5)
  layout = config.layout('t')
  reporter = progress.ProgressReporter(config, ['t'])
  assert 'reading' in reporter.line()
  for shard, count in ((0, 25), (1, 7)):  # 3 + 1 chunks of 10
    files.write_atomically(layout.count_path(shard, 2),
                           json.dumps({'examples': count}).encode())
  assert reporter.line().startswith('t5beam: 0/4 chunks, 0/32 examples')
  files.write_atomically(layout.chunk_path(0, 2, 2), b'')
  files.write_atomically(layout.chunk_path(1, 2, 0), b'')
  line = reporter.line()
  assert line.startswith('t5beam: 2/4 chunks, 12/32 examples'), line
  assert 'examples/s' in line and 'ETA' in line


def _run_demo(output, cache, *flags):
  from model import runtime  # pylint: disable=g-import-not-at-top
  return subprocess.run(
      [sys.executable, '-m', 'launch.infer', '--gin_file=examples/demo.gin',
       f'--gin.INFER_OUTPUT_DIR="{output}"', *flags],
      cwd=REPO, capture_output=True, text=True, timeout=600,
      env={**os.environ, runtime.COMPILATION_CACHE_ENV: str(cache)})


def test_embedded_demo_end_to_end(tmp_path):
  """The README's run command, minus the install: predictions right on at
  least 90% of held-out additions, shown in the summary. Then the same job
  through Beam's portable runner API (the path of Flink and Spark) writes
  the same bytes, its workers reusing the executables the first run put in
  the persistent compilation cache."""
  output = tmp_path / 'demo'
  cache = tmp_path / 'compilation-cache'
  process = _run_demo(output, cache)
  assert process.returncode == 0, process.stderr[-3000:]
  cached = sorted(os.listdir(cache))
  assert cached and f'compilation cache: {cache}' in process.stderr
  portable = _run_demo(tmp_path / 'portable', cache, '--runner=PortableRunner',
                       '--job_endpoint=embed', '--environment_type=LOOPBACK')
  assert portable.returncode == 0, portable.stderr[-3000:]
  assert (helpers.output_files(tmp_path / 'portable') ==
          helpers.output_files(output))
  assert sorted(os.listdir(cache)) == cached  # hits: nothing compiled anew
  # The demo task's metric function, computed by the run over its outputs.
  match = re.search(r'metrics: exact_match ([\d.]+)', process.stderr)
  assert match, process.stderr[-3000:]
  records = helpers.read_records(
      output / 't5beam_demo_addition-predict.jsonl-00000-of-00001')
  right = sum(r['prediction'] == r['inputs']['targets_pretokenized']
              for r in records)
  assert len(records) == 200 and right >= 180
  metrics = json.loads((output / 't5beam_demo_addition-predict.metrics.json'
                        ).read_text())
  assert metrics == {'exact_match': 100 * right / 200}
  assert float(match.group(1)) == pytest.approx(100 * right / 200, abs=0.05)
  with open(os.path.join(REPO, 'launch/demo/data/test.tsv')) as f:
    first_input = f.readline().split('\t')[0]
  assert records[0]['inputs']['inputs_pretokenized'] == first_input


def test_decoding_gin_names_reach_the_run(env, tmp_path):
  status, stderr, output = launch_user_gin(
      env, tmp_path,
      '--gin.infer.decode_fn=@decoding.beam_search',
      '--gin.infer.num_decodes=3', '--gin.decoding.beam_search.alpha=0.0',
      "--gin.infer.mode='predict_with_aux'")
  assert status == 0, stderr
  manifest = json.loads((output / 't5beam_test_one_file-predict_with_aux'
                         '.manifest.json').read_text())
  decoding = manifest['settings']['decoding']
  assert (decoding['strategy'], decoding['num_decodes'], decoding['alpha']) == (
      'beam_search', 3, 0.0)
  records = helpers.read_records(
      output / 't5beam_test_one_file-predict_with_aux.jsonl-00000-of-00001')
  assert isinstance(records[0]['prediction'], str)
  assert records[0]['aux']['scores'] <= 0


def test_sampling_settings_reach_the_run(env, tmp_path):
  status, stderr, output = launch_user_gin(
      env, tmp_path,
      '--gin.infer.decode_fn=@decoding.temperature_sample',
      '--gin.decoding.temperature_sample.topk=0',
      '--gin.decoding.temperature_sample.topp=0.9',
      '--gin.decoding.temperature_sample.temperature=0.7',
      '--gin.decoding.temperature_sample.max_decode_steps=3',
      '--gin.infer.num_decodes=2', '--gin.infer.return_all_decodes=True')
  assert status == 0, stderr
  records = helpers.read_records(
      output / 't5beam_test_one_file-predict.jsonl-00000-of-00001')
  assert all(len(r['prediction']) == 2 for r in records)
  manifest = json.loads((output / 't5beam_test_one_file-predict'
                         '.manifest.json').read_text())
  assert manifest['settings']['decoding']['topp'] == 0.9


def test_num_decodes_without_a_decoder_is_refused(env, tmp_path):
  assert_refused(*launch_user_gin(env, tmp_path,
                                  '--gin.infer.num_decodes=4'),
                 'num_decodes > 1 needs')


def test_a_run_given_no_runner_gets_two_worker_threads():
  """Without a runner and --direct_* options: FnApiRunner with two worker
  threads in the launcher's process; any --direct_* option or a runner
  the user gives is left as given."""
  from apache_beam.options.pipeline_options import DirectOptions, StandardOptions  # pylint: disable=g-import-not-at-top
  from launch import infer  # pylint: disable=g-import-not-at-top

  def chosen(beam_args):
    options = infer.pipeline_options(beam_args)
    direct = options.view_as(DirectOptions)
    return (options.view_as(StandardOptions).runner,
            direct.direct_running_mode, direct.direct_num_workers)

  assert chosen([]) == ('FnApiRunner', 'multi_threading', 2)
  assert chosen(['--direct_num_workers=1']) == ('FnApiRunner', 'in_memory', 1)
  assert chosen(['--direct_running_mode=multi_processing',
                 '--direct_num_workers=3']) == ('FnApiRunner',
                                                'multi_processing', 3)
  assert chosen(['--runner=FnApiRunner']) == ('FnApiRunner', 'in_memory', 1)
