"""Checkpoint readers: formats written by their owning libraries, one set of
weights, identical predictions; clear errors for everything else."""

import copy
import json
import os

import ml_dtypes
import numpy as np
import pytest
import torch

from model import checkpoints
from model.checkpoints import CheckpointError
from model.config import T5Config
from model.inference import InferenceModel
from tests import checkpoint_writers as writers
from tests import reference as ref

CONFIG = T5Config(vocab_size=256, d_model=32, num_heads=2, d_kv=8, d_ff=64,
                  num_encoder_layers=2, num_decoder_layers=2,
                  feed_forward='gated-gelu', logits_via_embedding=False,
                  relative_attention_num_buckets=8,
                  relative_attention_max_distance=16)


@pytest.fixture(scope='module')
def reference_model():
  return ref.make_reference(CONFIG, seed=3, eos_boost=0.3)


@pytest.fixture(scope='module')
def hf_dir(reference_model, tmp_path_factory):
  path = tmp_path_factory.mktemp('hf')
  reference_model.save_pretrained(path)
  return str(path)


@pytest.fixture(scope='module')
def encoder_tokens():
  return ref.random_inputs(np.random.default_rng(0), 16, 20, CONFIG.vocab_size)


def _predict(model, encoder_tokens):
  return model.predict_batch({'encoder_input_tokens': encoder_tokens},
                             max_length=10, return_scores=True)


def test_detects_huggingface_and_orbax(hf_dir, tmp_path):
  assert checkpoints.detect_format(hf_dir) == 'huggingface'
  config, params = checkpoints.load_checkpoint(hf_dir)
  checkpoints.save_orbax(str(tmp_path / 'orbax'), config, params)
  assert checkpoints.detect_format(str(tmp_path / 'orbax')) == 'orbax'


def test_sharded_safetensors_give_identical_predictions(reference_model,
                                                        hf_dir, tmp_path,
                                                        encoder_tokens):
  sharded = tmp_path / 'sharded'
  reference_model.save_pretrained(sharded, max_shard_size='100KB')
  index = json.loads((sharded / 'model.safetensors.index.json').read_text())
  assert len(set(index['weight_map'].values())) > 1
  assert not (sharded / 'model.safetensors').exists()
  single = _predict(InferenceModel.load(hf_dir, dtype='float32'), encoder_tokens)
  multi = _predict(InferenceModel.load(str(sharded), dtype='float32'), encoder_tokens)
  np.testing.assert_array_equal(single[0], multi[0])
  np.testing.assert_array_equal(single[1], multi[1])


def test_orbax_round_trip_gives_identical_predictions(hf_dir, tmp_path,
                                                      encoder_tokens):
  config, params = checkpoints.load_checkpoint(hf_dir)
  checkpoints.save_orbax(str(tmp_path / 'ckpt'), config, params)
  restored_config, restored = checkpoints.load_checkpoint(
      str(tmp_path / 'ckpt'))
  assert restored_config == config
  flat, restored_flat = (checkpoints.flatten(params),
                         checkpoints.flatten(restored))
  assert flat.keys() == restored_flat.keys()
  for name in flat:
    np.testing.assert_array_equal(flat[name], restored_flat[name])
  before = _predict(InferenceModel(config, params), encoder_tokens)
  after = _predict(InferenceModel.load(str(tmp_path / 'ckpt'), dtype='float32'),
                   encoder_tokens)
  np.testing.assert_array_equal(before[0], after[0])
  np.testing.assert_array_equal(before[1], after[1])


def test_restore_casts_to_the_asked_dtype(hf_dir):
  config, params = checkpoints.load_checkpoint(hf_dir, dtype='bfloat16')
  dtypes = {a.dtype for a in checkpoints.flatten(params).values()}
  assert dtypes == {np.dtype(ml_dtypes.bfloat16)}
  assert config.param_dtype == 'bfloat16'
  model = InferenceModel.load(hf_dir, dtype='bfloat16')
  assert model.config.dtype == 'bfloat16'
  tokens = model.predict_batch(
      {'encoder_input_tokens': np.full((2, 5), 7, np.int32)}, max_length=4)
  assert tokens.shape == (2, 4)


