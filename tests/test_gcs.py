"""gs:// everywhere, against a real GCS-protocol server on loopback: task
data read by SeqIO (TensorFlow's GCS client), every checkpoint format
(gcsfs, TensorStore, Orbax, TensorFlow), outputs, and the run lock.

Each test runs its gs:// work in a child process that gets the server's
environment before anything is imported (see tests/gcs_server.py)."""

import json
import subprocess
import sys

import numpy as np

from tests import checkpoint_writers as writers
from tests import gcs_server
from tests import pipeline_helpers as helpers

PRELUDE = r'''
import json, os, sys
sys.path.insert(0, {repo!r})
import fsspec
# No listings cache, as model.files's: another process's writes show.
fs = fsspec.filesystem('gcs', use_listings_cache=False)
if not fs.exists('t5beam-test'):
  fs.mkdir('t5beam-test')
import logging
requests = []  # the method of each request gcsfs makes, once counting


class _Count(logging.Handler):
  def emit(self, record):
    method = record.getMessage().split(':', 1)[0]
    if method in ('GET', 'POST', 'PUT', 'DELETE', 'HEAD', 'PATCH'):
      requests.append(method)


def count_requests():
  requests.clear()
  logging.getLogger('gcsfs').addHandler(_Count())
  logging.getLogger('gcsfs').setLevel(logging.DEBUG)
'''


def run_child(env, script: str, *args) -> dict:
  env = dict(env, PYTHONPATH=helpers.REPO)
  process = subprocess.run(
      [sys.executable, '-c', PRELUDE.format(repo=helpers.REPO) + script,
       *map(str, args)],
      env=env, capture_output=True, text=True, timeout=600)
  assert process.returncode == 0, process.stderr[-3000:]
  return json.loads(process.stdout.split('REPORT ', 1)[1])


PIPELINE_SCRIPT = r'''
from apache_beam.options.pipeline_options import PipelineOptions
data, checkpoint, output = sys.argv[1:4]
for local, remote in ((os.environ['LOCAL_DATA'], data),
                      (os.environ['LOCAL_CHECKPOINT'], checkpoint)):
  if remote.startswith('gs://') and not fs.exists(remote):
    fs.put(local, remote, recursive=True)
os.environ['T5BEAM_TEST_DATA'] = data  # read by tests.tasks at import
from pipeline.run import run_inference
from tests.pipeline_helpers import infer_config
config = infer_config(
    mixture_or_task_name='t5beam_test_two_files',
    task_feature_lengths={'inputs': 24, 'targets': 8},
    checkpoint_path=checkpoint, output_dir=output,
    mixture_or_task_module='tests.tasks', batch_size=4,
    checkpoint_period=2, num_output_shards=2)
options = PipelineOptions(['--runner=FnApiRunner'])
report = {'first': run_inference(config, options).status}
count_requests()
report['rerun'] = run_inference(config, options).status
report['rerun_requests'] = list(requests)
out = fsspec.core.url_to_fs(output, use_listings_cache=False)[0]
report['files'] = {os.path.basename(p): out.cat(p).decode()
                   for p in out.ls(output)
                   if '.jsonl-' in p or p.endswith('manifest.json')}
report['leftovers'] = [os.path.basename(p) for p in out.find(output)
                       if 'inprogress' in p or '/tmp-' in p or 'lock' in p]
print('REPORT ' + json.dumps(report))
'''


def test_data_checkpoint_and_output_on_gcs_match_a_local_run(tmp_path):
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
  with gcs_server.running_server() as env:
    env.update(LOCAL_DATA=str(data), LOCAL_CHECKPOINT=str(checkpoint))
    local = run_child(env, PIPELINE_SCRIPT, data, checkpoint,
                      tmp_path / 'local')
    remote = run_child(env, PIPELINE_SCRIPT, 'gs://t5beam-test/data',
                       'gs://t5beam-test/models/hf',
                       'gs://t5beam-test/runs/out')
  assert (local['first'], local['rerun']) == ('completed', 'already_complete')
  assert (remote['first'], remote['rerun']) == ('completed',
                                                'already_complete')
  # A rerun over complete outputs: the input's listing (its identity), the
  # manifest read once, the output directory's listing (it was 12 requests
  # when each check asked for existence, then metadata, then the bytes).
  assert len(remote['rerun_requests']) == 3, remote['rerun_requests']
  names = [f't5beam_test_two_files-predict.jsonl-{i:05d}-of-00002'
           for i in range(2)]
  for name in names:
    assert remote['files'][name] == local['files'][name]
  records = [json.loads(line) for name in names
             for line in remote['files'][name].splitlines()]
  assert len(records) == 34  # 21 + 13 lines, read from gs:// by tf.data
  assert records[0]['inputs']['inputs_pretokenized'] == 'first file 0 '
  manifest = json.loads(
      remote['files']['t5beam_test_two_files-predict.manifest.json'])
  assert manifest['input_shards'] == 2  # one per file, listed on gs://
  assert remote['leftovers'] == []


