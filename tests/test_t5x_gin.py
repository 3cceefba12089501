"""T5X's own Gin files, run as they are: a tree laid out as T5X's
(t5x/configs/runs/infer.gin, t5x/examples/t5/<family>/base.gin included by
small.gin) on --gin_search_paths, through the real launcher, with the same
records as the same run written in t5beam's dialect.

The tree is written here in T5X's form (dynamic registration, `from t5x
import ...`, `import __main__ as infer_script`, blocks, macros, small.gin
files without imports); tiny sizes are set in T5X's syntax by the user file.
"""

import json
import os
import subprocess
import sys
import textwrap

import pytest

from tests import pipeline_helpers as helpers

RUN_GIN = """\
# Inference run settings in T5X's form, written for t5beam's tests.
from __gin__ import dynamic_registration

import __main__ as infer_script
from t5x import partitioning
from t5x import utils

# The user's file sets these four (INFER_OUTPUT_DIR usually by flag).
MIXTURE_OR_TASK_NAME = %gin.REQUIRED
TASK_FEATURE_LENGTHS = %gin.REQUIRED
CHECKPOINT_PATH = %gin.REQUIRED
INFER_OUTPUT_DIR = %gin.REQUIRED
MIXTURE_OR_TASK_MODULE = None

infer_script.infer:
  mode = 'predict'
  model = %MODEL  # from the model's Gin file
  output_dir = %INFER_OUTPUT_DIR
  dataset_cfg = @utils.DatasetConfig()
  restore_checkpoint_cfg = @utils.RestoreCheckpointConfig()
  partitioner = @partitioning.PjitPartitioner()
  checkpoint_period = 100
  shard_id = 0
  num_shards = 1

utils.DatasetConfig:
  mixture_or_task_name = %MIXTURE_OR_TASK_NAME
  task_feature_lengths = %TASK_FEATURE_LENGTHS
  module = %MIXTURE_OR_TASK_MODULE
  split = 'test'
  batch_size = 32
  use_cached = False
  shuffle = False
  pack = False
  seed = 0

utils.RestoreCheckpointConfig:
  path = %CHECKPOINT_PATH
  mode = 'specific'
  dtype = 'bfloat16'

partitioning.PjitPartitioner:
  num_partitions = 1
  logical_axis_rules = @partitioning.standard_logical_axis_rules()
"""

# family: (vocabulary lines, base sizes, small sizes)
FAMILIES = {
    't5_1_1': ('VOCABULARY = @seqio.SentencePieceVocabulary()\n'
               'seqio.SentencePieceVocabulary.sentencepiece_model_file = '
               '"gs://t5-data/vocabs/cc_all.32000.100extra/'
               'sentencepiece.model"',
               dict(vocab_size=32128, emb_dim=768, num_heads=12,
                    num_encoder_layers=12, num_decoder_layers=12,
                    mlp_dim=2048, mlp_activations=('gelu', 'linear'),
                    logits_via_embedding=False),
               dict(emb_dim=512, num_heads=6, num_encoder_layers=8,
                    num_decoder_layers=8, mlp_dim=1024)),
    't5_1_0': ('VOCABULARY = @seqio.SentencePieceVocabulary()\n'
               'seqio.SentencePieceVocabulary.sentencepiece_model_file = '
               '"gs://t5-data/vocabs/cc_all.32000.100extra/'
               'sentencepiece.model"',
               dict(vocab_size=32128, emb_dim=768, num_heads=12,
                    num_encoder_layers=12, num_decoder_layers=12,
                    mlp_dim=3072, mlp_activations=('relu',),
                    logits_via_embedding=True),
               dict(emb_dim=512, num_heads=8, num_encoder_layers=6,
                    num_decoder_layers=6, mlp_dim=2048)),
    'mt5': ('VOCABULARY = @seqio.SentencePieceVocabulary()\n'
            'seqio.SentencePieceVocabulary.sentencepiece_model_file = '
            '"gs://t5-data/vocabs/mc4.250000.100extra/sentencepiece.model"',
            dict(vocab_size=250112, emb_dim=768, num_heads=12,
                 num_encoder_layers=12, num_decoder_layers=12, mlp_dim=2048,
                 mlp_activations=('gelu', 'linear'),
                 logits_via_embedding=False),
            dict(emb_dim=512, num_heads=6, num_encoder_layers=8,
                 num_decoder_layers=8, mlp_dim=1024)),
    'byt5': ('VOCABULARY = @seqio.ByteVocabulary()',
             dict(vocab_size=384, emb_dim=1536, num_heads=12,
                  num_encoder_layers=18, num_decoder_layers=6, mlp_dim=3968,
                  mlp_activations=('gelu', 'linear'),
                  logits_via_embedding=False),
             dict(emb_dim=1472, num_heads=6, num_encoder_layers=12,
                  num_decoder_layers=4, mlp_dim=3584)),
}