def test_reads_bfloat16_safetensors(reference_model, tmp_path):
  # A copy: .to() changes a module in place.
  copy.deepcopy(reference_model).to(torch.bfloat16).save_pretrained(
      tmp_path / 'bf16')
  _, params = checkpoints.load_checkpoint(str(tmp_path / 'bf16'), dtype=None)
  embedding = params['token_embedder']['embedding']
  assert embedding.dtype == np.dtype(ml_dtypes.bfloat16)
  expected = reference_model.shared.weight.detach().to(torch.bfloat16).float()
  np.testing.assert_array_equal(embedding.astype(np.float32),
                                expected.numpy())


def test_missing_path_names_it_and_the_formats(tmp_path):
  missing = str(tmp_path / 'nope')
  with pytest.raises(CheckpointError, match='not found') as error:
    checkpoints.load_checkpoint(missing)
  assert missing in str(error.value) and 'safetensors' in str(error.value)


def test_directory_without_checkpoint_is_refused(tmp_path):
  (tmp_path / 'notes.txt').write_text('hello')
  with pytest.raises(CheckpointError, match='holds no checkpoint') as e:
    checkpoints.load_checkpoint(str(tmp_path))
  assert 'Orbax' in str(e.value) and 'README' in str(e.value)


def test_pytorch_bin_is_refused_not_unpickled(reference_model, tmp_path):
  reference_model.config.save_pretrained(tmp_path)
  torch.save(reference_model.state_dict(), tmp_path / 'pytorch_model.bin')
  with pytest.raises(CheckpointError, match='convert it to safetensors'):
    checkpoints.load_checkpoint(str(tmp_path))


def test_config_that_does_not_match_the_checkpoint_is_named(hf_dir):
  with pytest.raises(CheckpointError, match='d_ff: model config 128'):
    checkpoints.load_checkpoint(hf_dir, config=CONFIG.replace(d_ff=128))


def test_orbax_shape_mismatch_names_the_parameter(hf_dir, tmp_path):
  config, params = checkpoints.load_checkpoint(hf_dir)
  path = str(tmp_path / 'ckpt')
  checkpoints.save_orbax(path, config, params)
  os.remove(os.path.join(path, checkpoints.CONFIG_FILE))
  with pytest.raises(CheckpointError,
                     match="'encoder/layers_0/mlp/wi_0/kernel' .* shape"):
    checkpoints.load_checkpoint(path, config=config.replace(d_ff=48))


def test_mesh_tensorflow_checkpoint_gives_identical_predictions(
    hf_dir, tmp_path, encoder_tokens):
  config, params = checkpoints.load_checkpoint(hf_dir)
  saved = writers.write_tensorflow_checkpoint(
      str(tmp_path / 'model.ckpt'),
      writers.mesh_tensorflow_variables(config, params))
  assert saved.endswith('model.ckpt-1110000')
  assert checkpoints.detect_format(saved) == 'tensorflow'
  assert checkpoints.detect_format(str(tmp_path)) == 'tensorflow'
  expected = _predict(InferenceModel(config, params), encoder_tokens)
  for path in (saved, str(tmp_path)):  # the prefix, or its directory
    actual = _predict(InferenceModel.load(path, config=config, dtype='float32'),
                      encoder_tokens)
    np.testing.assert_array_equal(actual[0], expected[0])
    np.testing.assert_array_equal(actual[1], expected[1])
  bf16 = InferenceModel.load(saved, config=config, dtype='bfloat16')
  assert bf16.config.param_dtype == 'bfloat16'


