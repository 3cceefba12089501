"""Every device of a worker: the model on ('data', 'model') meshes of 8
forced CPU devices (in child processes, with the project's XLA flags) gives
what one device gives."""

import json
import os
import subprocess
import sys

import numpy as np
import pytest

from tests import pipeline_helpers as helpers

MESHES = ('8x1', '4x2', '2x4', '1x8')
# What tests/mesh_child.py runs: the 1.0 style on two meshes only.
STYLE_MESHES = [('t5_1_0', '4x2'), ('t5_1_0', '1x8')] + [
    ('t5_1_1', mesh) for mesh in MESHES]
EIGHT_DEVICES = '--xla_force_host_platform_device_count=8'


@pytest.fixture(scope='module')
def report():
  """tests/mesh_child.py's findings (one child process for all meshes)."""
  result = subprocess.run(
      [sys.executable, os.path.join(helpers.REPO, 'tests', 'mesh_child.py')],
      capture_output=True, text=True, timeout=600, check=False)
  assert result.returncode == 0, result.stderr[-3000:]
  return json.loads(result.stdout.strip().splitlines()[-1])


@pytest.mark.parametrize('style, mesh', STYLE_MESHES)
def test_every_mesh_decodes_and_scores_as_one_device(report, style, mesh):
  one, sharded = report[style]['one_device'], report[style][mesh]
  data, model = (int(n) for n in mesh.split('x'))
  assert sharded['mesh'] == {'data': data, 'model': model}
  assert sharded['greedy'] == one['greedy']
  assert sharded['beam'] == one['beam']
  assert sharded['samples'] == one['samples']
  assert sharded['continuous'] == one['continuous']
  assert one['continuous'][:len(one['greedy'])] == one['greedy']
  names = ['greedy_scores', 'beam_scores', 'sample_scores', 'score']
  if (style, mesh) == ('t5_1_1', '4x2'):
    # Beam search in continuous batching (checked on this mesh only: each
    # costs a compilation).
    assert sharded['continuous_beams'] == one['continuous_beams']
    assert one['continuous_beams'][:len(one['beam'])] == one['beam']
    names.append('continuous_beam_scores')
  for name in names:
    np.testing.assert_allclose(sharded[name], one[name], rtol=1e-5,
                               atol=1e-4)


def test_logical_axis_rules_resolve_as_flax_and_t5x_do():
  """Rules are taken in order (not the array's axes): an earlier rule
  claims its mesh axis first, and a logical axis no rule can place is
  replicated."""
  from model import partitioning  # pylint: disable=g-import-not-at-top
  P = partitioning.PartitionSpec  # pylint: disable=invalid-name
  two_d = (('embed', 'data'), ('batch', 'data'), ('mlp', 'model'),
           ('heads', 'model'))
  assert partitioning.spec(('batch', 'embed'), two_d) == P(None, 'data')
  assert partitioning.spec(('embed', 'mlp'), two_d) == P('data', 'model')
  assert partitioning.spec(('batch', 'length', 'heads', 'kv'),
                           two_d) == P('data', None, 'model', None)
  fallback = (('mlp', 'model'), ('heads', 'model'), ('heads', None))
  assert partitioning.spec(('mlp', 'heads'), fallback) == P('model', None)
  assert partitioning.spec(('embed', 'mlp'),
                           partitioning.STANDARD_RULES) == P(None, 'model')


@pytest.mark.parametrize('mesh', MESHES)
def test_each_device_holds_its_share_of_each_partitioned_parameter(report,
                                                                   mesh):
  model = int(mesh.split('x')[1])
  for style in ('t5_1_0', 't5_1_1'):
    if (style, mesh) not in STYLE_MESHES:
      continue
    shards = report[style][mesh]['shards']
    for name in ('embedding', 'mlp_wo', 'attention_out', 'qkv'):
      assert shards[name] == [1 / model] * 8, (style, name)
    assert shards['norm'] == [1.0] * 8  # replicated: 'embed' is


def test_meshes_that_do_not_fit_are_refused_naming_the_number(report):
  refusals = report['refusals']
  assert refusals['heads'].startswith(
      'the model axis of 4 (partitioning.PjitPartitioner.num_partitions) '
      "does not divide the model's num_heads = 6")
  assert refusals['batch'].startswith(
      'DatasetConfig.batch_size = 6 is not divisible by the data axis of 4')
  assert refusals['devices'].startswith(
      'partitioning.PjitPartitioner.num_partitions = 16 does not divide the '
      '8 device(s)')
  assert refusals['halves'].startswith(
      'the concurrent halves run on one device, not on a mesh of 8')


