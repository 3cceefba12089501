"""runs/infer_from_files.gin: jsonl, TSV and TFRecord inputs without a task."""

import dataclasses
import json
import os

import apache_beam as beam
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
  # Gin's search for includes as Python packages logs no false errors.
  assert 'Path not found' not in stderr
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
    # Inputs '' (every fourth row): empty but for EOS, counted alike.
    assert fast_cut['inputs'][3] > 0, fast_cut
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


def test_small_chunks_travel_a_few_to_an_element_skipped_ones_never(
    tmp_path, monkeypatch):
  """ReadShard packs a shard's pending chunks, in order, into elements of
  at least EXAMPLES_PER_ELEMENT examples (the last one less); chunks an
  earlier run finished are in none."""
  import seqio  # pylint: disable=g-import-not-at-top
  from pipeline import file_tasks, plan, read  # pylint: disable=g-import-not-at-top
  monkeypatch.setattr(read, 'EXAMPLES_PER_ELEMENT', 5)
  spec = file_tasks.FileTaskSpec((_text_inputs(tmp_path, 'jsonl'),), 'jsonl',
                                 'q', seqio.ByteVocabulary(), targets_key='a')
  config = helpers.infer_config(
      checkpoint_path='unused', task_feature_lengths={'inputs': 12,
                                                      'targets': 4},
      batch_size=2, checkpoint_period=1, num_input_shards=1,
      output_dir=str(tmp_path / 'out'), mixture_or_task_name=spec.task_name,
      split=file_tasks.SPLIT, file_task=spec)
  plan.prepare_tasks(config)
  finished = frozenset({(0, 1), (0, 6)})
  reader = read.ReadShard(config, [plan.TaskPlan(spec.task_name, 1, finished)])
  reader.setup()
  outputs = list(reader.process((spec.task_name, 0, 1)))
  elements = [o for o in outputs if not isinstance(o, beam.pvalue.TaggedOutput)]
  assert all(key == (spec.task_name, 0) for key, _ in elements)
  groups = [[chunk for chunk, _ in group] for _, group in elements]
  # 29 examples in 15 chunks of 2 (the last of 1); 1 and 6 were finished.
  assert sum(groups, []) == [c for c in range(15) if c not in (1, 6)]
  sizes = [sum(len(data) for _, data in group) for _, group in elements]
  assert all(size >= 5 for size in sizes[:-1]) and 0 < sizes[-1]
  assert all(size < 5 + 2 for size in sizes)  # closed once full
  assert len(elements) == 5
  for _, group in elements:
    for chunk, data in group:
      assert data.first == 2 * chunk


def _one_element(tmp_path, monkeypatch):
  """A file task of 29 examples, 4 to a chunk, and the one element its
  reader makes of all 8 chunks: (config, spec, element)."""
  import seqio  # pylint: disable=g-import-not-at-top
  from pipeline import file_tasks, plan, read  # pylint: disable=g-import-not-at-top
  monkeypatch.setattr(read, 'EXAMPLES_PER_ELEMENT', 100)
  spec = file_tasks.FileTaskSpec((_text_inputs(tmp_path, 'jsonl'),), 'jsonl',
                                 'q', seqio.ByteVocabulary(), targets_key='a')
  config = helpers.infer_config(
      checkpoint_path=DEMO_CHECKPOINT,
      task_feature_lengths={'inputs': 12, 'targets': 4}, batch_size=2,
      checkpoint_period=2, num_input_shards=1,
      output_dir=str(tmp_path / 'out'), mixture_or_task_name=spec.task_name,
      split=file_tasks.SPLIT, file_task=spec)
  plan.prepare_tasks(config)
  reader = read.ReadShard(config, [plan.TaskPlan(spec.task_name, 1)])
  reader.setup()
  (element,) = [o for o in reader.process((spec.task_name, 0, 1))
                if not isinstance(o, beam.pvalue.TaggedOutput)]
  assert [chunk for chunk, _ in element[1]] == list(range(8))
  return config, spec, element


