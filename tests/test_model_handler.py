"""T5ModelHandler: t5beam's model in a user's own Beam pipeline, through
Beam's RunInference, giving what `python -m launch.infer` writes."""

import json
import os

import apache_beam as beam
from apache_beam.ml.inference.base import RunInference
from apache_beam.options.pipeline_options import PipelineOptions
import numpy as np
import pytest

from tests import pipeline_helpers as helpers

IN_MEMORY = ['--runner=FnApiRunner']
LENGTHS = {'inputs': 24, 'targets': 8}
SENTENCEPIECE = 't5beam_test_sentencepiece'  # 11 examples, text
TOKEN_IDS = 't5beam_test_token_ids'  # 12 examples, token ids only


@pytest.fixture(scope='module')
def env(tmp_path_factory):
  return helpers.small_environment(tmp_path_factory)


_LAUNCHED = {}
# Beam search, all decodes with their scores: T5X's gin, and the handler's
# arguments for the same.
BEAM_GIN = ('infer.decode_fn = @decoding.beam_search\n'
            'infer.num_decodes = 2\ninfer.return_all_decodes = True\n')


def beam_search_options():
  from model.decoding import DecodingConfig  # pylint: disable=g-import-not-at-top
  return dict(decoding=DecodingConfig('beam_search', alpha=0.6),
              num_decodes=2, return_all_decodes=True)


def launched_records(env, task: str, mode: str):
  """The records `python -m launch.infer` writes for the task (cached);
  predict_with_aux runs beam search."""
  if (task, mode) not in _LAUNCHED:
    directory = env['tmp'].mktemp(f'launch-{mode}')
    gin_file = os.path.join(directory, 'my_infer.gin')
    with open(gin_file, 'w') as f:
      f.write(f"""include 'runs/infer.gin'
CHECKPOINT_PATH = '{env['checkpoint']}'
MIXTURE_OR_TASK_NAME = '{task}'
MIXTURE_OR_TASK_MODULE = 'tests.tasks'
TASK_FEATURE_LENGTHS = {LENGTHS}
RestoreCheckpointConfig.dtype = 'float32'
DatasetConfig.batch_size = 4
infer.mode = '{mode}'
infer.output_ids = {mode == 'predict'}
""" + (BEAM_GIN if mode == 'predict_with_aux' else ''))
    output = directory / 'out'
    status, stderr = helpers.launch([f'--gin_file={gin_file}',
                                     f'--gin.INFER_OUTPUT_DIR="{output}"'])
    assert status == 0, stderr
    _LAUNCHED[task, mode] = helpers.read_records(
        output / f'{task}-{mode}.jsonl-00000-of-00001')
  return _LAUNCHED[task, mode]


def token_id_examples():
  """(inputs, targets) token ids of the token-id task, EOS included, as the
  pipeline feeds them to the model."""
  import seqio  # pylint: disable=g-import-not-at-top
  ds = seqio.get_mixture_or_task(TOKEN_IDS).get_dataset(
      LENGTHS, split='test', shuffle=False)
  return [(ex['inputs'].tolist(), ex['targets'].tolist())
          for ex in ds.as_numpy_iterator()]


def make_handler(env, task: str, mode: str, **options):
  from pipeline.model_handler import T5ModelHandler  # pylint: disable=g-import-not-at-top
  from tests import tasks  # pylint: disable=g-import-not-at-top
  vocabulary = None
  if task == SENTENCEPIECE:
    vocabulary = tasks.seqio.get_mixture_or_task(task).output_features[
        'targets'].vocabulary
  return T5ModelHandler(env['checkpoint'], vocabulary=vocabulary,
                        task_feature_lengths=LENGTHS, batch_size=4,
                        dtype='float32', mode=mode,
                        output_ids=mode == 'predict', **options)


def run_pipeline(build, directory, options=IN_MEMORY):
  """Runs `build(pipeline) -> {name: PCollection of JSON-able values}` and
  returns ({name: sorted values}, the run's t5beam counters)."""
  from apache_beam.metrics.metric import MetricsFilter  # pylint: disable=g-import-not-at-top
  pipeline = beam.Pipeline(options=PipelineOptions(options))
  outputs = build(pipeline)
  for name, pcoll in outputs.items():
    _ = (pcoll
         | f'Json{name}' >> beam.Map(json.dumps, sort_keys=True)
         | f'Write{name}' >> beam.io.WriteToText(
             os.path.join(str(directory), name), shard_name_template=''))
  result = pipeline.run()
  result.wait_until_finish()
  counters = {}  # summed over steps
  for counter in result.metrics().query(
      MetricsFilter().with_namespace('t5beam'))['counters']:
    name = counter.key.metric.name
    counters[name] = counters.get(name, 0) + counter.committed
  values = {}
  for name in outputs:
    with open(os.path.join(str(directory), name), encoding='utf-8') as f:
      values[name] = sorted((json.loads(line) for line in f),
                            key=lambda v: json.dumps(v, sort_keys=True))
  return values, counters