def test_a_model_given_one_device_lives_there(report):
  placed = report['one_given_device']
  assert placed['devices'] == [placed['fourth']]
  assert placed['greedy'] == placed['greedy_default']


@pytest.fixture(scope='module')
def env(tmp_path_factory):
  return helpers.small_environment(tmp_path_factory)


def t5x_style_gin(env, directory, num_partitions: int) -> str:
  path = os.path.join(directory, f'mesh_{num_partitions}.gin')
  with open(path, 'w') as f:
    f.write(f"""include 'runs/infer.gin'
CHECKPOINT_PATH = '{env['checkpoint']}'
MIXTURE_OR_TASK_NAME = 't5beam_test_two_files'
MIXTURE_OR_TASK_MODULE = 'tests.tasks'
TASK_FEATURE_LENGTHS = {{'inputs': 24, 'targets': 8}}
RestoreCheckpointConfig.dtype = 'float32'
DatasetConfig.batch_size = 4
infer.mode = 'predict_with_aux'
partitioning.PjitPartitioner.num_partitions = {num_partitions}
""")
  return path


def test_a_t5x_gin_file_with_num_partitions_runs_on_the_mesh(env, tmp_path):
  """num_partitions = 2 on 8 devices: a (4, 2) mesh through the real
  pipeline, with the records one device writes."""
  one_device = tmp_path / 'one'
  status, stderr = helpers.launch([
      f'--gin_file={t5x_style_gin(env, tmp_path, 1)}',
      f'--gin.INFER_OUTPUT_DIR="{one_device}"'])
  assert status == 0, stderr
  meshed = tmp_path / 'mesh'
  child_env = dict(os.environ, XLA_FLAGS=EIGHT_DEVICES)
  result = subprocess.run(
      [sys.executable, '-m', 'launch.infer',
       f'--gin_file={t5x_style_gin(env, tmp_path, 2)}',
       f'--gin.INFER_OUTPUT_DIR="{meshed}"'],
      cwd=helpers.REPO, env=child_env, capture_output=True, text=True,
      timeout=600, check=False)
  assert result.returncode == 0, result.stderr[-3000:]
  name = 't5beam_test_two_files-predict_with_aux'
  expected = helpers.read_records(one_device / f'{name}.jsonl-00000-of-00001')
  got = helpers.read_records(meshed / f'{name}.jsonl-00000-of-00001')
  assert [r['prediction'] for r in got] == [r['prediction'] for r in expected]
  np.testing.assert_allclose([r['aux']['scores'] for r in got],
                             [r['aux']['scores'] for r in expected],
                             rtol=1e-5, atol=1e-4)
  manifest = json.loads((meshed / f'{name}.manifest.json').read_text())
  assert manifest['this_run']['meshes'] == [{'data': 4, 'model': 2}]
  assert manifest['settings']['partitioning']['model_axis'] == 2
  one_manifest = json.loads((one_device / f'{name}.manifest.json').read_text())
  assert one_manifest['this_run']['meshes'] == [{'data': 1, 'model': 1}]
  model_info = (meshed / 'model-info.txt').read_text()
  assert "('embed', 'mlp') -> P(None, 'model')" in model_info


def test_a_model_axis_the_model_cannot_split_is_refused_at_launch(env,
                                                                  tmp_path):
  status, stderr = helpers.launch([
      f'--gin_file={t5x_style_gin(env, tmp_path, 4)}',
      f'--gin.INFER_OUTPUT_DIR="{tmp_path / "out"}"'])
  assert status == 2
  assert ("t5beam: error: the model axis of 4 (partitioning.PjitPartitioner."
          "num_partitions) does not divide the model's num_heads = 2") in stderr
  assert not (tmp_path / 'out').exists()


def test_calls_over_a_mesh_of_several_devices_run_one_at_a_time(report):
  """Two threads (the launcher's two local worker threads) running a
  LoadedModel over a (4, 2) mesh: the calls never overlap, so their
  collectives cannot interleave across devices, and each gives a lone
  call's tokens."""
  assert report['calls_at_once'] == {'overlapped': False, 'calls': 4,
                                     'all_equal': True}
