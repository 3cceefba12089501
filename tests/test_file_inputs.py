"""runs/infer_from_files.gin: jsonl, TSV and TFRecord inputs without a task."""

import json
import os

import pytest
import tensorflow as tf

from tests import pipeline_helpers as helpers
from tests.test_launch import launch

DEMO_CHECKPOINT = os.path.join(helpers.REPO, 'launch', 'demo', 'checkpoint')
QUESTIONS = ['12 + 30', '7 + 8', '99 + 99', '40 + 2', '0 + 0']
ANSWERS = ['42', '15', '198', '42', '0']


def write_inputs(directory, file_type):
  rows = [{'question': q, 'answer': a, 'id': str(i)}
          for i, (q, a) in enumerate(zip(QUESTIONS, ANSWERS))]
  path = os.path.join(directory, f'questions.{file_type}')
  if file_type == 'jsonl':
    with open(path, 'w') as f:
      f.writelines(json.dumps(r) + '\n' for r in rows)
  elif file_type == 'tsv':
    with open(path, 'w') as f:
      f.write('id\tquestion\tanswer\n')
      f.writelines(f'{r["id"]}\t{r["question"]}\t{r["answer"]}\n'
                   for r in rows)
  else:
    with tf.io.TFRecordWriter(path) as writer:
      for r in rows:
        feature = {k: tf.train.Feature(bytes_list=tf.train.BytesList(
            value=[v.encode()])) for k, v in r.items()}
        writer.write(tf.train.Example(features=tf.train.Features(
            feature=feature)).SerializeToString())
  return path


def gin_file(directory, pattern, file_type, extra=''):
  path = os.path.join(directory, 'files.gin')
  with open(path, 'w') as f:
    f.write(f"""
include 'runs/infer_from_files.gin'
include 'models/t5beam_demo.gin'
CHECKPOINT_PATH = '{DEMO_CHECKPOINT}'
INFER_FILE_PATTERNS = ['{pattern}']
INFER_FILE_TYPE = '{file_type}'
INFER_INPUTS_KEY = 'question'
TASK_FEATURE_LENGTHS = {{'inputs': 16, 'targets': 8}}
RestoreCheckpointConfig.dtype = 'float32'
{extra}
""")
  return path


@pytest.mark.parametrize('file_type', ['jsonl', 'tsv', 'tfrecord'])
def test_files_are_read_in_order_and_answered_by_the_demo_model(
    tmp_path, file_type):
  pattern = write_inputs(tmp_path, file_type)
  output = tmp_path / 'out'
  status, stderr = launch([f'--gin_file={gin_file(tmp_path, pattern, file_type)}',
                           f'--gin.INFER_OUTPUT_DIR="{output}"'])
  assert status == 0, stderr
  (name,) = [n for n in os.listdir(output) if n.endswith('-00000-of-00001')]
  assert name.startswith('infer_files_') and '-predict.jsonl' in name
  records = helpers.read_records(output / name)
  assert [r['inputs']['inputs_pretokenized'] for r in records] == QUESTIONS
  assert [r['prediction'] for r in records] == ANSWERS


def test_targets_key_is_carried_for_scoring(tmp_path):
  pattern = write_inputs(tmp_path, 'jsonl')
  output = tmp_path / 'out'
  status, stderr = launch([
      f'--gin_file={gin_file(tmp_path, pattern, "jsonl")}',
      f'--gin.INFER_OUTPUT_DIR="{output}"', "--gin.INFER_TARGETS_KEY='answer'",
      "--gin.infer.mode='score'"])
  assert status == 0, stderr
  (name,) = [n for n in os.listdir(output) if n.endswith('-00000-of-00001')]
  records = helpers.read_records(output / name)
  assert [r['inputs']['targets_pretokenized'] for r in records] == ANSWERS
  # The demo model is sure of these sums: each scores near log(1) = 0.
  assert all(-1.0 < r['score'] <= 0.0 for r in records), records


def test_a_pattern_matching_nothing_is_refused(tmp_path):
  output = tmp_path / 'out'
  status, stderr = launch([
      f'--gin_file={gin_file(tmp_path, str(tmp_path / "none-*.jsonl"), "jsonl")}',
      f'--gin.INFER_OUTPUT_DIR="{output}"'])
  assert status == 2 and 'match no files' in stderr
  assert not output.exists()


def test_a_missing_inputs_field_names_the_field(tmp_path):
  pattern = write_inputs(tmp_path, 'jsonl')
  output = tmp_path / 'out'
  status, stderr = launch([
      f'--gin_file={gin_file(tmp_path, pattern, "jsonl")}',
      f'--gin.INFER_OUTPUT_DIR="{output}"', "--gin.INFER_INPUTS_KEY='query'"])
  assert status != 0
  assert "no field 'query'" in stderr
