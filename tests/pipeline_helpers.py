"""Shared set-up for pipeline tests: data, a small checkpoint, configs, runs."""

import json
import os
import re
import sys

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def prepare_environment(data_dir: str):
  """Writes the test task data and makes it (and the repo) visible to Beam's
  worker processes, which inherit this environment."""
  os.environ['T5BEAM_TEST_DATA'] = data_dir
  paths = os.environ.get('PYTHONPATH', '').split(os.pathsep)
  if REPO not in paths:
    os.environ['PYTHONPATH'] = os.pathsep.join([REPO] + [p for p in paths if p])
  write_data(data_dir)
  from tests import tasks  # pylint: disable=g-import-not-at-top
  assert tasks.DATA_DIR == data_dir, (
      'tests.tasks was imported before prepare_environment')


def write_data(directory: str):
  """Writes the files the tasks read: deterministic lines of varied length."""
  def lines(prefix, count):
    return ''.join(f'{prefix} {i} ' + 'x' * (i % 7) + f'\t{i % 10}\n'
                   for i in range(count))
  with open(os.path.join(directory, 'two-00000.tsv'), 'w') as f:
    f.write(lines('first file', 21))
  with open(os.path.join(directory, 'two-00001.tsv'), 'w') as f:
    f.write(lines('second file', 13))
  with open(os.path.join(directory, 'one.tsv'), 'w') as f:
    f.write(lines('only file', 11))
  with open(os.path.join(directory, 'empty.tsv'), 'w') as f:
    f.write('')
  # A SentencePiece model trained by the sentencepiece library itself.
  import sentencepiece  # pylint: disable=g-import-not-at-top
  corpus = os.path.join(directory, 'corpus.txt')
  with open(corpus, 'w') as f:
    f.write(lines('first file', 300) + lines('only file', 300))
  sentencepiece.SentencePieceTrainer.train(
      input=corpus, model_prefix=os.path.join(directory, 'spm'),
      vocab_size=48, model_type='unigram', pad_id=0, eos_id=1, unk_id=2,
      bos_id=-1, minloglevel=2)
  # The same model with 100 sentinel pieces of its own, as the released
  # .100extra files hold them (seqio's extra_ids add them the same way).
  from sentencepiece import sentencepiece_model_pb2  # pylint: disable=g-import-not-at-top
  with open(os.path.join(directory, 'spm.model'), 'rb') as f:
    proto = sentencepiece_model_pb2.ModelProto.FromString(f.read())
  for i in reversed(range(100)):
    proto.pieces.add(piece=f'\u2581<extra_id_{i}>', score=0.0,
                     type=sentencepiece_model_pb2.ModelProto.SentencePiece
                     .USER_DEFINED)
  with open(os.path.join(directory, 'spm.100extra.model'), 'wb') as f:
    f.write(proto.SerializeToString())



def small_environment(tmp_path_factory):
  """Test data, its tasks, and a small random Orbax checkpoint (vocab 260,
  for the byte-vocabulary tasks): {'checkpoint': path, 'tmp': factory}."""
  if 'T5BEAM_TEST_DATA' not in os.environ:  # once per test session
    prepare_environment(str(tmp_path_factory.mktemp('data')))
  from model import checkpoints, network  # pylint: disable=g-import-not-at-top
  from model.config import T5Config  # pylint: disable=g-import-not-at-top
  config = T5Config(vocab_size=260, d_model=32, num_heads=2, d_kv=8, d_ff=64,
                    num_encoder_layers=2, num_decoder_layers=2)
  checkpoint = str(tmp_path_factory.mktemp('ckpt') / 'model')
  checkpoints.save_orbax(checkpoint, config, network.init_params(config, 5))
  return {'checkpoint': checkpoint, 'tmp': tmp_path_factory}


def infer_config(**settings):
  """An InferConfig from flat settings: the model's (ModelSpec fields) and
  the run's. Parameters are restored in float32 unless said otherwise."""
  import dataclasses  # pylint: disable=g-import-not-at-top
  from pipeline.config import InferConfig  # pylint: disable=g-import-not-at-top
  from pipeline.inference import ModelSpec  # pylint: disable=g-import-not-at-top
  spec_fields = {f.name for f in dataclasses.fields(ModelSpec)}
  spec = {'restore_dtype': 'float32'}
  spec.update({k: settings.pop(k) for k in list(settings)
               if k in spec_fields})
  return InferConfig(model=ModelSpec(**spec), **settings)


