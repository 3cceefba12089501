"""gs:// checkpoints and outputs, against a real GCS-protocol server."""

import json
import subprocess
import sys

from tests import gcs_server
from tests import pipeline_helpers as helpers

SCRIPT = r'''
import json, os, sys
sys.path.insert(0, {repo!r})
import fsspec
from apache_beam.options.pipeline_options import PipelineOptions
from pipeline.config import InferConfig
from pipeline.run import run_inference
local_checkpoint, local_output, data = sys.argv[1:4]
os.environ['T5BEAM_TEST_DATA'] = data
fs = fsspec.filesystem('gcs')
fs.mkdir('t5beam-test')
fs.put(local_checkpoint, 'gs://t5beam-test/models/hf', recursive=True)
report = {{}}
for name, output, checkpoint in (
    ('local', local_output, local_checkpoint),
    ('gcs', 'gs://t5beam-test/runs/out', 'gs://t5beam-test/models/hf')):
  config = InferConfig(
      mixture_or_task_name='t5beam_test_two_files',
      task_feature_lengths={{'inputs': 24, 'targets': 8}},
      checkpoint_path=checkpoint, output_dir=output,
      mixture_or_task_module='tests.tasks', batch_size=4,
      checkpoint_period=2, num_output_shards=2)
  report[name] = run_inference(
      config, PipelineOptions(['--runner=FnApiRunner'])).status
report['rerun'] = run_inference(
    config, PipelineOptions(['--runner=FnApiRunner'])).status
report['files'] = {{os.path.basename(p): fs.cat(p).decode()
                   for p in fs.ls('gs://t5beam-test/runs/out')
                   if '.jsonl-' in p or p.endswith('manifest.json')
                   or p.endswith('.COMPLETED')}}
report['leftovers'] = [p for p in fs.find('gs://t5beam-test/runs')
                       if 'inprogress' in p or '/tmp-' in p]
print('REPORT ' + json.dumps(report))
'''


def test_gcs_checkpoint_and_output_match_a_local_run(tmp_path):
  import torch  # pylint: disable=g-import-not-at-top
  from model.config import T5Config  # pylint: disable=g-import-not-at-top
  from tests import reference  # pylint: disable=g-import-not-at-top
  data = tmp_path / 'data'
  data.mkdir()
  helpers.write_data(str(data))
  config = T5Config(vocab_size=260, d_model=32, num_heads=2, d_kv=8, d_ff=64,
                    num_encoder_layers=2, num_decoder_layers=2)
  checkpoint = tmp_path / 'hf'
  hf = reference.make_reference(config, seed=2)
  with torch.no_grad():
    hf.shared.weight[0] = 0.0
  hf.save_pretrained(checkpoint)
  local = tmp_path / 'local'
  with gcs_server.running_server() as env:
    env['PYTHONPATH'] = helpers.REPO
    process = subprocess.run(
        [sys.executable, '-c', SCRIPT.format(repo=helpers.REPO),
         str(checkpoint), str(local), str(data)],
        env=env, capture_output=True, text=True, timeout=600)
  assert process.returncode == 0, process.stderr[-3000:]
  report = json.loads(process.stdout.split('REPORT ', 1)[1])
  assert (report['local'], report['gcs'], report['rerun']) == (
      'completed', 'completed', 'already_complete')
  for index in range(2):
    name = f't5beam_test_two_files-predict.jsonl-{index:05d}-of-00002'
    assert report['files'][name] == (local / name).read_text()
    assert f'{name}.COMPLETED' in report['files']
  manifest = json.loads(
      report['files']['t5beam_test_two_files-predict.manifest.json'])
  assert sum(f['records'] for f in manifest['files']) == 34
  assert report['leftovers'] == []
