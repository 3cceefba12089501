"""Restoring streams: a checkpoint goes to its devices tensor by tensor (or,
for Orbax, straight into each device's slice), so the restore's peak host
memory stays near the checkpoint's size, on one device and on a mesh."""

import json
import os
import subprocess
import sys

import numpy as np
import pytest

from tests import pipeline_helpers as helpers

# T5 1.1 small with 8 heads (so a model axis of 8 divides it) and a wider
# MLP: about 160M parameters, 640 MB in float32, big enough that a second
# copy would show beside the fixed costs (TensorStore's caches, XLA's
# allocator).
HEADS, D_FF = 8, 4096


@pytest.fixture(scope='module')
def checkpoints_on_disk(tmp_path_factory):
  """{format: path}, written by the libraries that own the formats:
  transformers (safetensors), Orbax, TensorFlow and TensorStore (T5X's
  layout), all of the same parameters."""
  import torch  # pylint: disable=g-import-not-at-top
  import transformers  # pylint: disable=g-import-not-at-top
  from model import checkpoints, config as config_lib  # pylint: disable=g-import-not-at-top
  from tests import checkpoint_writers as writers  # pylint: disable=g-import-not-at-top
  root = tmp_path_factory.mktemp('restore')
  config = config_lib.preset('t5_1_1_small', num_heads=HEADS, d_ff=D_FF)
  torch.manual_seed(0)
  hf = transformers.T5ForConditionalGeneration(transformers.T5Config(
      vocab_size=config.vocab_size, d_model=config.d_model,
      d_kv=config.d_kv, d_ff=config.d_ff,
      num_layers=config.num_encoder_layers,
      num_heads=config.num_heads, feed_forward_proj='gated-gelu',
      tie_word_embeddings=False))
  hf.save_pretrained(root / 'hf', safe_serialization=True)
  # The same values in every format (our layout of transformers' tensors).
  params = checkpoints.params_from_huggingface(
      config, {k: v.detach().numpy() for k, v in hf.state_dict().items()})
  del hf
  orbax_path = str(root / 'orbax')
  checkpoints.save_orbax(orbax_path, config, params)
  t5x_path = str(root / 't5x' / 'checkpoint_1000')
  writers.write_t5x_checkpoint(t5x_path, params, compressor=None)
  tensorflow_path = writers.write_tensorflow_checkpoint(
      str(root / 'tf' / 'model.ckpt'),
      writers.mesh_tensorflow_variables(config, params))
  return {'safetensors': str(root / 'hf'), 'orbax': orbax_path,
          't5x': t5x_path, 'tensorflow': tensorflow_path,
          'config': config.to_json(), 'digest': digest(params.values())}


def digest(leaves) -> list:
  """(sum, sum of squares) of every parameter value, in float64: the same
  values in another layout (the fused kernels) give the same pair."""
  import jax  # pylint: disable=g-import-not-at-top
  import numpy as np  # pylint: disable=g-import-not-at-top
  values = [np.asarray(leaf, np.float64)
            for leaf in jax.tree_util.tree_leaves(list(leaves))]
  return [sum(float(v.sum()) for v in values),
          sum(float((v * v).sum()) for v in values)]


def restore(path, model_axis, config_json=None):
  """The child's report of restoring `path` onto a model axis."""
  command = [sys.executable, os.path.join(helpers.REPO, 'tests',
                                          'restore_memory_child.py'),
             path, str(model_axis)]
  if config_json:
    command.append(config_json)
  result = subprocess.run(command, capture_output=True, text=True,
                          timeout=600, check=False)
  assert result.returncode == 0, result.stderr[-3000:]
  return json.loads(result.stdout.strip().splitlines()[-1])


@pytest.mark.parametrize('fmt,model_axis', [
    ('safetensors', 1), ('safetensors', 8), ('orbax', 1), ('orbax', 8),
    ('t5x', 8), ('tensorflow', 8)])
def test_restore_peak_memory_stays_near_the_checkpoint_size(
    checkpoints_on_disk, fmt, model_axis):
  stores_config = fmt in ('safetensors', 'orbax')
  report = restore(checkpoints_on_disk[fmt], model_axis,
                   None if stores_config else checkpoints_on_disk['config'])
  # The parameters restored, in their stored dtype (float32): what the
  # devices must hold; the restore may add at most half of it at its peak.
  size = report['parameter_bytes']
  assert size > 600e6
  assert report['restore_peak_bytes'] < 1.5 * size, (
      report['restore_peak_bytes'] / size)
  if model_axis > 1:
    assert report['mesh'] == {'data': 1, 'model': 8}
    assert report['wo_shard_fraction'] == 1 / 8
  # The parameters written, in every format and layout.
  np.testing.assert_allclose(report['digest'], checkpoints_on_disk['digest'],
                             rtol=1e-9)
