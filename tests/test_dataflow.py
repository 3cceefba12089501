"""Dataflow without a cloud account: the job built offline with --dry_run,
the worker images' pins, and the Flex Template's parameters run for real."""

import datetime
import json
import os
import re
import shutil
import subprocess
import sys

import pytest

from tests import pipeline_helpers as helpers

REPO = helpers.REPO
DATAFLOW = os.path.join(REPO, 'launch', 'dataflow')
IMAGE = 'us-docker.pkg.dev/my-project/t5beam/{}:0.1.0'

# Runs in a copy of the repository that has a user task package beside
# launch/, as the README tells users to lay it out: calls the real launcher,
# then reads the Dataflow job it built the way Dataflow's client would
# describe it at submission (apiclient.Environment), minus the uploads.
DRY_RUN_SCRIPT = r'''
import json, sys, tarfile
from apache_beam.portability.api import beam_runner_api_pb2 as api
from apache_beam.runners.dataflow.internal import apiclient
from launch import infer
from pipeline import run
results = []
original = run.run_inference
def keep(*args, **kwargs):
  results.append(original(*args, **kwargs))
  return results[-1]
run.run_inference = keep
status = infer.main(sys.argv[1:])
job = results[0].beam_result.job
environment = apiclient.Environment(
    [], job.options, apiclient._FNAPI_ENVIRONMENT_MAJOR_VERSION,
    'gs://my-bucket/staging/pipeline.pb', job.proto_pipeline).proto
(pool,) = environment.worker_pools
(sdk,) = job.proto_pipeline.components.environments.values()
staged = {}
for dependency in sdk.dependencies:
  name = api.ArtifactStagingToRolePayload.FromString(
      dependency.role_payload).staged_name
  staged[name] = api.ArtifactFilePayload.FromString(
      dependency.type_payload).path
with tarfile.open(staged['workflow.tar.gz']) as tar:
  sdist = sorted(name.split('/', 1)[1] for name in tar.getnames()
                 if '/' in name)
print('REPORT ' + json.dumps({
    'status': status,
    'transforms': sorted(t.unique_name for t in
                         job.proto_pipeline.components.transforms.values()),
    'container': api.DockerPayload.FromString(sdk.payload).container_image,
    'service_options': list(environment.service_options),
    'experiments': list(environment.experiments),
    'sdk_images': [[i.container_image, i.use_single_core_per_container]
                   for i in pool.sdk_harness_container_images],
    'threads': pool.num_threads_per_worker,
    'machine_type': pool.machine_type,
    'sdist': sdist,
}))
'''

USER_TASKS = r'''
"""A user's task module, packaged by setup.py because it sits beside launch/."""
import os
import seqio
from launch.demo import tasks as demo

if 'my_addition' not in seqio.TaskRegistry.names():
  seqio.TaskRegistry.add(
      'my_addition',
      source=seqio.TextLineDataSource(
          {'test': os.path.join(demo.DATA_DIR, 'test.tsv')}),
      preprocessors=[demo.parse_tsv, seqio.preprocessors.tokenize,
                     seqio.preprocessors.append_eos_after_trim],
      output_features={
          'inputs': seqio.Feature(demo.VOCABULARY, add_eos=True),
          'targets': seqio.Feature(demo.VOCABULARY, add_eos=True)})
'''


def user_checkout(tmp_path) -> str:
  """The repository's packages and setup.py, plus the user's my_tasks/."""
  root = tmp_path / 'checkout'
  for name in ('model', 'pipeline', 'launch'):
    shutil.copytree(os.path.join(REPO, name), root / name,
                    ignore=shutil.ignore_patterns('__pycache__'))
  for name in ('setup.py', 'requirements.txt'):
    shutil.copy(os.path.join(REPO, name), root / name)
  (root / 'my_tasks').mkdir()
  (root / 'my_tasks' / '__init__.py').write_text(USER_TASKS)
  return str(root)