def test_chunks_a_retried_bundle_already_wrote_are_kept_not_redone(
    tmp_path, monkeypatch):
  """An element whose bundle is retried after some of its chunk files were
  written: those files are left as they are (no model work for them), the
  others are written."""
  from pipeline import infer_chunks  # pylint: disable=g-import-not-at-top
  config, spec, element = _one_element(tmp_path, monkeypatch)
  layout = config.layout(spec.task_name)
  paths = [layout.chunk_path(0, 1, chunk) for chunk, _ in element[1]]
  os.makedirs(os.path.dirname(paths[0]), exist_ok=True)
  for chunk in (1, 4):
    with open(paths[chunk], 'w') as f:
      f.write('{"kept": true}\n')
  infer = infer_chunks.InferChunk(config, 'fingerprint', {spec.task_name: 1})
  infer.setup()
  infer.start_bundle()
  ((_, stats),) = list(infer.process(element))
  infer.finish_bundle()
  infer.teardown()
  assert stats.chunks == 6
  for chunk, path in enumerate(paths):
    records_written = helpers.read_records(path)
    if chunk in (1, 4):
      assert records_written == [{'kept': True}]
    else:
      assert len(records_written) == min(4, 29 - 4 * chunk)
      assert all(set(r) == {'inputs', 'prediction'} for r in records_written)


def _join_model_loads():
  import threading  # pylint: disable=g-import-not-at-top
  from pipeline import infer_chunks  # pylint: disable=g-import-not-at-top
  for thread in threading.enumerate():
    if thread.name == infer_chunks.LOAD_THREAD:
      thread.join()


def test_readers_load_the_model_inference_then_uses(tmp_path, monkeypatch,
                                                    caplog):
  """ReadShard, given the inference step's ModelLoader, starts loading the
  model on a background thread at the first chunk it reads that is still
  to infer, so the load overlaps the reading (a shard an earlier run
  finished starts none); InferChunk (a separately pickled copy, as Beam
  ships it) then takes that same model: one load in the process. A load
  that fails in the background is logged, and inference meets the error
  itself."""
  import pickle  # pylint: disable=g-import-not-at-top
  import threading  # pylint: disable=g-import-not-at-top
  from pipeline import inference, infer_chunks, plan, read  # pylint: disable=g-import-not-at-top
  loads, os_names = [], []
  load_model = inference.load_model

  def counted_load(*args, **kwargs):
    loads.append(threading.current_thread().name)
    os_names.append(helpers.os_thread_name())
    return load_model(*args, **kwargs)

  monkeypatch.setattr(inference, 'load_model', counted_load)
  config, spec, element = _one_element(tmp_path, monkeypatch)
  loader = infer_chunks.ModelLoader(config, 'fingerprint')
  finished = read.ReadShard(
      config, [plan.TaskPlan(spec.task_name, 1,
                             frozenset((0, chunk) for chunk in range(8)))],
      pickle.loads(pickle.dumps(loader)))
  finished.setup()
  outputs = list(finished.process((spec.task_name, 0, 1)))
  assert all(isinstance(o, beam.pvalue.TaggedOutput) for o in outputs)
  _join_model_loads()
  assert not loads
  reader = read.ReadShard(config, [plan.TaskPlan(spec.task_name, 1)],
                          pickle.loads(pickle.dumps(loader)))
  reader.setup()
  assert not loads
  (read_element,) = [o for o in reader.process((spec.task_name, 0, 1))
                     if not isinstance(o, beam.pvalue.TaggedOutput)]
  assert [chunk for chunk, _ in read_element[1]] == list(range(8))
  _join_model_loads()
  assert loads == os_names == [infer_chunks.LOAD_THREAD]
  infer = infer_chunks.InferChunk(config, 'fingerprint', {spec.task_name: 1},
                                  loader=pickle.loads(pickle.dumps(loader)))
  infer.setup()
  infer.start_bundle()
  ((_, stats),) = list(infer.process(element))
  infer.finish_bundle()
  infer.teardown()
  assert loads == [infer_chunks.LOAD_THREAD]
  assert stats.chunks == 8 and stats.examples == 29

  bad = dataclasses.replace(
      config, model=dataclasses.replace(
          config.model, checkpoint_path=str(tmp_path / 'no-checkpoint')))
  broken = infer_chunks.ModelLoader(bad, 'fingerprint')
  with caplog.at_level('WARNING'):
    broken.start()
    _join_model_loads()
  assert 'loading the model ahead of inference failed' in caplog.text
  with pytest.raises(Exception, match='no-checkpoint'):
    broken.acquire()


