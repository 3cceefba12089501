"""SeqIO tasks over plain input files, for inference without a registered task
(what T5X's infer_from_tfexample_file.gin does, for more file types).

A `FileTaskSpec` is plain data: the launcher builds it from Gin and every
worker registers the same task from it, so no user module is needed.
"""

import csv
import dataclasses
import hashlib
import json
from typing import Any, Optional, Tuple

import seqio
import tensorflow as tf

TEXT_FILE_TYPES = ('jsonl', 'tsv')
FILE_TYPES = TEXT_FILE_TYPES + ('tfrecord',)
SPLIT = 'infer'


@dataclasses.dataclass(frozen=True)
class FileTaskSpec:
  """Input files and which field holds the inputs (and the targets).

  file_patterns: glob patterns (local or gs://). TSV files start with a
  header row naming their columns; jsonl lines are JSON objects; TFRecord
  files hold tf.Example protos with bytes features.
  """
  file_patterns: Tuple[str, ...]
  file_type: str
  inputs_key: str
  vocabulary: Any
  targets_key: Optional[str] = None

  def __post_init__(self):
    if self.file_type not in FILE_TYPES:
      raise ValueError(f'INFER_FILE_TYPE {self.file_type!r} is not one of '
                       f'{FILE_TYPES}')
    if not self.file_patterns:
      raise ValueError('INFER_FILE_PATTERNS is empty; give at least one '
                       'file pattern')

  @property
  def task_name(self) -> str:
    key = json.dumps([list(self.file_patterns), self.file_type,
                      self.inputs_key, self.targets_key])
    return 'infer_files_' + hashlib.md5(key.encode()).hexdigest()[:10]

  def files(self):
    found = sorted({f for p in self.file_patterns for f in tf.io.gfile.glob(p)})
    if not found:
      raise ValueError(f'INFER_FILE_PATTERNS {list(self.file_patterns)} match '
                       'no files; check the patterns')
    return found


# Rows handed from Python to tf.data at a time: one from_generator element per
# row would cost more than the row's own parsing.
_ROWS_PER_BATCH = 1024
# Bytes read from a file at a time: files are read as streams, never whole.
_READ_BYTES = 1 << 20


def _lines(path: str):
  """The lines of a text file, '\n'-terminated, read in blocks."""
  with tf.io.gfile.GFile(path, 'rb') as f:
    rest = b''
    while True:
      block = f.read(_READ_BYTES)
      if not block:
        break
      lines = (rest + block).split(b'\n')
      rest = lines.pop()
      for line in lines:
        yield line.decode('utf-8') + '\n'
    if rest:
      yield rest.decode('utf-8')


def _text_rows(spec: FileTaskSpec, path: str):
  """(inputs, targets) strings of each record of one jsonl or TSV file."""
  if spec.file_type == 'jsonl':
    rows = (json.loads(line) for line in _lines(path) if line.strip())
  else:
    rows = csv.DictReader(_lines(path), delimiter='\t',
                          quoting=csv.QUOTE_NONE)
  for number, row in enumerate(rows, 1):
    if spec.inputs_key not in row:
      raise ValueError(f'{path} record {number} has no field '
                       f'{spec.inputs_key!r} (INFER_INPUTS_KEY); it has '
                       f'{sorted(row)}')
    targets = row.get(spec.targets_key, '') if spec.targets_key else ''
    yield str(row[spec.inputs_key]), str(targets)


def _text_batches(spec: FileTaskSpec, path: bytes):
  """_text_rows in lists of up to _ROWS_PER_BATCH (inputs, targets)."""
  inputs, targets = [], []
  for row_inputs, row_targets in _text_rows(spec, path.decode()):
    inputs.append(row_inputs)
    targets.append(row_targets)
    if len(inputs) == _ROWS_PER_BATCH:
      yield inputs, targets
      inputs, targets = [], []
  if inputs:
    yield inputs, targets