@pytest.mark.parametrize('accelerator,service_option,machine_type', [
    ('gpu', 'worker_accelerator=type:nvidia-l4;count:1;install-nvidia-driver',
     'g2-standard-8'),
    ('tpu', 'worker_accelerator=type:tpu-v5-lite-podslice;topology:1x1',
     'ct5lp-hightpu-1t'),
    # One VM, several accelerators, one SDK process owning them all.
    ('tpu-v5e-2x2',
     'worker_accelerator=type:tpu-v5-lite-podslice;topology:2x2',
     'ct5lp-hightpu-4t'),
    ('tpu-v5e-2x4',
     'worker_accelerator=type:tpu-v5-lite-podslice;topology:2x4',
     'ct5lp-hightpu-8t'),
    ('gpu-4xl4',
     'worker_accelerator=type:nvidia-l4;count:4;install-nvidia-driver',
     'g2-standard-48'),
    ('gpu-8xh100',
     'worker_accelerator=type:nvidia-h100-80gb;count:8;install-nvidia-driver',
     'a3-highgpu-8g'),
])
def test_dry_run_builds_the_dataflow_job_offline(
    tmp_path, accelerator, service_option, machine_type):
  root = user_checkout(tmp_path)
  with open(os.path.join(root, 'my_infer.gin'), 'w') as f:
    f.write("include 'runs/infer.gin'\n"
            "include 'models/t5beam_demo.gin'\n"
            f"CHECKPOINT_PATH = '{root}/launch/demo/checkpoint'\n"
            "MIXTURE_OR_TASK_NAME = 'my_addition'\n"
            "MIXTURE_OR_TASK_MODULE = 'my_tasks'\n"
            "TASK_FEATURE_LENGTHS = {'inputs': 16, 'targets': 8}\n")
  output = tmp_path / 'out'
  image = IMAGE.format(accelerator)
  environment = {k: v for k, v in os.environ.items()
                 if not k.startswith(('GOOGLE_', 'CLOUDSDK_'))}
  environment['PYTHONPATH'] = root
  process = subprocess.run(
      [sys.executable, '-c', DRY_RUN_SCRIPT,
       '--gin_file=my_infer.gin', f'--gin.INFER_OUTPUT_DIR="{output}"',
       f'--flagfile=launch/dataflow/{accelerator}.flags',
       '--project=my-project', '--region=us-central1',
       '--temp_location=gs://my-bucket/tmp',
       f'--sdk_container_image={image}', '--dry_run=True'],
      cwd=root, env=environment, capture_output=True, text=True, timeout=600)
  assert process.returncode == 0, process.stderr[-3000:]
  report = json.loads(process.stdout.split('REPORT ', 1)[1])
  assert report['status'] == 0
  steps = {name.split('/')[1] for name in report['transforms']
           if name.startswith('T5Inference/')}
  assert {'ListInputShards', 'ReadShards', 'SpreadChunks', 'InferChunks',
          'PlanMerge', 'MergeOutputShards', 'WriteManifest',
          'ReleaseLock'} <= steps  # the job releases the run lock itself
  # The accelerator and the container reach the job description.
  assert report['service_options'] == [service_option]
  assert report['machine_type'] == machine_type
  assert report['container'] == image
  assert report['sdk_images'] == [[image, True]]  # one SDK process per VM
  assert report['threads'] == 1
  assert 'no_use_multiple_sdk_containers' in report['experiments']
  # setup.py packaged t5beam with its Gin files and the user's task module.
  for name in ('model/network.py', 'pipeline/infer_and_write.py',
               'launch/infer.py', 'launch/configs/runs/infer.gin',
               'launch/demo/tasks.py', 'my_tasks/__init__.py'):
    assert name in report['sdist'], name
  assert not any(name.startswith('tests/') for name in report['sdist'])
  # A dry run writes nothing.
  assert not output.exists()


def pinned(package: str) -> str:
  with open(os.path.join(REPO, 'requirements.txt')) as f:
    for line in f:
      match = re.match(rf'{re.escape(package)}(\[[a-z,]+\])?==(\S+)$',
                       line.strip().lower())
      if match:
        return match.group(2)
  raise AssertionError(f'{package} is not pinned')


@pytest.mark.parametrize('name,jax_extra', [('Dockerfile.gpu', 'cuda12'),
                                            ('Dockerfile.tpu', 'tpu')])
def test_worker_images_use_the_pinned_beam_and_jax(name, jax_extra):
  with open(os.path.join(DATAFLOW, name)) as f:
    text = f.read()
  python = f'{sys.version_info.major}.{sys.version_info.minor}'
  (base,) = re.findall(r'^FROM (\S+)', text, re.M)
  assert base == f'apache/beam_python{python}_sdk:{pinned("apache-beam")}'
  assert f'"jax[{jax_extra}]=={pinned("jax")}"' in text
  assert 'pip install --no-cache-dir -r requirements.txt' in text
  assert re.search(r'^ENTRYPOINT \["/opt/apache/beam/boot"\]', text, re.M)


