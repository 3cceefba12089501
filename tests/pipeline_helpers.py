"""Shared set-up for pipeline tests: data, a small checkpoint, configs, runs."""

import json
import os
import sys

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def prepare_environment(data_dir: str):
  """Writes the test task data and makes it (and the repo) visible to Beam's
  worker processes, which inherit this environment."""
  os.environ['T5BEAM_TEST_DATA'] = data_dir
  paths = os.environ.get('PYTHONPATH', '').split(os.pathsep)
  if REPO not in paths:
    os.environ['PYTHONPATH'] = os.pathsep.join([REPO] + [p for p in paths if p])
  from tests import tasks  # pylint: disable=g-import-not-at-top
  assert tasks.DATA_DIR == data_dir, (
      'tests.tasks was imported before prepare_environment')
  tasks.write_data(data_dir)


def read_records(path: str):
  with open(path, encoding='utf-8') as f:
    return [json.loads(line) for line in f]


def output_files(directory: str):
  """{name: bytes} of the final jsonl files in `directory`."""
  result = {}
  for name in sorted(os.listdir(directory)):
    if '.jsonl-' in name and not name.endswith('.COMPLETED'):
      with open(os.path.join(directory, name), 'rb') as f:
        result[name] = f.read()
  return result


RUN_SCRIPT = r'''
import json, sys
sys.path.insert(0, {repo!r})
from apache_beam.options.pipeline_options import PipelineOptions
from pipeline.config import InferConfig
from pipeline.run import run_inference
from model.config import T5Config
settings = json.loads(sys.argv[1])
settings['model_config'] = None
result = run_inference(InferConfig(**settings), PipelineOptions(sys.argv[2:]))
print('RESULT ' + json.dumps({{'status': result.status, 'counters': result.counters}}))
'''


def run_script_command(settings: dict, options):
  """argv of a child process that runs `settings` with pipeline `options`."""
  return [sys.executable, '-c', RUN_SCRIPT.format(repo=REPO),
          json.dumps(settings)] + list(options)
