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


def _text_inputs(directory, file_type):
  """Three files of awkward rows: non-ASCII text, inputs longer than their
  length (cut, then EOS), empty targets, a JSON string holding U+2028."""
  texts = [('Grüße aus Köln ' * (i % 4), str(i) * (i % 3)) for i in range(29)]
  texts[3] = ('a \u2028 b', 'ok')
  paths = []
  for f in range(3):
    path = os.path.join(directory, f'part-{f}.{file_type}')
    rows = texts[f::3]
    with open(path, 'w', encoding='utf-8') as out:
      if file_type == 'jsonl':
        out.writelines(json.dumps({'q': q, 'a': a}) + '\n' for q, a in rows)
      else:
        out.write('q\ta\n')
        out.writelines(f'{q}\t{a}\n' for q, a in rows if '\u2028' not in q)
    paths.append(path)
  return os.path.join(directory, f'part-*.{file_type}')


@pytest.mark.parametrize('file_type,vocabulary,settings', [
    ('jsonl', 'bytes', {}),
    ('tsv', 'bytes', {'include_all_inputs': True}),
    ('jsonl', 'sentencepiece', {'input_fields_to_include': ('targets',)}),
])
def test_plain_files_are_chunked_as_their_seqio_task_reads_them(
    tmp_path, file_type, vocabulary, settings):
  """jsonl and TSV files skip tf.data: the chunks (records' `inputs` and
  model features) equal those read through the file task's SeqIO pipeline,
  over shards of several files, cut lengths and skipped chunks."""
  import numpy as np  # pylint: disable=g-import-not-at-top
  import seqio  # pylint: disable=g-import-not-at-top
  from pipeline import file_tasks, plan, read  # pylint: disable=g-import-not-at-top
  if vocabulary == 'bytes':
    vocab = seqio.ByteVocabulary()
  else:
    helpers.write_data(str(tmp_path))
    vocab = seqio.SentencePieceVocabulary(str(tmp_path / 'spm.model'))
  spec = file_tasks.FileTaskSpec((_text_inputs(tmp_path, file_type),),
                                 file_type, 'q', vocab, targets_key='a')
  config = helpers.infer_config(
      checkpoint_path='unused', task_feature_lengths={'inputs': 12,
                                                      'targets': 4},
      batch_size=2, checkpoint_period=2, num_input_shards=2,
      output_dir=str(tmp_path / 'out'), mixture_or_task_name=spec.task_name,
      split=file_tasks.SPLIT, file_task=spec, **settings)
  plan.prepare_tasks(config)
  chunks = 0
  for shard in range(2):
    # Truncation: counted from the untrimmed ids (fast) and from the
    # trimmed ids and the *_pretokenized texts (SeqIO's path): the same.
    fast_cut, slow_cut = read.Truncation(), read.Truncation()
    fast = list(read.read_chunks(config, spec.task_name, shard, 2, skip=[1],
                                 truncation=fast_cut))
    slow = list(read._task_chunks(  # pylint: disable=protected-access
        config, spec.task_name, shard, 2, [1], slow_cut))
    assert fast_cut == slow_cut and fast_cut['inputs'][0] > 0, fast_cut
    assert [(c, n) for c, n, _ in fast] == [(c, n) for c, n, _ in slow]
    for (chunk, _, a), (_, _, b) in zip(fast, slow):
      assert (a is None) == (b is None) == (chunk == 1)
      if a is None:
        continue
      chunks += 1
      assert a.first == b.first == 4 * chunk
      assert a.inputs == b.inputs
      for name in a.features:
        np.testing.assert_array_equal(a.features[name], b.features[name])
  assert chunks >= 4
  first = json.loads(fast[0][2].inputs[0])
  if 'include_all_inputs' in settings:
    assert first['inputs'][-1] == 1 and len(first['inputs']) <= 12
  elif 'input_fields_to_include' in settings:
    assert sorted(first) == ['targets', 'targets_pretokenized']
  else:
    assert sorted(first) == ['inputs_pretokenized', 'targets_pretokenized']