FORMATS_SCRIPT = r'''
import numpy as np
from model import checkpoints
from model.config import T5Config
from model.inference import InferenceModel
local_root = sys.argv[1]
config = T5Config.from_dict(json.loads(sys.argv[2]))
tokens = np.array(json.loads(sys.argv[3]), np.int32)
fs.put(local_root, 'gs://t5beam-test/formats', recursive=True)
report = {}
for name in json.loads(sys.argv[4]):
  results = []
  for root in (local_root, 'gs://t5beam-test/formats'):
    path = root + '/' + name
    model = InferenceModel.load(path, config=config, dtype='float32')
    predicted, scores = model.predict_batch(
        {'encoder_input_tokens': tokens}, max_length=10, return_scores=True)
    results.append((np.asarray(predicted), np.asarray(scores),
                    checkpoints.detect_format(path),
                    checkpoints.checkpoint_step(path)))
  (local_tokens, local_scores, local_format, local_step), remote = results
  report[name] = {
      'format': remote[2], 'step': remote[3],
      'same_as_local': bool(np.array_equal(local_tokens, remote[0]) and
                            np.array_equal(local_scores, remote[1]) and
                            local_format == remote[2] and
                            local_step == remote[3]),
      'tokens': remote[0].tolist()}
report['latest'] = checkpoints.latest_checkpoint(
    'gs://t5beam-test/formats/train')
print('REPORT ' + json.dumps(report))
'''


def test_every_checkpoint_format_reads_from_gcs(tmp_path):
  from model import checkpoints  # pylint: disable=g-import-not-at-top
  from model.inference import InferenceModel  # pylint: disable=g-import-not-at-top
  from tests import reference  # pylint: disable=g-import-not-at-top
  from tests.test_checkpoints import CONFIG  # pylint: disable=g-import-not-at-top
  root = tmp_path / 'formats'
  hf = reference.make_reference(CONFIG, seed=4, eos_boost=0.3)
  hf.save_pretrained(root / 'hf-sharded', max_shard_size='100KB')
  config, params = checkpoints.load_checkpoint(str(root / 'hf-sharded'))
  checkpoints.save_orbax(str(root / 'orbax'), config, params)
  writers.write_t5x_orbax_checkpoint(str(root / 'train'), params, step=2000)
  writers.write_t5x_checkpoint(str(root / 'train' / 'checkpoint_1000'), params)
  writers.write_tensorflow_checkpoint(
      str(root / 'tf' / 'model.ckpt'),
      writers.mesh_tensorflow_variables(config, params))
  tokens = reference.random_inputs(np.random.default_rng(1), 8, 20,
                                   CONFIG.vocab_size)
  expected = InferenceModel(config, params).predict_batch(
      {'encoder_input_tokens': tokens}, max_length=10)
  names = ['hf-sharded', 'orbax', 'train/checkpoint_1000',
           'train/checkpoint_2000', 'tf']
  with gcs_server.running_server() as env:
    report = run_child(env, FORMATS_SCRIPT, root,
                       json.dumps(config.to_dict()),
                       json.dumps(tokens.tolist()), json.dumps(names))
  formats = {name: (report[name]['format'], report[name]['step'])
             for name in names}
  assert formats == {'hf-sharded': ('huggingface', None),
                     'orbax': ('orbax', None),
                     'train/checkpoint_1000': ('t5x', 1000),
                     'train/checkpoint_2000': ('orbax', 2000),
                     'tf': ('tensorflow', 1110000)}
  for name in names:
    assert report[name]['same_as_local'], name
    np.testing.assert_array_equal(report[name]['tokens'], expected)
  assert report['latest'] == 'gs://t5beam-test/formats/train/checkpoint_2000'


LOCK_SCRIPT = r'''
from pipeline import lock
from tests import pipeline_helpers as helpers
output = 'gs://t5beam-test/locked/out'
report = {}
for generation in (1, 2):  # a free directory, then a dead holder's
  report[generation] = {
      'results': helpers.race_for_lock(output, 4, str(generation)),
      'locks': sorted(os.path.basename(p) for p in fs.ls(output))}
winner = lock.current_holder(output)
lock.release(output, 'someone-else', winner.generation)  # not theirs: kept
report['kept'] = lock.current_holder(output) is not None
lock.release(output, winner.owner, winner.generation)
report['released'] = lock.current_holder(output) is None
print('REPORT ' + json.dumps(report))
'''


