"""SeqIO tasks over plain input files, for inference without a registered task
(what T5X's infer_from_tfexample_file.gin does, for more file types).

A `FileTaskSpec` is plain data: the launcher builds it from Gin and every
worker registers the same task from it, so no user module is needed.
"""

import csv
import dataclasses
import hashlib
import io
import json
from typing import Any, Optional, Tuple

import seqio
import tensorflow as tf

FILE_TYPES = ('jsonl', 'tsv', 'tfrecord')
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


def _text_rows(spec: FileTaskSpec, path: bytes):
  """(inputs, targets) strings of one jsonl or TSV file."""
  with tf.io.gfile.GFile(path.decode(), 'r') as f:
    text = f.read()
  if spec.file_type == 'jsonl':
    rows = (json.loads(line) for line in text.splitlines() if line.strip())
  else:
    rows = csv.DictReader(io.StringIO(text), delimiter='\t',
                          quoting=csv.QUOTE_NONE)
  for number, row in enumerate(rows, 1):
    if spec.inputs_key not in row:
      raise ValueError(f'{path.decode()} record {number} has no field '
                       f'{spec.inputs_key!r} (INFER_INPUTS_KEY); it has '
                       f'{sorted(row)}')
    targets = row.get(spec.targets_key, '') if spec.targets_key else ''
    yield str(row[spec.inputs_key]), str(targets)


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
        lambda p: _text_rows(spec, p), args=(path,),
        output_signature=(tf.TensorSpec([], tf.string),
                          tf.TensorSpec([], tf.string))).map(
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
      source=seqio.FileDataSource(
          read_file_fn=_read_file_fn(spec),
          split_to_filepattern={SPLIT: spec.files()}),
      preprocessors=[seqio.preprocessors.tokenize,
                     seqio.preprocessors.append_eos_after_trim],
      output_features=features)
  return name