def _block(name: str, values: dict) -> str:
  lines = [f'{name}:'] + [f'  {k} = {v!r}' for k, v in values.items()]
  return '\n'.join(lines) + '\n'


def base_gin(family: str) -> str:
  vocabulary, sizes, _ = FAMILIES[family]
  return f"""\
# {family} base model in T5X's form, written for t5beam's tests.
from __gin__ import dynamic_registration

import seqio
from t5x import adafactor
from t5x import models
from t5x.examples.t5 import network

# Training settings (ignored at inference).
Z_LOSS = 0.0001
LABEL_SMOOTHING = 0.0
LOSS_NORMALIZING_FACTOR = None
DROPOUT_RATE = %gin.REQUIRED  # the run's file sets it

{vocabulary}

OPTIMIZER = @adafactor.Adafactor()
adafactor.Adafactor:
  decay_rate = 0.8
  step_offset = 0
  logical_factor_rules = @adafactor.standard_logical_factor_rules()

MODEL = @models.EncoderDecoderModel()
models.EncoderDecoderModel:
  module = @network.Transformer()
  input_vocabulary = %VOCABULARY
  output_vocabulary = %VOCABULARY
  optimizer_def = %OPTIMIZER
  z_loss = %Z_LOSS
  label_smoothing = %LABEL_SMOOTHING
  loss_normalizing_factor = %LOSS_NORMALIZING_FACTOR

network.Transformer.config = @network.T5Config()
{_block('network.T5Config', dict(sizes, dtype='bfloat16', head_dim=64))}\
network.T5Config.dropout_rate = %DROPOUT_RATE
"""


def small_gin(family: str) -> str:
  _, _, sizes = FAMILIES[family]
  return f"""\
# {family} small: the base file with smaller sizes (no imports of its own).
include 't5x/examples/t5/{family}/base.gin'

network.Transformer.config = @network.T5Config()
{_block('network.T5Config', sizes)}"""


@pytest.fixture(scope='module')
def env(tmp_path_factory):
  return helpers.small_environment(tmp_path_factory)


@pytest.fixture(scope='module')
def tree(tmp_path_factory):
  """A T5X-layout Gin tree: the --gin_search_paths root."""
  root = tmp_path_factory.mktemp('t5x_tree')
  files = {'t5x/configs/runs/infer.gin': RUN_GIN}
  for family in FAMILIES:
    files[f't5x/examples/t5/{family}/base.gin'] = base_gin(family)
    files[f't5x/examples/t5/{family}/small.gin'] = small_gin(family)
  for path, text in files.items():
    (root / path).parent.mkdir(parents=True, exist_ok=True)
    (root / path).write_text(text)
  return str(root)


TINY = dict(emb_dim=32, num_heads=2, head_dim=8, mlp_dim=64,
            num_encoder_layers=2, num_decoder_layers=2)