def test_records_are_made_on_the_writer_and_its_failure_fails_the_bundle(
    tmp_path, monkeypatch):
  """InferChunk runs the model on the worker's thread and makes each
  chunk's records on a writer thread while the model runs on; a record
  that cannot be made fails the bundle (Beam retries it), its chunk file
  never appears, and the other chunks' files are whole."""
  import threading  # pylint: disable=g-import-not-at-top
  from pipeline import inference, infer_chunks  # pylint: disable=g-import-not-at-top
  config, spec, element = _one_element(tmp_path, monkeypatch)
  chunks = [chunk for chunk, _ in element[1]]
  made_on, os_names = [], []
  make_records = inference.records

  def records(*args):
    made_on.append(threading.current_thread().name)
    os_names.append(helpers.os_thread_name())
    if len(made_on) == 3:
      raise ValueError('this chunk cannot be decoded')
    return make_records(*args)

  monkeypatch.setattr(inference, 'records', records)
  infer = infer_chunks.InferChunk(config, 'fingerprint', {spec.task_name: 1})
  infer.setup()
  infer.start_bundle()
  with pytest.raises(ValueError, match='cannot be decoded'):
    list(infer.process(element))
    infer.finish_bundle()
  infer.teardown()
  assert made_on and all(name.startswith(infer_chunks.WRITER_THREAD)
                         for name in made_on)
  assert set(os_names) == {infer_chunks.WRITER_THREAD}
  layout = config.layout(spec.task_name)
  paths = [layout.chunk_path(0, 1, chunk) for chunk in chunks]
  written = [os.path.exists(p) for p in paths]
  assert written[:2] == [True, True] and not written[2]
  for chunk, path in zip(chunks, paths):
    if os.path.exists(path):
      records_written = helpers.read_records(path)
      first = 4 * chunk
      assert len(records_written) == min(4, 29 - first)
      assert all(set(r) == {'inputs', 'prediction'} for r in records_written)
  from model import files  # pylint: disable=g-import-not-at-top
  temporaries = [n for n in os.listdir(os.path.dirname(paths[0]))
                 if n.startswith(files.TEMP_PREFIX)]
  assert not temporaries, temporaries


GOOD = [f'{a} + {b}' for a, b in ((1, 2), (30, 4), (15, 15), (9, 0), (7, 70),
                                  (11, 22), (50, 49), (3, 3))]
# Bad lines of each kind, with the problem their errors entry names.
BAD_JSONL = [(b'{"question": "1 + 1"', 'not JSON'),
             (b'["12 + 1"]', 'not a JSON object'),
             (b'{"id": "7"}', "no field 'question'"),
             (b'{"question": 12}', "field 'question' is not a string"),
             (b'{"question": "\xff 3 + 4"}', 'not UTF-8')]
BAD_TSV = [(b'1 + 1', '1 columns, the header has 2'),
           (b'x\t2 + 2\textra', '3 columns, the header has 2'),
           (b'y\t\xfe 5 + 5', 'not UTF-8')]


def _write_with_bad(directory, file_type, bad_lines, parts=(0, 1), copies=1):
  """Two files (two input shards) of the GOOD questions (each half `copies`
  times); the second has `bad_lines` after its first good ones, one after
  each, the rest at its end. Returns (pattern, the bad lines' line
  numbers)."""
  halves = (GOOD[:4] * copies, GOOD[4:] * copies)
  numbers = []
  for index, questions in enumerate(halves):
    lines = []
    if file_type == 'tsv':
      lines.append(b'id\tquestion')
    for i, question in enumerate(questions):
      lines.append(json.dumps({'question': question}).encode()
                   if file_type == 'jsonl' else
                   f'{i}\t{question}'.encode())
      if index == 1 and i < len(bad_lines):
        lines.append(bad_lines[i])
        numbers.append(len(lines))
    if index == 1:
      for line in bad_lines[len(questions):]:
        lines.append(line)
        numbers.append(len(lines))
    if index in parts:
      with open(os.path.join(directory, f'part-{index}.{file_type}'),
                'wb') as f:
        f.write(b'\n'.join(lines) + b'\n')
  return str(directory / f'part-*.{file_type}'), numbers


def _launch_files(directory, pattern, file_type, output, *flags):
  return launch([f'--gin_file={gin_file(directory, pattern, file_type)}',
                 f'--gin.INFER_OUTPUT_DIR="{output}"', *flags])