def test_the_run_lock_on_gcs_admits_exactly_one_run():
  with gcs_server.running_server() as env:
    report = run_child(env, LOCK_SCRIPT)
  for generation in (1, 2):
    assert report[str(generation)]['results'] == (
        [str(generation)] + ['refused'] * 3)
    assert report[str(generation)]['locks'] == [
        f't5beam-run.lock-{generation:08d}']
  assert report['kept'] and report['released']


WRITES_SCRIPT = r'''
from model import files
count_requests()
base = 'gs://t5beam-test/writes'
report = {}
requests.clear()
files.write_atomically(base + '/chunk-0', b'{"a": 1}\n' * 100)
report['chunk_requests'] = list(requests)
big = os.urandom(1 << 20) * 12  # past gcsfs's upload block: resumable
with files.atomic_writer(base + '/big') as f:
  for i in range(0, len(big), 1 << 20):
    f.write(big[i:i + (1 << 20)])
report['big_whole'] = fs.cat(base + '/big') == big
for name, size in (('big', len(big)), ('small', 1000)):
  try:  # fails part way: an older object stays, a new name never appears
    with files.atomic_writer(base + '/' + name) as f:
      f.write(b'y' * size)
      raise ValueError('failed part way')
  except ValueError:
    pass
import gc; gc.collect()  # a dropped file must not upload when collected
report['big_kept'] = fs.cat(base + '/big') == big
report['names'] = sorted(os.path.basename(p) for p in fs.ls(base))
report['chunk'] = fs.cat(base + '/chunk-0').decode()
from pipeline import merge
paths = [f'{base}/read/chunk-{i:02d}' for i in range(20)]
for i, path in enumerate(paths):
  files.write_atomically(path, f'{{"chunk": {i}}}\n'.encode() * (i + 1))
requests.clear()
report['read'] = [[line.decode() for line in lines]
                  for lines in merge._chunk_lines(paths)]
report['read_requests'] = list(requests)
from pipeline import layout
task_layout = layout.TaskLayout(base + '/out', 'task', 'predict', 1, 4)
for chunk in (98, 100, 103, 199, 200):
  files.write_atomically(task_layout.chunk_path(0, 1, chunk), b'{}\n')
files.write_atomically(task_layout.chunk_path(1, 2, 101), b'{}\n')  # others
requests.clear()
report['written'] = task_layout.written_chunks(0, 1, list(range(90, 122)))
report['written_requests'] = len(requests)
# Another process writes and removes while this one lists: every listing
# and check is fresh (none answered from an earlier one).
seen = [files.list_names(base + '/shared')]
other = ('import sys; sys.path.insert(0, {!r}); from model import files; '
         'files.write_atomically({!r}, b"2"); files.remove({!r})').format(
             sys.path[0], base + '/shared/b', base + '/shared/a')
files.write_atomically(base + '/shared/a', b'1')
seen.append(files.list_names(base + '/shared'))
present = files.exists(base + '/shared/a')
import subprocess
subprocess.run([sys.executable, '-c', other], check=True)
seen.append(files.list_names(base + '/shared'))
report['seen'] = seen
report['exists_after'] = [present, files.exists(base + '/shared/a'),
                          files.exists(base + '/shared/b')]
print('REPORT ' + json.dumps(report))
'''


def test_gcs_writes_go_straight_to_their_object_and_reads_are_one_request():
  with gcs_server.running_server() as env:
    report = run_child(env, WRITES_SCRIPT)
  # A chunk file is one upload request (not an upload, a copy and a delete).
  assert report['chunk_requests'] == ['POST'], report['chunk_requests']
  assert report['chunk'] == '{"a": 1}\n' * 100
  assert report['big_whole'] and report['big_kept']
  # No temporary objects, and the failed writes left nothing behind.
  assert report['names'] == ['big', 'chunk-0'], report['names']
  # The merge reads chunk files in order, each in one request (fetched
  # ahead, several at once).
  assert report['read'] == [[f'{{"chunk": {i}}}\n'] * (i + 1)
                            for i in range(20)]
  assert report['read_requests'] == ['GET'] * 20, report['read_requests']
  # A worker's check of an element's chunks (90 to 121 of one shard): two
  # prefix listings (chunks 0xx and 1xx), each answered empty or not.
  assert report['written'] == [n in (98, 100, 103) for n in range(90, 122)]
  assert report['written_requests'] <= 4, report['written_requests']
  assert report['seen'] == [[], ['a'], ['b']]
  assert report['exists_after'] == [True, False, True]