def test_mesh_tensorflow_errors_name_the_problem(hf_dir, tmp_path):
  config, params = checkpoints.load_checkpoint(hf_dir)
  variables = writers.mesh_tensorflow_variables(config, params)
  saved = writers.write_tensorflow_checkpoint(
      str(tmp_path / 'a' / 'model.ckpt'), variables)
  with pytest.raises(CheckpointError, match='does not record its '
                     'architecture.*model'):
    checkpoints.load_checkpoint(saved)
  extra = dict(variables, **{'encoder/block_000/layer_000/Adapter/w':
                             np.zeros(3, np.float32)})
  saved = writers.write_tensorflow_checkpoint(
      str(tmp_path / 'b' / 'model.ckpt'), extra)
  with pytest.raises(CheckpointError, match="'encoder/block_000/layer_000/"
                     "Adapter/w' has no place"):
    checkpoints.load_checkpoint(saved, config=config)
  missing = {k: v for k, v in variables.items()
             if k != 'decoder/block_001/layer_002/DenseReluDense/wo/kernel'}
  saved = writers.write_tensorflow_checkpoint(
      str(tmp_path / 'c' / 'model.ckpt'), missing)
  with pytest.raises(CheckpointError,
                     match="lacks 1 parameter.*decoder/layers_1/mlp/wo"):
    checkpoints.load_checkpoint(saved, config=config)


def test_t5x_checkpoint_gives_identical_predictions(hf_dir, tmp_path,
                                                    encoder_tokens):
  config, params = checkpoints.load_checkpoint(hf_dir)
  directory = str(tmp_path / 'checkpoint_1000000')
  writers.write_t5x_checkpoint(directory, params,
                               inline=('encoder/encoder_norm/scale',))
  assert checkpoints.detect_format(directory) == 't5x'
  expected = _predict(InferenceModel(config, params), encoder_tokens)
  actual = _predict(InferenceModel.load(directory, config=config, dtype='float32'),
                    encoder_tokens)
  np.testing.assert_array_equal(actual[0], expected[0])
  np.testing.assert_array_equal(actual[1], expected[1])
  with pytest.raises(CheckpointError, match='does not record its '
                     'architecture'):
    checkpoints.load_checkpoint(directory)
  with pytest.raises(CheckpointError, match="'encoder/layers_0/mlp/wi_0/"
                     r"kernel' .* shape \(32, 64\), the model config "
                     r"expects \(32, 32\)"):
    checkpoints.load_checkpoint(directory, config=config.replace(d_ff=32))


def test_every_format_gives_the_same_predictions(reference_model, hf_dir,
                                                 tmp_path, encoder_tokens):
  config, params = checkpoints.load_checkpoint(hf_dir)
  sharded = str(tmp_path / 'sharded')
  reference_model.save_pretrained(sharded, max_shard_size='100KB')
  orbax = str(tmp_path / 'orbax')
  checkpoints.save_orbax(orbax, config, params)
  t5x = str(tmp_path / 'checkpoint_1')
  writers.write_t5x_checkpoint(t5x, params)
  t5x_orbax = writers.write_t5x_orbax_checkpoint(
      str(tmp_path / 't5x-orbax'), params)
  tensorflow = writers.write_tensorflow_checkpoint(
      str(tmp_path / 'tf' / 'model.ckpt'),
      writers.mesh_tensorflow_variables(config, params))
  results = [_predict(InferenceModel.load(path, config=config, dtype='float32'),
                      encoder_tokens)
             for path in (hf_dir, sharded, orbax, t5x, t5x_orbax, tensorflow)]
  for tokens, scores in results[1:]:
    np.testing.assert_array_equal(tokens, results[0][0])
    np.testing.assert_array_equal(scores, results[0][1])


def test_t5x_orbax_checkpoint_gives_identical_predictions(hf_dir, tmp_path,
                                                          encoder_tokens):
  config, params = checkpoints.load_checkpoint(hf_dir)
  path = writers.write_t5x_orbax_checkpoint(str(tmp_path / 'model'), params)
  assert os.path.isdir(os.path.join(path, 'state'))
  expected = _predict(InferenceModel(config, params), encoder_tokens)
  for where in (path, os.path.join(path, 'state')):
    assert checkpoints.detect_format(where) == 'orbax'
    actual = _predict(InferenceModel.load(where, config=config, dtype='float32'),
                      encoder_tokens)
    np.testing.assert_array_equal(actual[0], expected[0])
    np.testing.assert_array_equal(actual[1], expected[1])
  with pytest.raises(CheckpointError, match='give the model config'):
    checkpoints.load_checkpoint(path)