@pytest.fixture(scope='module')
def checkpoints(env, tmp_path_factory):
  """family -> (checkpoint, task, vocab_size): tiny checkpoints of each
  family's architecture (ByT5 is the shared test checkpoint)."""
  from model import checkpoints as checkpoints_lib  # pylint: disable=g-import-not-at-top
  from model import network  # pylint: disable=g-import-not-at-top
  from model.config import T5Config  # pylint: disable=g-import-not-at-top
  made = {'byt5': (env['checkpoint'], 't5beam_test_one_file', 260)}
  tiny = dict(vocab_size=160, d_model=32, num_heads=2, d_kv=8, d_ff=64,
              num_encoder_layers=2, num_decoder_layers=2)
  for family, changes in (('gated', {}), ('t5_1_0', dict(
      feed_forward='relu', logits_via_embedding=True))):
    config = T5Config(**tiny, **changes)
    path = str(tmp_path_factory.mktemp('ckpt') / family)
    checkpoints_lib.save_orbax(path, config, network.init_params(config, 3))
    made[family] = (path, 't5beam_test_sentencepiece', 160)
  made['t5_1_1'] = made['mt5'] = made.pop('gated')
  return made


def t5x_user_gin(tmp_path, family, checkpoint, task, vocab_size,
                 extra='', sizes=None) -> str:
  """The user's file in T5X's form: includes, the macros, the test's
  vocabulary file, and tiny sizes in T5X syntax."""
  spm = os.path.join(os.environ['T5BEAM_TEST_DATA'], 'spm.model')
  sizes = dict(TINY, vocab_size=vocab_size, dtype='float32', **(sizes or {}))
  text = f"""\
from __gin__ import dynamic_registration

import __main__ as infer_script
import seqio
from t5x import models
from t5x import decoding
from t5x import utils
from t5x.examples.t5 import network

include 't5x/configs/runs/infer.gin'
include 't5x/examples/t5/{family}/small.gin'

DROPOUT_RATE = 0.0
CHECKPOINT_PATH = '{checkpoint}'
MIXTURE_OR_TASK_NAME = '{task}'
MIXTURE_OR_TASK_MODULE = 'tests.tasks'
TASK_FEATURE_LENGTHS = {{'inputs': 24, 'targets': 8}}

seqio.SentencePieceVocabulary.sentencepiece_model_file = '{spm}'
seqio.SentencePieceVocabulary.extra_ids = 100

utils.DatasetConfig.batch_size = 4
utils.RestoreCheckpointConfig.dtype = 'float32'
{_block('network.T5Config', sizes)}
{textwrap.dedent(extra)}"""
  path = tmp_path / 't5x_infer.gin'
  path.write_text(text)
  return str(path)


def our_gin(tmp_path, checkpoint, task, extra='') -> str:
  """The same run in t5beam's dialect (architecture from the checkpoint)."""
  path = tmp_path / 'our_infer.gin'
  path.write_text(f"""\
include 'runs/infer.gin'
CHECKPOINT_PATH = '{checkpoint}'
MIXTURE_OR_TASK_NAME = '{task}'
MIXTURE_OR_TASK_MODULE = 'tests.tasks'
TASK_FEATURE_LENGTHS = {{'inputs': 24, 'targets': 8}}
DatasetConfig.batch_size = 4
RestoreCheckpointConfig.dtype = 'float32'
{textwrap.dedent(extra)}""")
  return str(path)


def run(gin_file, output, *flags, search_path=None):
  """(records, manifest) of a launch that must succeed."""
  argv = [f'--gin_file={gin_file}', f'--gin.INFER_OUTPUT_DIR="{output}"',
          *flags]
  if search_path:
    argv.append(f'--gin_search_paths={search_path}')
  status, stderr = helpers.launch(argv)
  assert status == 0, stderr
  (manifest,) = [n for n in os.listdir(output) if n.endswith('manifest.json')]
  with open(os.path.join(output, manifest)) as f:
    manifest = json.load(f)
  records = []
  for name in sorted(os.listdir(output)):
    if '.jsonl-' in name:
      records += helpers.read_records(os.path.join(output, name))
  return records, manifest