@pytest.mark.parametrize('file_type', ['jsonl', 'tsv'])
def test_bad_records_are_skipped_and_listed_within_the_limit(tmp_path,
                                                              file_type):
  """infer.max_bad_records = -1: each bad line is skipped and listed (file,
  line, problem, raw text); the outputs equal those of the same files
  without the bad lines."""
  bad = BAD_JSONL if file_type == 'jsonl' else BAD_TSV
  clean_dir, bad_dir = tmp_path / 'clean', tmp_path / 'bad'
  clean_dir.mkdir()
  bad_dir.mkdir()
  clean, _ = _write_with_bad(clean_dir, file_type, [])
  dirty, numbers = _write_with_bad(bad_dir, file_type, [l for l, _ in bad])
  status, stderr = _launch_files(clean_dir, clean, file_type, tmp_path / 'a')
  assert status == 0, stderr
  status, stderr = _launch_files(bad_dir, dirty, file_type, tmp_path / 'b',
                                 '--gin.infer.max_bad_records=-1')
  assert status == 0, stderr
  # (The task's name, in the file names, comes from the file pattern.)
  assert list(helpers.output_files(tmp_path / 'b').values()) == list(
      helpers.output_files(tmp_path / 'a').values())
  (errors,) = [n for n in os.listdir(tmp_path / 'b')
               if n.endswith('.errors.jsonl')]
  listed = helpers.read_records(tmp_path / 'b' / errors)
  part = str(bad_dir / f'part-1.{file_type}')
  assert [(e['file'], e['number']) for e in listed] == [
      (part, n) for n in numbers]
  for entry, (line, problem) in zip(listed, bad):
    assert entry['problem'].startswith(problem), entry
    assert entry['raw'] == line.decode('utf-8', errors='replace')
  (manifest,) = [n for n in os.listdir(tmp_path / 'b')
                 if n.endswith('.manifest.json')]
  manifest = json.loads((tmp_path / 'b' / manifest).read_text())
  assert manifest['bad_records'] == len(bad) and manifest['records'] == 8


def test_bad_records_past_the_limit_fail_the_run_and_a_rerun_resumes(
    tmp_path):
  """With the default limit (0) the good shard's chunks finish and are
  kept, the run fails naming the first bad line; fixing the file resumes
  (only its shard is read and inferred again). A limit of 2 under 5 bad
  lines fails too; a rerun with a larger limit resumes from the kept
  chunks. Both end with the clean files' outputs."""
  clean_dir, bad_dir = tmp_path / 'clean', tmp_path / 'bad'
  clean_dir.mkdir()
  bad_dir.mkdir()
  clean, _ = _write_with_bad(clean_dir, 'jsonl', [])
  dirty, numbers = _write_with_bad(bad_dir, 'jsonl',
                                   [l for l, _ in BAD_JSONL])
  assert _launch_files(clean_dir, clean, 'jsonl', tmp_path / 'ref')[0] == 0
  expected = list(helpers.output_files(tmp_path / 'ref').values())

  output = tmp_path / 'default'
  status, stderr = _launch_files(bad_dir, dirty, 'jsonl', output)
  assert status == 1
  (line,) = [l for l in stderr.splitlines() if l.startswith('t5beam: error')]
  assert '5 bad input record(s), over infer.max_bad_records = 0' in line
  assert f'part-1.jsonl line {numbers[0]}: not JSON' in line
  helpers.assert_short_refusal(line)
  assert helpers.output_files(output) == {}
  (chunks,) = [n for n in os.listdir(output) if n.startswith('tmp-')]
  assert [n for n in os.listdir(output / chunks)
          if n.startswith('chunk-00000-of-00002')]  # the good shard's
  # The user removes the bad lines: the run resumes.
  _write_with_bad(bad_dir, 'jsonl', [], parts=(1,))
  status, stderr = _launch_files(bad_dir, dirty, 'jsonl', output)
  assert status == 0, stderr
  assert 'this run inferred 4' in stderr  # the fixed shard only
  assert list(helpers.output_files(output).values()) == expected

  _write_with_bad(bad_dir, 'jsonl', [l for l, _ in BAD_JSONL], parts=(1,))
  output = tmp_path / 'limit'
  status, stderr = _launch_files(bad_dir, dirty, 'jsonl', output,
                                 '--gin.infer.max_bad_records=2')
  assert status == 1 and 'over infer.max_bad_records = 2' in stderr
  status, stderr = _launch_files(bad_dir, dirty, 'jsonl', output,
                                 '--gin.infer.max_bad_records=5')
  assert status == 0, stderr
  assert 'this run inferred 0' in stderr  # every chunk was kept
  assert list(helpers.output_files(output).values()) == expected