def _result(result):
  """A PredictionResult as JSON-able [example, inference, model_id]."""
  return [result.example, result.inference, result.model_id]


@pytest.mark.parametrize('task,mode', [(SENTENCEPIECE, 'predict'),
                                       (SENTENCEPIECE, 'score'),
                                       (SENTENCEPIECE, 'predict_with_aux'),
                                       (TOKEN_IDS, 'predict'),
                                       (TOKEN_IDS, 'score')])
def test_users_pipeline_gets_what_launch_infer_writes(env, tmp_path, task,
                                                      mode):
  from apache_beam.ml.inference.base import PredictionResult  # pylint: disable=g-import-not-at-top
  records = launched_records(env, task, mode)
  if task == SENTENCEPIECE:
    elements = [{'inputs': r['inputs']['inputs_pretokenized'],
                 'targets': r['inputs']['targets_pretokenized']}
                for r in records]
  else:
    elements = [{'inputs': inputs, 'targets': targets}
                for inputs, targets in token_id_examples()]
  assert len(elements) == len(records) > 10
  # Unkeyed: a str (or token ids) alone in predict mode, the mapping in
  # score mode; keyed: (index, mapping).
  unkeyed = [e if mode == 'score' else e['inputs'] for e in elements]
  handler = make_handler(env, task, mode, **(
      beam_search_options() if mode == 'predict_with_aux' else {}))

  def build(pipeline):
    plain = (pipeline
             | 'Elements' >> beam.Create(unkeyed)
             | 'Infer' >> RunInference(handler)
             | 'Plain' >> beam.Map(_result))
    keyed = (pipeline
             | 'Keyed' >> beam.Create(list(enumerate(elements)))
             | 'InferKeyed' >> RunInference(handler.keyed())
             | 'KeyedResults' >> beam.Map(
                 lambda kv: [kv[0], kv[1].inference]
                 if isinstance(kv[1], PredictionResult) else None))
    return {'plain': plain, 'keyed': keyed}

  values, counters = run_pipeline(build, tmp_path)
  expected = [{k: v for k, v in r.items() if k != 'inputs'} for r in records]
  got = {json.dumps(example): inference
         for example, inference, _ in values['plain']}
  assert got == {json.dumps(e): x for e, x in zip(unkeyed, expected)}
  assert {tuple(v[2] for v in values['plain'])} == {(env['checkpoint'],) *
                                                     len(unkeyed)}
  assert sorted(values['keyed']) == [[i, x] for i, x in enumerate(expected)]
  assert counters['num_inferences'] == 2 * len(records)
  assert counters['model_loads'] == 2  # one per RunInference
  if mode == 'predict':
    assert counters['decoded_tokens'] == sum(
        len(x['prediction_tokens']) for x in expected) * 2
    assert all(isinstance(x['prediction'], str if task == SENTENCEPIECE
                          else list) for x in expected)


def test_each_bad_element_is_refused_with_its_reason(env):
  handler = make_handler(env, SENTENCEPIECE, 'score')
  handler.prepare({'inputs': 'a question', 'targets': [5, 1]})  # runs
  for element, reason in (
      ('only inputs', "score mode needs the element's 'targets'"),
      ({'inputs': '', 'targets': 'x'}, 'inputs is empty'),
      ({'inputs': [], 'targets': 'x'}, 'inputs is empty'),
      ({'inputs': [5, 0, 1], 'targets': 'x'}, 'token id 0, which is padding'),
      ({'inputs': [5, -2], 'targets': 'x'}, 'token id -2 outside'),
      ({'inputs': list(range(2, 30)), 'targets': 'x'},
       '28 token ids, more than its feature length 24'),
      ({'inputs': [[5, 6], [7]], 'targets': 'x'}, 'flat sequence of int'),
      ({'inputs': [1.5, 2.0], 'targets': 'x'}, 'flat sequence of int'),
      ({'inputs': b'bytes', 'targets': 'x'}, 'inputs of type bytes'),
      (('key', 'text'), r'\(key, element\) pairs need handler.keyed'),
      (None, 'element of type NoneType')):
    with pytest.raises((ValueError, TypeError), match=reason):
      handler.prepare(element)
  with pytest.raises(TypeError, match='takes \\(key, element\\) pairs'):
    handler.prepare_keyed('not a pair')


