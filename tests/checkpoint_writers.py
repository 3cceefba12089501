"""Checkpoints in the formats T5X users have, each written by the library
that owns the format (TensorStore + flax msgpack for T5X, Orbax's
CheckpointManager for T5X Orbax, TensorFlow's Saver for Mesh TensorFlow)."""

import json
import os

import numpy as np

from model import checkpoints


def mesh_tensorflow_variables(config, params):
  """Our parameters under the variable names of the original T5 (Mesh
  TensorFlow) checkpoints, plus the optimizer slots and step they carry."""
  flat = checkpoints.flatten(params)
  out = {'shared/embedding': flat['token_embedder/embedding'],
         'global_step': np.array(1110000, np.int64)}
  for tower, layers, blocks in (
      ('encoder', config.num_encoder_layers,
       [('SelfAttention', 'attention', 'pre_attention_layer_norm')]),
      ('decoder', config.num_decoder_layers,
       [('SelfAttention', 'self_attention', 'pre_self_attention_layer_norm'),
        ('EncDecAttention', 'encoder_decoder_attention',
         'pre_cross_attention_layer_norm')])):
    bias = f'{tower}/block_000/layer_000/SelfAttention/relative_attention_bias'
    out[bias] = flat[f'{tower}/relpos_bias/rel_embedding']
    norm = 'encoder_norm' if tower == 'encoder' else 'decoder_norm'
    out[f'{tower}/rms_norm/scale'] = flat[f'{tower}/{norm}/scale']
    for i in range(layers):
      block = f'{tower}/block_{i:03d}'
      for j, (theirs, ours, layer_norm) in enumerate(blocks):
        out[f'{block}/layer_{j:03d}/rms_norm/scale'] = flat[
            f'{tower}/layers_{i}/{layer_norm}/scale']
        for short, long in (('q', 'query'), ('k', 'key'), ('v', 'value'),
                            ('o', 'out')):
          value = flat[f'{tower}/layers_{i}/{ours}/{long}/kernel']
          out[f'{block}/layer_{j:03d}/{theirs}/{short}'] = value
          out[f'{block}/layer_{j:03d}/{theirs}/{short}_slot_vr'] = (
              np.ones(value.shape[:1], np.float32))
      mlp = f'{block}/layer_{len(blocks):03d}'
      out[f'{mlp}/rms_norm/scale'] = flat[
          f'{tower}/layers_{i}/pre_mlp_layer_norm/scale']
      for kernel in ('wi_0', 'wi_1', 'wo'):
        out[f'{mlp}/DenseReluDense/{kernel}/kernel'] = flat[
            f'{tower}/layers_{i}/mlp/{kernel}/kernel']
  out['decoder/logits/kernel'] = flat['decoder/logits_dense/kernel']
  return out


def write_tensorflow_checkpoint(prefix, variables):
  """Saves `variables` with TensorFlow's own (TF1-style) Saver. Each
  variable starts from a fed placeholder, not a constant: constants would
  put every value into the graph (and its .meta file) too, which for a
  640 MB model took most of a minute."""
  import tensorflow as tf  # pylint: disable=g-import-not-at-top
  graph = tf.Graph()
  feeds = {}
  with graph.as_default():
    for name, value in variables.items():
      value = np.asarray(value)
      initial = tf.compat.v1.placeholder(tf.as_dtype(value.dtype),
                                         value.shape)
      tf.compat.v1.Variable(initial, name=name)
      feeds[initial] = value
    saver = tf.compat.v1.train.Saver()
    with tf.compat.v1.Session() as session:
      session.run(tf.compat.v1.global_variables_initializer(),
                  feed_dict=feeds)
      return saver.save(session, prefix, global_step=1110000)


def write_t5x_checkpoint(directory, params, inline=(), compressor='gzip'):
  """A T5X checkpoint as T5X lays it out: each parameter a zarr array
  written by TensorStore in a folder named after its path with dots, and a
  msgpack 'checkpoint' file ({version, optimizer: {target, state}}) holding
  the relative TensorStore specs (or, for names in `inline`, the array).
  `compressor` None writes the chunks uncompressed (faster for big tests)."""
  import tensorstore as ts  # pylint: disable=g-import-not-at-top
  from flax import serialization  # pylint: disable=g-import-not-at-top
  os.makedirs(directory)
  specs = {}
  for name, value in checkpoints.flatten(params).items():
    if name in inline:
      specs[name] = np.asarray(value)
      continue
    relative = 'target.' + name.replace('/', '.')
    spec = {'driver': 'zarr', 'dtype': np.dtype(value.dtype).name,
            'kvstore': {'driver': 'file', 'path': relative},
            'metadata': {'shape': list(value.shape),
                         'chunks': list(value.shape),
                         'compressor': ({'id': compressor} if compressor
                                        else None)}}
    written = json.loads(json.dumps(spec))
    written['kvstore']['path'] = os.path.join(directory, relative)
    store = ts.open(written, create=True, open=True).result()
    store.write(np.asarray(value)).result()
    specs[name] = spec
  state = {'version': 3, 'optimizer': {
      'target': checkpoints.unflatten(specs),
      'state': {'step': np.array(1000000, np.int64)}}}
  with open(os.path.join(directory, 'checkpoint'), 'wb') as f:
    f.write(serialization.msgpack_serialize(state))


def write_t5x_orbax_checkpoint(directory, params, step=1000):
  """A T5X Orbax checkpoint: a CheckpointManager step 'checkpoint_<step>'
  whose 'state' item is the train state {target, state} (use_ocdbt)."""
  import orbax.checkpoint as ocp  # pylint: disable=g-import-not-at-top
  manager = ocp.CheckpointManager(
      directory, options=ocp.CheckpointManagerOptions(step_prefix='checkpoint'))
  state = {'target': params, 'state': {'step': np.array(step, np.int64)}}
  manager.save(step, args=ocp.args.Composite(
      state=ocp.args.PyTreeSave(state)))
  manager.wait_until_finished()
  return os.path.join(directory, f'checkpoint_{step}')