def test_tfrecord_bad_records_and_damage_are_reported(tmp_path):
  """A record that is not a tf.Example and one without the inputs feature
  are skipped and named; a file damaged mid-way is read up to the damage,
  reported at the record where reading stopped."""
  import seqio  # pylint: disable=g-import-not-at-top
  from pipeline import file_tasks  # pylint: disable=g-import-not-at-top

  def example(**values):
    return tf.train.Example(features=tf.train.Features(feature={
        k: tf.train.Feature(bytes_list=tf.train.BytesList(value=[v.encode()]))
        for k, v in values.items()})).SerializeToString()
  path = str(tmp_path / 'part-0.tfrecord')
  records = [example(question='1 + 1'), b'\x01not a proto\xff',
             example(id='3'), example(question='2 + 2'),
             example(question='3 + 3'), example(question='4 + 4')]
  with tf.io.TFRecordWriter(path) as writer:
    for record in records:
      writer.write(record)
  data = bytearray(open(path, 'rb').read())
  # Damage the fifth record's data: its CRC no longer matches.
  offset = sum(len(r) + 16 for r in records[:4]) + 12 + 2
  data[offset] ^= 0xFF
  open(path, 'wb').write(bytes(data))
  spec = file_tasks.FileTaskSpec((path,), 'tfrecord', 'question',
                                 seqio.ByteVocabulary())
  bad = []
  rows = list(file_tasks.shard_texts(spec, 0, 1, bad.append))
  assert rows == [('1 + 1', ''), ('2 + 2', '')]
  assert [(b.number, b.problem.split(' (')[0]) for b in bad] == [
      (2, 'not a tf.Example'), (3, "no field 'question'"),
      (5, 'the file is damaged; reading stopped here')]
  assert bad[0].describe('tfrecord') == f'{path} record 2: not a tf.Example'


def test_killed_run_over_bad_records_resumes_to_identical_files(tmp_path):
  """Bad lines skipped (no limit), the run killed after its first chunks,
  then resumed: the same files as an uninterrupted run."""
  import signal  # pylint: disable=g-import-not-at-top
  import subprocess  # pylint: disable=g-import-not-at-top
  import time  # pylint: disable=g-import-not-at-top
  import seqio  # pylint: disable=g-import-not-at-top
  from apache_beam.options.pipeline_options import PipelineOptions  # pylint: disable=g-import-not-at-top
  from pipeline import file_tasks  # pylint: disable=g-import-not-at-top
  from pipeline.run import run_inference  # pylint: disable=g-import-not-at-top
  # 64 chunks of one example: enough that the kill, which comes a few
  # milliseconds after the first chunk file appears, lands mid-run (with
  # 8, chunks waiting for the writer were all written in that time).
  pattern, _ = _write_with_bad(tmp_path, 'jsonl', [l for l, _ in BAD_JSONL],
                               copies=8)
  spec = file_tasks.FileTaskSpec((pattern,), 'jsonl', 'question',
                                 seqio.ByteVocabulary())

  def config(output):
    return helpers.infer_config(
        checkpoint_path=DEMO_CHECKPOINT, output_dir=str(output),
        task_feature_lengths={'inputs': 16, 'targets': 8}, batch_size=1,
        checkpoint_period=1, mixture_or_task_name=spec.task_name,
        split=file_tasks.SPLIT, file_task=spec, max_bad_records=-1)
  options = PipelineOptions(['--runner=FnApiRunner'])
  reference = run_inference(config(tmp_path / 'reference'), options)
  assert reference.manifests[spec.task_name]['bad_records'] == 5
  resumed = config(tmp_path / 'out')
  layout = resumed.layout(spec.task_name)
  child = subprocess.Popen(
      helpers.run_script_command(resumed, ['--runner=FnApiRunner'], tmp_path),
      start_new_session=True, stdout=subprocess.DEVNULL,
      stderr=subprocess.DEVNULL)
  try:
    deadline = time.time() + 300
    while time.time() < deadline and not layout.finished_chunks(2):
      time.sleep(0.005)
  finally:
    os.killpg(child.pid, signal.SIGKILL)
    child.wait()
  finished = layout.finished_chunks(2)
  assert 1 <= len(finished) < 64, finished
  result = run_inference(resumed, options)
  assert result.counters['chunks_skipped'] == len(finished)
  assert (helpers.output_files(tmp_path / 'out') ==
          helpers.output_files(tmp_path / 'reference'))
  assert (tmp_path / 'out' / f'{layout.stem}.errors.jsonl').read_bytes() == (
      tmp_path / 'reference' / f'{layout.stem}.errors.jsonl').read_bytes()