def test_decoding_settings_given_twice_must_agree(env):
  from model.decoding import DecodingConfig  # pylint: disable=g-import-not-at-top
  sampling = DecodingConfig('temperature_sample', topk=0, num_decodes=3)
  handler = make_handler(env, SENTENCEPIECE, 'predict', decoding=sampling,
                         return_all_decodes=True)
  assert handler.spec.decoding.num_decodes == 3
  assert handler.spec.decoding.return_all_decodes
  with pytest.raises(ValueError, match='num_decodes=2 contradicts '
                     'decoding.num_decodes=3'):
    make_handler(env, SENTENCEPIECE, 'predict', decoding=sampling,
                 num_decodes=2)
  with pytest.raises(ValueError, match='greedy decoding gives one decode'):
    make_handler(env, SENTENCEPIECE, 'predict', num_decodes=2)


def test_bad_elements_go_to_the_failed_output_and_the_rest_run(env,
                                                               tmp_path):
  records = launched_records(env, SENTENCEPIECE, 'predict')
  texts = [r['inputs']['inputs_pretokenized'] for r in records]
  good = texts + texts[:6]  # 17
  bad = [42, {'text': 'no inputs field'}, {'inputs': [5, 3000, 1]}]
  elements = good[:5] + bad[:1] + good[5:11] + bad[1:] + good[11:]
  assert len(elements) == 20
  handler = make_handler(env, SENTENCEPIECE, 'predict')

  def build(pipeline):
    main, other = (pipeline
                   | beam.Create(elements)
                   | RunInference(handler).with_exception_handling())
    failed = other.failed_preprocessing[0] | 'Failed' >> beam.Map(
        lambda bad_element: [bad_element[0], str(bad_element[1])])
    return {'main': main | 'Main' >> beam.Map(_result), 'failed': failed}

  values, _ = run_pipeline(build, tmp_path)
  expected = {r['inputs']['inputs_pretokenized']:
              {k: v for k, v in r.items() if k != 'inputs'} for r in records}
  assert sorted(example for example, _, _ in values['main']) == sorted(good)
  for example, inference, _ in values['main']:
    assert inference == expected[example]
  reasons = {json.dumps(element): reason
             for element, reason in values['failed']}
  assert set(reasons) == {json.dumps(b) for b in bad}
  assert 'element of type int' in reasons['42']
  assert "has no 'inputs'" in reasons[json.dumps(bad[1])]
  assert 'token id 3000 outside' in reasons[json.dumps(bad[2])]


def test_large_model_is_loaded_once_for_two_worker_processes(env, tmp_path):
  records = launched_records(env, SENTENCEPIECE, 'predict')
  texts = [r['inputs']['inputs_pretokenized'] for r in records]
  expected = {t: {k: v for k, v in r.items() if k != 'inputs'}
              for t, r in zip(texts, records)}
  handler = make_handler(env, SENTENCEPIECE, 'predict', large_model=True)

  def build(pipeline):
    results = (pipeline
               | beam.Create(texts * 4)
               | beam.Reshuffle()
               | RunInference(handler))
    return {'results': results | beam.Map(
        lambda r: [r.example, r.inference, os.getpid()])}

  values, counters = run_pipeline(
      build, tmp_path, ['--runner=FnApiRunner',
                        '--direct_running_mode=multi_processing',
                        '--direct_num_workers=2'])
  assert len(values['results']) == 4 * len(texts)
  for example, inference, _ in values['results']:
    assert inference == expected[example]
  assert len({pid for _, _, pid in values['results']}) == 2
  assert counters['model_loads'] == 1


def test_sampling_keys_follow_the_key_or_the_content_not_the_batch(env):
  from model.decoding import DecodingConfig  # pylint: disable=g-import-not-at-top
  from pipeline import inference  # pylint: disable=g-import-not-at-top
  handler = make_handler(env, SENTENCEPIECE, 'predict_with_aux',
                         decoding=DecodingConfig('temperature_sample', topk=0),
                         num_decodes=3, return_all_decodes=True, seed=7)
  loaded = handler.load_model()
  texts = ['first file 1 x', 'only file 2 xx', 'first file 3 xxx']
  alone = [handler.run_inference([handler.prepare(t)], loaded)[0]
           for t in texts]
  together = handler.run_inference(
      [handler.prepare(t) for t in texts + texts[:1]], loaded)
  assert [r.inference for r in together[:3]] == [r.inference for r in alone]
  assert together[3].inference == together[0].inference  # same content
  keyed = [handler.prepare_keyed((key, texts[0]))[1] for key in ('a', 'b')]
  first, second = handler.run_inference(keyed, loaded)
  assert first.inference != second.inference  # other keys, other samples
  assert np.array_equal(inference.example_key(7, ('key', 'a')),
                        inference.example_key(7, ('key', 'a')))
  # A key with no stable form cannot seed samples in every process alike.
  with pytest.raises(TypeError, match='cannot identify an example'):
    handler.prepare_keyed((object(), texts[0]))


