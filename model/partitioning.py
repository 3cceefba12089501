"""Where arrays live on a worker's devices: a ('data', 'model') mesh, and one
table of rules from named logical axes to mesh axes, as T5X partitions.

    partitioning = Partitioning(num_partitions=2)      # model axis of 2
    mesh = partitioning.make_mesh()                    # every local device
    shardings = param_shardings(config, mesh, partitioning.logical_axis_rules)

The network says which logical axes each array has
(`model.network.param_logical_axes`, and `constrain` on the activations
it creates: the decoding caches, the cross-attention keys and values); the
rules say which mesh axis each logical axis lives on. The data axis is
every device the model axis leaves: a small model is replicated and each
batch split over the devices (data parallel), a big one has its heads, MLP
columns and vocabulary split over the model axis (model parallel).
"""

import contextlib
import dataclasses
import math
import threading
from typing import Any, Dict, Optional, Sequence, Tuple

from flax.linen import spmd as flax_spmd
import jax
from jax.experimental import mesh_utils
from jax.sharding import Mesh, NamedSharding, PartitionSpec
import numpy as np

from model.config import T5Config

DATA, MODEL = 'data', 'model'
Rules = Tuple[Tuple[str, Optional[str]], ...]

# T5X's defaults (one-dimensional parameter and activation partitioning):
# the batch on 'data'; vocabulary, MLP columns and heads on 'model'; the
# embedding dimension and the per-head dimension replicated.
STANDARD_RULES: Rules = (
    ('batch', DATA),
    ('vocab', MODEL),
    ('embed', None),
    ('mlp', MODEL),
    ('heads', MODEL),
    ('kv', None),
    ('joined_kv', MODEL),
    ('relpos_buckets', None),
    ('length', None),
    ('stack', None),
)


def standard_logical_axis_rules() -> Rules:
  return STANDARD_RULES


class PartitioningError(ValueError):
  """A mesh that cannot be made or does not fit the model; the message
  names the number to change."""