def read_records(path: str):
  with open(path, encoding='utf-8') as f:
    return [json.loads(line) for line in f]


def os_thread_name() -> str:
  """The calling thread's name in the operating system (what `top -H`
  shows; Linux)."""
  import threading  # pylint: disable=g-import-not-at-top
  with open(f'/proc/self/task/{threading.get_native_id()}/comm') as f:
    return f.read().strip()


def output_files(directory: str):
  """{name: bytes} of the final jsonl files in `directory`."""
  result = {}
  for name in sorted(os.listdir(directory)):
    if '.jsonl-' in name and not name.endswith('.COMPLETED'):
      with open(os.path.join(directory, name), 'rb') as f:
        result[name] = f.read()
  return result


RUN_SCRIPT = r'''
import pickle, sys
sys.path.insert(0, {repo!r})
from apache_beam.options.pipeline_options import PipelineOptions
from pipeline.run import run_inference
with open(sys.argv[1], 'rb') as f:
  config = pickle.load(f)
run_inference(config, PipelineOptions(sys.argv[2:]))
'''


def run_script_command(config, options, workdir):
  """argv of a child process that runs `config` with pipeline `options`."""
  import pickle  # pylint: disable=g-import-not-at-top
  path = os.path.join(str(workdir), 'config.pickle')
  with open(path, 'wb') as f:
    pickle.dump(config, f)
  return [sys.executable, '-c', RUN_SCRIPT.format(repo=REPO), path] + list(
      options)


def launch(argv):
  """Runs launch.infer.main in this process: (exit status, stderr text)."""
  import contextlib  # pylint: disable=g-import-not-at-top
  import io  # pylint: disable=g-import-not-at-top
  from launch import infer  # pylint: disable=g-import-not-at-top
  stderr = io.StringIO()
  with contextlib.redirect_stderr(stderr):
    status = infer.main(argv)
  return status, stderr.getvalue()


def assert_refused(status, stderr, output_dir, *patterns):
  """One short error line (under 200 characters besides the paths it names,
  each shortened to at most 64) matching every pattern; no output written."""
  assert status != 0
  error_lines = [l for l in stderr.splitlines() if l.startswith('t5beam: error')]
  assert len(error_lines) == 1, stderr
  assert_short_refusal(error_lines[0])
  for pattern in patterns:
    assert re.search(pattern, error_lines[0]), error_lines[0]
  written = os.listdir(output_dir) if os.path.exists(output_dir) else []
  assert not [n for n in written if '.jsonl' in n or 'manifest' in n], written


def assert_short_refusal(line: str):
  """A launcher refusal's standard: under 200 characters besides the paths
  it names, each path at most 64 characters (shortened in its middle)."""
  path = r"[\w.~:-]*/[^\s'\",;()]+"
  message = line[len('t5beam: error: '):]
  assert all(len(p) <= 64 for p in re.findall(path, message)), message
  assert len(re.sub(path, '', message)) < 200, message


def race_for_lock(output_dir: str, contenders: int, tag: str):
  """`contenders` threads take the run lock of `output_dir` at once, then
  the winner's heartbeat is set two minutes back (it died): (sorted results
  as strings, one per contender: the generation taken or 'refused')."""
  import threading  # pylint: disable=g-import-not-at-top
  from model import files  # pylint: disable=g-import-not-at-top
  from pipeline import lock  # pylint: disable=g-import-not-at-top
  results = []
  barrier = threading.Barrier(contenders)

  def contender(i):
    barrier.wait()
    try:
      results.append(str(lock.acquire(output_dir, f'host:{tag}:{i}', 60)))
    except lock.LockHeldError:
      results.append('refused')

  threads = [threading.Thread(target=contender, args=(i,))
             for i in range(contenders)]
  for thread in threads:
    thread.start()
  for thread in threads:
    thread.join()
  holder = lock.current_holder(output_dir)
  path = files.join(output_dir, f'{lock.LOCK_PREFIX}{holder.generation:08d}')
  record = json.loads(files.read_text(path))
  record['heartbeat'] -= 120
  files.filesystem(path).pipe_file(path, json.dumps(record).encode())
  return sorted(results)