def readme_examples():
  """The Python blocks of the README's "Use the model in your own Beam
  pipeline" section, in order."""
  with open(os.path.join(helpers.REPO, 'README.md'), encoding='utf-8') as f:
    text = f.read()
  section = text.split('## Use the model in your own Beam pipeline', 1)[1]
  section = section.split('\n## ', 1)[0]
  return [block.split('```', 1)[0]
          for block in section.split('```python\n')[1:]]


def test_the_readme_examples_run_as_written(env, tmp_path):
  records = launched_records(env, SENTENCEPIECE, 'predict')
  expected = {r['inputs']['inputs_pretokenized']: r for r in records}
  spm = os.path.join(os.environ['T5BEAM_TEST_DATA'], 'spm.model')
  namespace = {}
  for block in readme_examples():
    code = (block.replace("'/tmp/", f"'{tmp_path}/")
            .replace('/path/to/sentencepiece.model', spm)
            .replace('/path/to/checkpoint', env['checkpoint'])
            .replace('batch_size=4, dtype=', 'output_ids=True, batch_size=4, '
                     'dtype='))
    exec(compile(code, 'README.md', 'exec'), namespace)  # pylint: disable=exec-used
  answers = helpers.read_records(tmp_path / 'answers.jsonl')
  assert sorted(answers, key=lambda a: a['inputs']) == [
      {**{k: v for k, v in expected[text].items() if k != 'inputs'},
       'inputs': text} for text in ('only file 1 x', 'only file 2 xx')]
  keyed = helpers.read_records(tmp_path / 'keyed.jsonl')
  assert keyed == [['q1', {k: v for k, v in expected['only file 3 xxx'].items()
                           if k != 'inputs'}]]
  errors = (tmp_path / 'errors.txt').read_text().splitlines()
  assert len(errors) == 1 and errors[0].startswith("('q2', {'text'")
  assert "has no 'inputs'" in errors[0]


def test_model_time_counts_overlapping_calls_once(env):
  """Two threads share a worker's model (the launcher's local default): the
  model time their calls are charged adds up to the time during which at
  least one call ran, never to more than the wall time, while the calls'
  own durations add up to more."""
  import threading  # pylint: disable=g-import-not-at-top
  import time  # pylint: disable=g-import-not-at-top
  from pipeline import inference  # pylint: disable=g-import-not-at-top
  handler = make_handler(env, SENTENCEPIECE, 'predict')
  loaded = handler.load_model()
  features = inference.stack_batch(
      [handler.prepare(f'first file {i} x').features for i in range(4)], 4)
  charged, durations = [], []

  def calls():
    for _ in range(25):
      start = time.perf_counter()
      _, seconds = loaded.run_timed(features)
      durations.append(time.perf_counter() - start)
      charged.append(seconds)

  threads = [threading.Thread(target=calls) for _ in range(2)]
  start = time.perf_counter()
  for thread in threads:
    thread.start()
  for thread in threads:
    thread.join()
  wall = time.perf_counter() - start
  assert len(charged) == 50 and min(charged) > 0
  assert sum(durations) > wall  # the calls did overlap
  assert sum(charged) <= wall
  assert sum(charged) <= sum(durations)


def test_the_model_clock_shares_time_between_running_calls():
  """Call a runs alone, then beside call b, then b alone: each is charged
  its time alone and half the time they ran together, so the charges add
  up to the time some call ran, less than the sum of their durations."""
  import time  # pylint: disable=g-import-not-at-top
  from pipeline import inference  # pylint: disable=g-import-not-at-top
  clock = inference.ModelClock()
  a = clock.start()
  a_started = time.perf_counter()
  time.sleep(0.2)
  b = clock.start()
  b_started = time.perf_counter()
  time.sleep(0.2)
  charged_a = clock.stop(a)
  a_stopped = time.perf_counter()
  time.sleep(0.2)
  charged_b = clock.stop(b)
  b_stopped = time.perf_counter()
  together = a_stopped - b_started
  assert charged_a == pytest.approx(b_started - a_started + together / 2,
                                    abs=0.01)
  assert charged_b == pytest.approx(b_stopped - a_stopped + together / 2,
                                    abs=0.01)
  assert charged_a + charged_b == pytest.approx(b_stopped - a_started,
                                                abs=0.01)
  assert together > 0.15
