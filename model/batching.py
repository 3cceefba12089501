"""How a set of examples becomes model calls.

    batching = Batching('continuous')        # or 'length', 'static'
    tokens, scores = model.predict_examples(encoder_input_tokens, ...,
                                            batching=batching)

Three modes, all giving each example the tokens it would get alone (up to
float32 summation order, so near-ties aside):

- 'static': batches of `batch_size` in the given order, every input padded
  to its feature length, each batch decoded until its longest answer ends
  (T5X's way).
- 'length': each example padded only to the smallest of a few lengths
  (`length_buckets`) that holds its input, batches made of examples of the
  same bucket; the results go back in the given order. One compilation per
  bucket used, and an example's result does not depend on its batch.
- 'continuous': sorted the same way, then decoded by `batch_size` rows that
  never wait for each other: a row whose answer ends takes the next
  example (`model.decoding.continuous_decode`). Every decoding: a row
  per sample (each of an example's samples is a sequence of its own), the
  K rows of one example's beams for beam search; scoring uses 'length'.
"""

import dataclasses
import math
from typing import Optional, Tuple

import numpy as np

MODES = ('static', 'length', 'continuous')


@dataclasses.dataclass(frozen=True)
class Batching:
  """mode: one of MODES. length_buckets: the padded input lengths batches
  run at (None: `default_buckets` of the feature length; the feature length
  itself is always one). refill_group: in continuous mode, how many
  examples enter free rows at once (None: an eighth of the rows, at least
  1): each entry runs the encoder once for the group, and rows wait until
  that many are free (on nq-varlen at 32 rows, groups of 1, 2, 4 and 8
  gave 26, 31, 35 and 33 examples/s)."""
  mode: str = 'continuous'
  length_buckets: Optional[Tuple[int, ...]] = None
  refill_group: Optional[int] = None

  def __post_init__(self):
    if self.mode not in MODES:
      raise ValueError(f'batching {self.mode!r} is not one of {MODES}')
    if self.length_buckets is not None:
      buckets = tuple(int(b) for b in self.length_buckets)
      if not buckets or min(buckets) < 1:
        raise ValueError(f'length_buckets {self.length_buckets} must be '
                         'positive lengths')
      object.__setattr__(self, 'length_buckets', tuple(sorted(set(buckets))))
    if self.refill_group is not None and self.refill_group < 1:
      raise ValueError(f'refill_group must be at least 1, got '
                       f'{self.refill_group}')

  def buckets(self, length: int) -> Tuple[int, ...]:
    """The padded lengths used for a feature of `length`: the configured
    buckets below it, and `length` itself."""
    if self.mode == 'static':
      return (length,)
    chosen = (self.length_buckets if self.length_buckets is not None
              else default_buckets(length))
    return tuple(b for b in chosen if b < length) + (length,)

  def group(self, slots: int) -> int:
    return min(slots, self.refill_group or max(1, slots // 8))


def continuous_applies(mode: str, decoding) -> bool:
  """Whether continuous batching can run this: decoding (every strategy,
  any num_decodes), not scoring (which has no answer to wait for)."""
  del decoding
  return mode != 'score'


def effective_mode(batching: str, mode: str, decoding) -> str:
  """The batching that runs: 'continuous' falls back to 'length' where it
  does not apply (see `continuous_applies`)."""
  if batching == 'continuous' and not continuous_applies(mode, decoding):
    return 'length'
  return batching


def default_buckets(length: int) -> Tuple[int, ...]:
  """An eighth, a quarter, a half and all of `length`, rounded up to
  multiples of 8: few compilations, and at most about twice the padding
  of an exact fit."""
  return tuple(sorted({min(length, 8 * math.ceil(length / part / 8))
                       for part in (8, 4, 2, 1)}))


def used_lengths(tokens: np.ndarray) -> np.ndarray:
  """[rows] the length of each row up to its last non-zero token."""
  nonzero = np.asarray(tokens) != 0
  last = nonzero.shape[1] - np.argmax(nonzero[:, ::-1], axis=1)
  return np.where(nonzero.any(axis=1), last, 0)


def bucket_of(length: int, buckets: Tuple[int, ...]) -> int:
  """The smallest bucket holding `length` (the last one when none does)."""
  for bucket in buckets:
    if length <= bucket:
      return bucket
  return buckets[-1]


def row_buckets(tokens: np.ndarray, buckets: Tuple[int, ...]) -> np.ndarray:
  """[rows] the bucket of each row's used length (`bucket_of`)."""
  return np.array([bucket_of(int(n), buckets) for n in used_lengths(tokens)],
                  dtype=np.int64)


def length_order(tokens: np.ndarray) -> np.ndarray:
  """Row indices by increasing used length, ties in the given order."""
  return np.argsort(used_lengths(tokens), kind='stable')


def bucket_batches(widths: np.ndarray, batch_size: int):
  """Batches of row indices: rows grouped by their width (each row's own
  bucket), in increasing width, then cut into batches of `batch_size` (a
  group's last batch may be short); yields (width, rows). Since a row's
  batch has its own width, what the model computes for it does not depend
  on the other rows of the batch."""
  order = np.argsort(widths, kind='stable')
  sorted_widths = widths[order]
  for width in np.unique(sorted_widths):
    group = order[sorted_widths == width]
    for begin in range(0, len(group), batch_size):
      yield int(width), group[begin:begin + batch_size]


def queue_size(count: int, slots: int) -> int:
  """Rows of the queue `count` examples are padded to: `slots` times a
  power of two, so a run compiles a few queue shapes, not one per count."""
  return slots * (1 << max(0, math.ceil(math.log2(max(1, -(-count //
                                                          slots))))))