def shard_files(spec: FileTaskSpec, shard: int, num_shards: int):
  """The files of one input shard, as the task's FileDataSource shards them
  (file i belongs to shard i % num_shards) and reads them (one after
  another)."""
  found = spec.files()
  if len(found) < num_shards:
    raise ValueError(f'INFER_FILE_PATTERNS match {len(found)} file(s), fewer '
                     f'than the {num_shards} input shards asked for; set '
                     'infer.num_input_shards to at most the number of files')
  return found[shard::num_shards]


def shard_texts(spec: FileTaskSpec, shard: int, num_shards: int):
  """(inputs, targets) strings of each record of one input shard, in the
  order the task reads them; jsonl and TSV only (TFRecord files are read by
  the task's tf.data source)."""
  for path in shard_files(spec, shard, num_shards):
    yield from _text_rows(spec, path)


def tokenize(spec: FileTaskSpec, texts, length: int):
  """(token ids of each text as the task's preprocessors make them
  (seqio.preprocessors.tokenize, then append_eos_after_trim): the
  vocabulary's ids, cut to length - 1, then EOS; each text's length before
  the cut, EOS counted)."""
  vocabulary = spec.vocabulary
  eos = vocabulary.eos_id
  encoded = [vocabulary.encode(text) for text in texts]
  return ([ids[:length - 1] + [eos] for ids in encoded],
          [len(ids) + 1 for ids in encoded])


def _read_file_fn(spec: FileTaskSpec):
  def read(path):
    if spec.file_type == 'tfrecord':
      features = {spec.inputs_key: tf.io.FixedLenFeature([], tf.string)}
      if spec.targets_key:
        features[spec.targets_key] = tf.io.FixedLenFeature([], tf.string)

      def parse(record):
        example = tf.io.parse_single_example(record, features)
        return {'inputs': example[spec.inputs_key],
                'targets': (example[spec.targets_key] if spec.targets_key
                            else tf.constant(''))}
      return tf.data.TFRecordDataset(path).map(parse)
    return tf.data.Dataset.from_generator(
        lambda p: _text_batches(spec, p), args=(path,),
        output_signature=(tf.TensorSpec([None], tf.string),
                          tf.TensorSpec([None], tf.string))).unbatch().map(
                              lambda i, t: {'inputs': i, 'targets': t})
  return read


def check_fields(spec: FileTaskSpec):
  """ValueError when a file's first record lacks the inputs/targets field."""
  keys = [k for k in (spec.inputs_key, spec.targets_key) if k]
  for path in spec.files():
    if spec.file_type == 'tfrecord':
      fields = set()
      for record in tf.data.TFRecordDataset(path).take(1):
        example = tf.train.Example.FromString(record.numpy())
        fields = set(example.features.feature)
    else:
      with tf.io.gfile.GFile(path, 'r') as f:
        first = f.readline()
      if not first.strip():
        continue
      fields = (set(json.loads(first)) if spec.file_type == 'jsonl' else
                set(first.rstrip('\n').split('\t')))
    for key in keys:
      if fields and key not in fields:
        raise ValueError(
            f'{path}: the first record has no field {key!r} (set '
            f'INFER_INPUTS_KEY / INFER_TARGETS_KEY to one of {sorted(fields)})')


def register(spec: FileTaskSpec) -> str:
  """Registers (once) the task reading `spec`'s files; returns its name."""
  name = spec.task_name
  if name in seqio.TaskRegistry.names():
    return name
  check_fields(spec)
  features = {
      'inputs': seqio.Feature(spec.vocabulary, add_eos=True),
      'targets': seqio.Feature(spec.vocabulary, add_eos=True),
  }
  seqio.TaskRegistry.add(
      name,
      # A shard's files are read one after another (cycle_length=1), so
      # `shard_texts` reads them in the same order without tf.data.
      source=seqio.FileDataSource(
          read_file_fn=_read_file_fn(spec),
          split_to_filepattern={SPLIT: spec.files()}, cycle_length=1),
      preprocessors=[seqio.preprocessors.tokenize,
                     seqio.preprocessors.append_eos_after_trim],
      output_features=features)
  return name