@pytest.mark.parametrize('family', ['t5_1_1', 't5_1_0', 'mt5', 'byt5'])
def test_t5x_model_files_give_our_dialects_records(env, tree, checkpoints,
                                                   tmp_path, family):
  """Each family's T5X files against a checkpoint of that architecture,
  greedy as T5X writes it (temperature_sample, topk 1): the records of our
  dialect's greedy run. The ByT5 file's 4 decoder layers are overridden to
  the checkpoint's 2 in T5X syntax, and reach the model."""
  checkpoint, task, vocab_size = checkpoints[family]
  greedy = 'models.EncoderDecoderModel.decode_fn = @decoding.temperature_sample'
  t5x_records, t5x_manifest = run(
      t5x_user_gin(tmp_path, family, checkpoint, task, vocab_size, greedy),
      tmp_path / 't5x', search_path=tree)
  our_records, our_manifest = run(our_gin(tmp_path, checkpoint, task),
                                  tmp_path / 'ours')
  assert len(t5x_records) == 11
  assert t5x_records == our_records
  config = t5x_manifest['settings']['model_config']
  assert config == our_manifest['settings']['model_config']
  assert (config['num_decoder_layers'], config['feed_forward'],
          config['logits_via_embedding']) == (
              2, 'relu' if family == 't5_1_0' else 'gated-gelu',
              family == 't5_1_0')


def test_num_decoder_layers_in_t5x_syntax_reaches_the_model(
    env, tree, checkpoints, tmp_path):
  """The ByT5 small file's 4 decoder layers, not overridden: the model has
  4, the checkpoint 2, and the run is refused saying so."""
  checkpoint, task, vocab_size = checkpoints['byt5']
  gin_file = t5x_user_gin(tmp_path, 'byt5', checkpoint, task, vocab_size,
                          sizes={'num_decoder_layers': 4})
  helpers.assert_refused(*helpers.launch([
      f'--gin_file={gin_file}', f'--gin.INFER_OUTPUT_DIR="{tmp_path}/o"',
      f'--gin_search_paths={tree}']), tmp_path / 'o',
                         r'num_decoder_layers: model config 4, checkpoint 2')


# (T5X-form lines, our dialect's lines, mode)
DECODING_CASES = {
    # No decode_fn: T5X's default, a beam search of one beam (alpha 0.6).
    'default_is_one_beam': (
        '', "infer.decode_fn = @decoding.beam_search", 'predict_with_aux'),
    'beam_search_all_decodes': ("""
        models.EncoderDecoderModel.decode_fn = @decoding.beam_search
        models.EncoderDecoderModel.predict_batch_with_aux.num_decodes = 3
        models.EncoderDecoderModel.predict_batch_with_aux.return_all_decodes = True
        decoding.beam_search.alpha = 0.2
        """, """
        infer.decode_fn = @decoding.beam_search
        infer.num_decodes = 3
        infer.return_all_decodes = True
        decoding.beam_search.alpha = 0.2
        """, 'predict_with_aux'),
    'score': ('infer_script.infer.mode = "score"',
              'infer.decode_fn = @decoding.beam_search', 'score'),
}


@pytest.mark.parametrize('case', list(DECODING_CASES))
def test_t5x_decoding_and_score_give_our_dialects_records(
    env, tree, checkpoints, tmp_path, case):
  t5x_lines, our_lines, mode = DECODING_CASES[case]
  t5x_lines = textwrap.dedent(t5x_lines)
  if case != 'score':
    t5x_lines += f'\ninfer_script.infer.mode = {mode!r}\n'
  checkpoint, task, vocab_size = checkpoints['byt5']
  t5x_records, t5x_manifest = run(
      t5x_user_gin(tmp_path, 'byt5', checkpoint, task, vocab_size,
                   t5x_lines),
      tmp_path / 't5x', search_path=tree)
  our_records, our_manifest = run(
      our_gin(tmp_path, checkpoint, task, our_lines),
      tmp_path / 'ours', f"--gin.infer.mode='{mode}'")
  assert len(t5x_records) == 11 and t5x_records == our_records
  assert t5x_manifest['settings']['decoding'] == (
      our_manifest['settings']['decoding'])
  if case == 'default_is_one_beam':
    decoding = t5x_manifest['settings']['decoding']
    assert (decoding['strategy'], decoding['num_decodes'],
            decoding['alpha']) == ('beam_search', 1, 0.6)
  if case == 'beam_search_all_decodes':
    assert all(len(r['prediction']) == 3 for r in t5x_records)
  if case == 'score':
    assert all(r['score'] <= 0 for r in t5x_records)