@dataclasses.dataclass(frozen=True)
class Partitioning:
  """T5X's PjitPartitioner settings: the model axis size (`num_partitions`,
  or the product of `model_parallel_submesh`, T5X's (x, y, z, core)) and the
  logical axis rules. Validated on construction."""
  num_partitions: Optional[int] = 1
  model_parallel_submesh: Optional[Tuple[int, ...]] = None
  logical_axis_rules: Rules = STANDARD_RULES

  def __post_init__(self):
    if self.num_partitions is not None and self.num_partitions < 1:
      raise PartitioningError(
          'partitioning.PjitPartitioner.num_partitions must be at least 1, '
          f'got {self.num_partitions}')
    if self.model_parallel_submesh is not None:
      submesh = tuple(self.model_parallel_submesh)
      if not submesh or any(int(s) < 1 for s in submesh):
        raise PartitioningError(
            'partitioning.PjitPartitioner.model_parallel_submesh must be '
            f'positive sizes (x, y, z, core), got {submesh}')
      if (self.num_partitions or 1) > 1 and math.prod(submesh) > 1:
        raise PartitioningError(
            'set either partitioning.PjitPartitioner.num_partitions '
            f'({self.num_partitions}) or model_parallel_submesh ({submesh}),'
            ' not both')
      object.__setattr__(self, 'model_parallel_submesh',
                         tuple(int(s) for s in submesh))
    object.__setattr__(self, 'logical_axis_rules',
                       tuple((str(name), axis) for name, axis
                             in self.logical_axis_rules))
    for name, axis in self.logical_axis_rules:
      if axis not in (DATA, MODEL, None):
        raise PartitioningError(
            f'logical axis rule ({name!r}, {axis!r}): the mesh axes are '
            f"'{DATA}' and '{MODEL}' (or None to replicate)")

  @property
  def model_axis_size(self) -> int:
    """num_partitions, unless it is 1 or None and a submesh is given (T5X's
    runs/infer.gin binds num_partitions = 1)."""
    if (self.num_partitions or 1) == 1 and self.model_parallel_submesh:
      return math.prod(self.model_parallel_submesh)
    return self.num_partitions or 1

  def to_dict(self) -> Dict[str, Any]:
    return {'model_axis': self.model_axis_size,
            'logical_axis_rules': [list(rule) for rule in
                                   self.logical_axis_rules]}

  def make_mesh(self, devices: Optional[Sequence[Any]] = None) -> Mesh:
    """The ('data', 'model') mesh over `devices` (default: every device of
    this process); the model axis takes neighbouring devices (on TPUs by
    their physical topology, as JAX's mesh_utils lays them out)."""
    devices = list(devices if devices is not None else jax.local_devices())
    model = self.model_axis_size
    if model > len(devices) or len(devices) % model:
      raise PartitioningError(
          f'partitioning.PjitPartitioner.num_partitions = {model} does not '
          f'divide the {len(devices)} device(s) of this worker '
          f'({devices[0].platform}); use a divisor of {len(devices)}')
    shape = (len(devices) // model, model)
    grid = np.array(devices, dtype=object).reshape(shape)
    if all(isinstance(d, jax.Device) for d in devices):
      try:  # on TPUs, the model axis on physical neighbours
        grid = mesh_utils.create_device_mesh(shape, devices)
      except (ValueError, NotImplementedError, AssertionError):
        pass  # a shape the topology helper cannot lay out: in order
    return Mesh(grid, (DATA, MODEL))

  def check_model(self, config: T5Config):
    """PartitioningError naming the first dimension the model axis does
    not divide."""
    model = self.model_axis_size
    if model == 1:
      return
    rules = dict(self.logical_axis_rules)
    dimensions = {'heads': ('num_heads', config.num_heads),
                  'joined_kv': ('num_heads * d_kv',
                                config.num_heads * config.d_kv),
                  'mlp': ('d_ff', config.d_ff),
                  'vocab': ('vocab_size', config.vocab_size),
                  'embed': ('d_model', config.d_model),
                  'kv': ('d_kv', config.d_kv)}
    for logical, (name, size) in dimensions.items():
      if rules.get(logical) == MODEL and size % model:
        raise PartitioningError(
            f'the model axis of {model} (partitioning.PjitPartitioner.'
            f'num_partitions) does not divide the model\'s {name} = {size}; '
            f'use a num_partitions that divides {size}')


def check_batch(batch_size: int, mesh: Mesh):
  data = mesh.shape[DATA]
  if batch_size % data:
    raise PartitioningError(
        f'DatasetConfig.batch_size = {batch_size} is not divisible by the '
        f'data axis of {data} device(s) (mesh {dict(mesh.shape)}); use a '
        f'multiple of {data}')


def spec(logical_axes: Sequence[Optional[str]], rules: Rules) -> PartitionSpec:
  """The PartitionSpec the rules give these logical axes, resolved as Flax
  and T5X resolve them: the rules are taken in order, and each places the
  logical axis it names on its mesh axis unless that axis is already placed
  or the mesh axis is already used by this array; what no rule places is
  replicated. (So an earlier rule wins over a later one for another axis
  of the same array: with ('embed', 'data') before ('batch', 'data'),
  ('batch', 'embed') is P(None, 'data').)"""
  return flax_spmd.logical_to_mesh_axes(tuple(logical_axes), rules)


def parameter_specs(config: T5Config, rules: Rules
                    ) -> Dict[str, Tuple[Tuple[Optional[str], ...],
                                         PartitionSpec]]:
  """'/'-joined parameter name -> (logical axes, PartitionSpec) of every
  parameter of `config`'s network (T5X's model-info listing)."""
  from model import checkpoints, network  # pylint: disable=g-import-not-at-top
  specs = {}
  for name in checkpoints.expected_shapes(config):
    axes = network.logical_axes(('params',) + tuple(name.split('/')))
    specs[name] = (axes, spec(axes, rules))
  return specs


def shardings(logical_tree, mesh: Mesh, rules: Rules):
  """A tree of NamedShardings for a tree of logical-axis tuples."""
  return jax.tree_util.tree_map(
      lambda axes: NamedSharding(mesh, spec(axes, rules)), logical_tree,
      is_leaf=lambda x: isinstance(x, tuple))


# --- activations: constraints while a mesh is active -------------------------

_ACTIVE = threading.local()


@contextlib.contextmanager
def active(mesh: Optional[Mesh], rules: Rules):
  """Within this context (while tracing), `constrain` places activations on
  `mesh` by `rules`; without it, `constrain` does nothing."""
  previous = getattr(_ACTIVE, 'value', None)
  _ACTIVE.value = (mesh, rules) if mesh is not None else None
  try:
    yield
  finally:
    _ACTIVE.value = previous


def constrain(x: jax.Array, logical_axes: Sequence[Optional[str]]):
  """x, placed on the active mesh by its logical axes (no-op without one)."""
  current = getattr(_ACTIVE, 'value', None)
  if current is None:
    return x
  mesh, rules = current
  return jax.lax.with_sharding_constraint(
      x, NamedSharding(mesh, spec(logical_axes, rules)))