def test_a_batch_the_workers_devices_cannot_split_is_refused_before_submitting(
    tmp_path):
  """The flags say each worker has 8 TPU chips: a batch of 20 cannot be
  split over a data axis of 8, and the launcher says so at once."""
  status, stderr = helpers.launch([
      '--gin_file=examples/demo.gin', f'--gin.INFER_OUTPUT_DIR="{tmp_path}"',
      '--gin.DatasetConfig.batch_size=20',
      f'--flagfile={DATAFLOW}/tpu-v5e-2x4.flags', '--project=my-project',
      '--region=us-central1', '--temp_location=gs://my-bucket/tmp',
      '--dry_run=True'])
  assert status == 2
  assert ('t5beam: error: DatasetConfig.batch_size = 20 is not divisible by '
          'the data axis of 8 device(s)') in stderr
  assert os.listdir(tmp_path) == []


def test_flex_template_parameters_launch_a_scheduled_run(tmp_path):
  from launch import flex_template, infer  # pylint: disable=g-import-not-at-top
  with open(os.path.join(DATAFLOW, 'flex', 'metadata.json')) as f:
    metadata = json.load(f)
  names = {p['name'] for p in metadata['parameters']}
  assert names == (set(flex_template.PARAMETERS) |
                   set(flex_template.GIN_FILES) | {flex_template.OVERRIDES})
  assert {p['name'] for p in metadata['parameters']
          if not p['isOptional']} == {'checkpoint_path',
                                      'mixture_or_task_name', 'output_dir'}
  with open(os.path.join(DATAFLOW, 'flex', 'Dockerfile')) as f:
    dockerfile = f.read()
  assert ('FLEX_TEMPLATE_PYTHON_PY_FILE=/template/launch/flex_template.py'
          in dockerfile)

  train = tmp_path / 'train'
  for step in (2000, 4000):
    shutil.copytree(os.path.join(REPO, 'launch', 'demo', 'checkpoint'),
                    train / f'checkpoint_{step}')
  values = {
      'checkpoint_path': str(train),
      'checkpoint_mode': 'latest',
      'mixture_or_task_name': 't5beam_demo_addition',
      'mixture_or_task_module': 'launch.demo.tasks',
      'task_feature_lengths': "{'inputs': 16, 'targets': 8}",
      'output_dir': str(tmp_path / 'infer' / '{date}' /
                        'step_{checkpoint_step}'),
      'gin_file': 'runs/infer.gin',
      'model_gin': 'models/t5beam_demo.gin',
      'gin_overrides': ("RestoreCheckpointConfig.dtype = 'float32'; "
                        'DatasetConfig.batch_size = 50; '
                        'infer.num_output_shards = 2'),
      'lock_startup_seconds': '1800',
  }
  argv = [f'--{k}={v}' for k, v in values.items()] + ['--runner=FnApiRunner']
  # Every parameter reaches the run's configuration.
  run_plan, _ = infer.prepare(flex_template.to_launch_argv(argv))
  config = run_plan.config
  assert config.model.checkpoint_path == str(train / 'checkpoint_4000')
  assert config.task_feature_lengths == {'inputs': 16, 'targets': 8}
  assert config.model.batch_size == 50 and config.num_output_shards == 2
  assert config.lock_startup_seconds == 1800.0
  assert config.wait_until_finish is False
  today = datetime.datetime.now(datetime.timezone.utc).strftime('%Y-%m-%d')
  status = flex_template.main(argv)
  assert status == 0
  (day,) = os.listdir(tmp_path / 'infer')
  assert day >= today
  output = tmp_path / 'infer' / day / 'step_4000'
  records = []
  for index in range(2):
    shard = output / f't5beam_demo_addition-predict.jsonl-{index:05d}-of-00002'
    assert (output / (shard.name + '.COMPLETED')).exists()
    records += helpers.read_records(str(shard))
  assert len(records) == 200
  # The demo model adds every held-out pair correctly.
  assert all(r['prediction'] == r['inputs']['targets_pretokenized']
             for r in records)
  # Submitted without waiting: the job itself released the lock.
  assert not [n for n in os.listdir(output) if 'lock' in n]
  times = {n: os.stat(output / n).st_mtime_ns for n in os.listdir(output)}
  assert flex_template.main(argv) == 0  # the next scheduled launch: no-op
  assert {n: os.stat(output / n).st_mtime_ns
          for n in os.listdir(output)} == times