def test_the_tutorial_file_in_t5x_form_runs_unchanged(env, tree, tmp_path):
  """T5X's tutorial file (its two includes and the four settings) with
  --gin_search_paths at the T5X tree, against a T5 1.1 small checkpoint:
  the records of the tutorial's file in our dialect (both in bfloat16, as
  T5X's files ask). Only the vocabulary file is pointed, by flag, at a
  local SentencePiece model."""
  from model import checkpoints as checkpoints_lib, config as config_lib, network  # pylint: disable=g-import-not-at-top
  small = config_lib.preset('t5_1_1_small')
  checkpoint = str(tmp_path / 'model.ckpt')
  checkpoints_lib.save_orbax(checkpoint, small, network.init_params(small))
  settings = f"""
CHECKPOINT_PATH = '{checkpoint}'
MIXTURE_OR_TASK_NAME = 't5beam_test_sentencepiece'
MIXTURE_OR_TASK_MODULE = 'tests.tasks'
TASK_FEATURE_LENGTHS = {{'inputs': 38, 'targets': 18}}
"""
  t5x_file = tmp_path / 't5x_tutorial.gin'
  t5x_file.write_text("include 't5x/configs/runs/infer.gin'\n"
                      "include 't5x/examples/t5/t5_1_1/small.gin'\n"
                      f'DROPOUT_RATE = 0.0\n{settings}')
  our_file = tmp_path / 'tutorial.gin'
  our_file.write_text("include 'runs/infer.gin'\n"
                      f"include 'models/t5_1_1_small.gin'\n{settings}")
  spm = os.path.join(os.environ['T5BEAM_TEST_DATA'], 'spm.model')
  vocabulary = [
      f'--gin.seqio.SentencePieceVocabulary.sentencepiece_model_file="{spm}"',
      '--gin.seqio.SentencePieceVocabulary.extra_ids=100']
  t5x_records, t5x_manifest = run(t5x_file, tmp_path / 't5x', *vocabulary,
                                  search_path=tree)
  our_records, our_manifest = run(our_file, tmp_path / 'ours', *vocabulary,
                                  "--gin.infer.activation_dtype='bfloat16'",
                                  '--gin.infer.decode_fn=@decoding.beam_search')
  assert len(t5x_records) == 11 and t5x_records == our_records
  settings = t5x_manifest['settings']
  assert (settings['restore_dtype'], settings['activation_dtype']) == (
      'bfloat16', 'bfloat16')
  assert settings['model_config'] == our_manifest['settings']['model_config']
  assert settings['model_config']['d_ff'] == 1024
  config_gin = (tmp_path / 't5x' / 'config.gin').read_text()
  assert 'import __main__ as infer_script' in config_gin
  assert 'network.T5Config.mlp_dim = 1024' in config_gin


@pytest.mark.parametrize('line,patterns', [
    # An unknown parameter: the file and line, and the closest name.
    ('network.T5Config.num_decoder_layer = 2',
     ("network.T5Config has no parameter 'num_decoder_layer'",
      't5x_infer.gin:{line}', "did you mean 'num_decoder_layers'")),
    # An unknown configurable on a T5X module.
    ('models.EncoderDecoderModle.z_loss = 0.0',
     ("t5x.models has no 'EncoderDecoderModle'", 't5x_infer.gin:{line}',
      "did you mean 'EncoderDecoderModel'")),
    # T5X's split of one run into jobs: Beam splits it across workers.
    ('infer_script.infer.num_shards = 4',
     (r'infer.num_shards = 4 \(shard_id 0\)', 'set infer.num_shards = 1')),
])
def test_t5x_form_refusals_name_the_line_and_the_fix(
    env, tree, checkpoints, tmp_path, line, patterns):
  checkpoint, task, vocab_size = checkpoints['byt5']
  gin_file = t5x_user_gin(tmp_path, 'byt5', checkpoint, task, vocab_size,
                          line)
  number = open(gin_file).read().splitlines().index(line) + 1
  helpers.assert_refused(*helpers.launch([
      f'--gin_file={gin_file}', f'--gin.INFER_OUTPUT_DIR="{tmp_path}/o"',
      f'--gin_search_paths={tree}']), tmp_path / 'o',
                         *[p.format(line=number) for p in patterns])


