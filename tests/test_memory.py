"""Will it fit? The launcher's per-device memory estimate, held against
XLA's own buffer assignment, and the refusal it makes on Dataflow."""

import json
import logging
import os
import subprocess
import sys

import pytest

from tests import pipeline_helpers as helpers

DATAFLOW = os.path.join(helpers.REPO, 'launch', 'dataflow')


def test_the_estimate_is_within_a_quarter_of_xla_memory_analysis():
  result = subprocess.run(
      [sys.executable, os.path.join(helpers.REPO, 'tests',
                                    'memory_child.py')],
      capture_output=True, text=True, timeout=600, check=False)
  assert result.returncode == 0, result.stderr[-3000:]
  cases = json.loads(result.stdout.strip().splitlines()[-1])
  assert len(cases) == 7
  for case in cases:
    # The parameters each device holds: exactly, by their partitioning and
    # dtype (fused kernels in the activation dtype).
    assert case['estimated_parameters'] == case['parameters_on_a_device'], (
        case)
    if case['activation_dtype'] == 'float32':
      ratio = case['estimate'] / case['xla']
      assert 0.75 <= ratio <= 1.25, (case, ratio)


@pytest.fixture(scope='module')
def env(tmp_path_factory):
  return helpers.small_environment(tmp_path_factory)


def xxl_gin(env, directory) -> str:
  """T5 1.1 XXL (the architecture from its model Gin file; the checkpoint,
  a TensorFlow one, is never read before the check refuses)."""
  from tests import checkpoint_writers  # pylint: disable=g-import-not-at-top
  import numpy as np  # pylint: disable=g-import-not-at-top
  prefix = checkpoint_writers.write_tensorflow_checkpoint(
      os.path.join(directory, 'model.ckpt'), {'unused': np.zeros(1)})
  spm = os.path.join(os.environ['T5BEAM_TEST_DATA'], 'spm.model')
  path = os.path.join(directory, 'xxl.gin')
  with open(path, 'w') as f:
    f.write(f"""include 'runs/infer.gin'
include 'models/t5_1_1_xxl.gin'
CHECKPOINT_PATH = '{prefix}'
MIXTURE_OR_TASK_NAME = 't5beam_test_sentencepiece'
MIXTURE_OR_TASK_MODULE = 'tests.tasks'
TASK_FEATURE_LENGTHS = {{'inputs': 512, 'targets': 128}}
seqio.SentencePieceVocabulary.sentencepiece_model_file = '{spm}'
seqio.SentencePieceVocabulary.extra_ids = 100  # the task's: no sentinels
""")
  return path


def launch_on_four_l4(gin_file, output, *extra):
  return helpers.launch([
      f'--gin_file={gin_file}', f'--gin.INFER_OUTPUT_DIR="{output}"',
      f'--flagfile={DATAFLOW}/gpu-4xl4.flags', '--project=my-project',
      '--region=us-central1', '--temp_location=gs://my-bucket/tmp',
      '--dry_run=True', *extra])


def test_a_model_too_big_for_the_accelerator_is_refused_naming_the_fix(
    env, tmp_path):
  status, stderr = launch_on_four_l4(xxl_gin(env, tmp_path), tmp_path / 'out')
  assert status == 2
  errors = [l for l in stderr.splitlines() if l.startswith('t5beam: error')]
  assert len(errors) == 1, stderr
  helpers.assert_short_refusal(errors[0])
  assert errors[0].startswith('t5beam: error: the run needs 2')
  assert 'GiB per device (parameters 20.' in errors[0]
  assert 'but a nvidia-l4 has 22.5 GiB, 20.2 usable' in errors[0]
  assert 'set partitioning.PjitPartitioner.num_partitions = 2' in errors[0]
  assert 'infer.skip_memory_check=True' in errors[0]
  assert not (tmp_path / 'out').exists()


@pytest.mark.parametrize('value', ['type:nvidia-l4;count:four',
                                   'type:tpu-v5-lite-podslice;topology:2by2'])
def test_unreadable_accelerator_flags_are_refused_in_one_line(value):
  from launch import infer  # pylint: disable=g-import-not-at-top
  options = infer.pipeline_options(
      [f'--dataflow_service_options=worker_accelerator={value}'])
  with pytest.raises(infer.LaunchError) as refused:
    infer.worker_devices(options)
  assert str(refused.value) == (
      f'--dataflow_service_options=worker_accelerator={value}: cannot read '
      'the devices per worker; write type:TYPE;count:N for GPUs or '
      'type:TYPE;topology:AxB for TPUs')


@pytest.mark.parametrize('setting', [
    '--gin.partitioning.PjitPartitioner.num_partitions=2',
    '--gin.infer.skip_memory_check=True'])
def test_the_fix_or_the_override_passes_the_check(env, tmp_path, setting,
                                                  caplog):
  from launch import infer  # pylint: disable=g-import-not-at-top
  argv = [f'--gin_file={xxl_gin(env, tmp_path)}',
          f'--gin.INFER_OUTPUT_DIR="{tmp_path / "out"}"',
          f'--flagfile={DATAFLOW}/gpu-4xl4.flags', setting]
  gin_files, bindings, search_paths, beam_args = infer.split_flags(argv)
  infer.parse_gin(gin_files, bindings, search_paths)
  config, _ = infer.build_config()
  caplog.set_level(logging.INFO)
  infer.check_mesh(config, infer.check_checkpoint(config.model),
                   infer.pipeline_options(beam_args))  # no LaunchError
  logged = [r.getMessage() for r in caplog.records
            if 'estimated memory' in r.getMessage()]
  assert len(logged) == 1
  assert logged[0].endswith('4 nvidia-l4; a nvidia-l4 has 22.5 GiB, of which '
                            'a run may plan on 20.2 GiB'), logged[0]


def test_the_readme_capacity_table_is_what_the_estimate_gives():
  from launch import capacity  # pylint: disable=g-import-not-at-top
  with open(os.path.join(helpers.REPO, 'README.md'), encoding='utf-8') as f:
    readme = f.read()
  assert capacity.table(512, 128, 'bfloat16') in readme