def test_dropout_rate_stays_required(env, tree, checkpoints, tmp_path):
  checkpoint, task, vocab_size = checkpoints['byt5']
  gin_file = t5x_user_gin(tmp_path, 'byt5', checkpoint, task, vocab_size)
  text = open(gin_file).read().replace('DROPOUT_RATE = 0.0\n', '')
  open(gin_file, 'w').write(text)
  helpers.assert_refused(*helpers.launch([
      f'--gin_file={gin_file}', f'--gin.INFER_OUTPUT_DIR="{tmp_path}/o"',
      f'--gin_search_paths={tree}']), tmp_path / 'o',
                         'DROPOUT_RATE', r'set DROPOUT_RATE = 0\.0')


def test_scanned_layers_are_refused_from_the_command_line(env, tree,
                                                          tmp_path):
  """scalable_t5's `scan_layers` changes how parameters are stored, which
  we do not read: one line naming it. Run as users run it, `python -m
  launch.infer` (its own process: `import __main__ as infer_script` finds
  the launcher's infer there, and this network's registration stays out of
  the test process)."""
  gin_file = tmp_path / 'scanned.gin'
  gin_file.write_text(f"""\
from __gin__ import dynamic_registration
import seqio
from t5x import models
from t5x.examples.scalable_t5 import network
include 't5x/configs/runs/infer.gin'
CHECKPOINT_PATH = '{env['checkpoint']}'
MIXTURE_OR_TASK_NAME = 't5beam_test_one_file'
MIXTURE_OR_TASK_MODULE = 'tests.tasks'
TASK_FEATURE_LENGTHS = {{'inputs': 24, 'targets': 8}}
MODEL = @models.EncoderDecoderModel()
models.EncoderDecoderModel:
  module = @network.Transformer()
  input_vocabulary = @seqio.ByteVocabulary()
  output_vocabulary = @seqio.ByteVocabulary()
network.Transformer.config = @network.T5Config()
network.T5Config:
  vocab_size = 260
  scan_layers = True
""")
  result = subprocess.run(
      [sys.executable, '-m', 'launch.infer', f'--gin_file={gin_file}',
       f'--gin.INFER_OUTPUT_DIR="{tmp_path}/o"', f'--gin_search_paths={tree}'],
      cwd=helpers.REPO, capture_output=True, text=True, timeout=300,
      check=False)
  helpers.assert_refused(result.returncode, result.stderr, tmp_path / 'o',
                         'scan_layers=True', 'set it to False')


def test_t5x_names_are_provided_only_while_the_launcher_runs():
  """An installed (here: stand-in) t5x and a script's own `infer` are back
  after the launcher; T5X's paths do not stay behind."""
  from launch import t5x_names  # pylint: disable=g-import-not-at-top
  import types  # pylint: disable=g-import-not-at-top
  main = sys.modules['__main__']
  theirs = types.ModuleType('t5x')
  sys.modules['t5x'] = theirs
  main.infer = 'the script\'s own'
  try:
    with t5x_names.provided():
      assert sys.modules['t5x'] is t5x_names.MODULES['t5x']
      assert 't5x.examples.t5.network' in sys.modules
      assert main.infer is not None and main.infer != 'the script\'s own'
    assert sys.modules['t5x'] is theirs
    assert 't5x.examples.t5.network' not in sys.modules
    assert main.infer == 'the script\'s own'
  finally:
    del sys.modules['t5x']
    del main.infer


def test_task_modules_a_gin_file_imports_reach_the_workers(env, tree,
                                                           checkpoints,
                                                           tmp_path):
  """T5X's files register tasks by importing their module in Gin (`from
  t5.data import mixtures`) rather than by MIXTURE_OR_TASK_MODULE: the run
  plan carries the module, so every worker imports it too."""
  from launch import infer, t5x_names  # pylint: disable=g-import-not-at-top
  checkpoint, task, vocab_size = checkpoints['byt5']
  gin_file = t5x_user_gin(tmp_path, 'byt5', checkpoint, task, vocab_size)
  text = open(gin_file).read().replace(
      "MIXTURE_OR_TASK_MODULE = 'tests.tasks'\n", '').replace(
          'import seqio\n', 'import seqio\nfrom tests import tasks\n')
  open(gin_file, 'w').write(text)
  with t5x_names.provided():
    run_plan, _ = infer.prepare([f'--gin_file={gin_file}',
                                 f'--gin.INFER_OUTPUT_DIR="{tmp_path}/o"',
                                 f'--gin_search_paths={tree}'])
  assert run_plan.config.task_modules == ('tests.tasks',)
  assert run_plan.config.mixture_or_task_module is None


# T5X's model Gin files bind the released vocabulary files alone: a
# .100extra file holds the 100 sentinel ids already.
T5X_VOCABULARY_FILES = {
    't5_1_0': 'gs://t5-data/vocabs/cc_all.32000.100extra/sentencepiece.model',
    't5_1_1': 'gs://t5-data/vocabs/cc_all.32000.100extra/sentencepiece.model',
    'flan_t5': 'gs://t5-data/vocabs/cc_all.32000.100extra/sentencepiece.model',
    'mt5': 'gs://t5-data/vocabs/mc4.250000.100extra/sentencepiece.model',
}


@pytest.mark.parametrize('name', ['t5_1_0_small', 't5_1_1_xxl',
                                  'flan_t5_base', 'mt5_large'])
def test_our_model_files_bind_the_vocabulary_as_t5x_does(env, name):
  """Our model files bind the file T5X's do, adding no extra ids: with the
  .100extra file (here the test model with 100 sentinel pieces of its own)
  the vocabulary has the file's ids and no more, as in T5X, and fits the
  model's embedding; 100 more would have been added before."""
  del env  # the test data
  import gin  # pylint: disable=g-import-not-at-top
  import seqio  # pylint: disable=g-import-not-at-top
  from launch import gin_config, infer  # pylint: disable=g-import-not-at-top
  from model import config as config_lib  # pylint: disable=g-import-not-at-top
  gin_files = ['runs/infer.gin', f'models/{name}.gin']
  required = ["MIXTURE_OR_TASK_NAME = 'unused'", "CHECKPOINT_PATH = 'unused'",
              "INFER_OUTPUT_DIR = 'unused'",
              "TASK_FEATURE_LENGTHS = {'inputs': 8, 'targets': 8}"]
  infer.parse_gin(gin_files, required, [])
  selector = 'seqio.SentencePieceVocabulary'
  assert gin.query_parameter(f'{selector}.sentencepiece_model_file') == (
      T5X_VOCABULARY_FILES[name.rsplit('_', 1)[0]])
  with pytest.raises(ValueError):  # unbound: seqio's default of none
    gin.query_parameter(f'{selector}.extra_ids')
  local = os.path.join(os.environ['T5BEAM_TEST_DATA'], 'spm.100extra.model')
  infer.parse_gin(gin_files, required + [
      f"{selector}.sentencepiece_model_file = '{local}'"], [])
  vocabulary = gin_config.bound_model().vocabulary
  assert vocabulary == seqio.SentencePieceVocabulary(local)
  assert vocabulary.vocab_size == 48 + 100
  # The released file's 32,100 (250,100) ids and nothing more fit the
  # model's embedding of 32,128 (250,112) rows.
  released = {'mt5': 250_100}.get(name.split('_')[0], 32_100)
  assert (released + vocabulary.extra_ids <=
          config_lib.preset(name.replace('flan_', 't5_1_1_').replace(
              't5_1_1_t5', 't5_1_1')).vocab_size)
  gin.clear_config()
