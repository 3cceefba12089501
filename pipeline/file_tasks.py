"""SeqIO tasks over plain input files, for inference without a registered task
(what T5X's infer_from_tfexample_file.gin does, for more file types).

A `FileTaskSpec` is plain data: the launcher builds it from Gin and every
worker registers the same task from it, so no user module is needed.
"""

import dataclasses
import hashlib
import json
from typing import Any, Callable, Iterator, Optional, Tuple

import seqio
import tensorflow as tf

# Every type is read in Python, record by record: a bad record is reported
# and skipped, never failing the read.
FILE_TYPES = ('jsonl', 'tsv', 'tfrecord')
SPLIT = 'infer'
# How much of a bad record's raw text the errors file keeps.
RAW_CHARACTERS = 1000


@dataclasses.dataclass(frozen=True)
class BadRecord:
  """A record that cannot be read: its file, its line (jsonl, TSV; the
  header is line 1) or record (TFRecord) number, the problem, and the
  first RAW_CHARACTERS of it."""
  file: str
  number: int
  problem: str
  raw: str = ''

  def describe(self, file_type: str) -> str:
    unit = 'record' if file_type == 'tfrecord' else 'line'
    return f'{self.file} {unit} {self.number}: {self.problem}'

  def to_json(self) -> str:
    return json.dumps(dataclasses.asdict(self), sort_keys=True)


def _raising(spec: 'FileTaskSpec'):
  def report(bad: BadRecord):
    raise ValueError(bad.describe(spec.file_type))
  return report


def _skipping(bad: BadRecord):
  del bad


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


def _lines(path: str) -> Iterator[bytes]:
  """The lines of a text file as bytes, without their '\n', read in
  blocks."""
  with tf.io.gfile.GFile(path, 'rb') as f:
    rest = b''
    while True:
      block = f.read(_READ_BYTES)
      if not block:
        break
      lines = (rest + block).split(b'\n')
      rest = lines.pop()
      yield from lines
    if rest:
      yield rest


def _raw(data: bytes) -> str:
  return data[:4 * RAW_CHARACTERS].decode('utf-8', errors='replace')[
      :RAW_CHARACTERS]


def _text_rows(spec: FileTaskSpec, path: str,
               bad: Optional[Callable[[BadRecord], None]] = None):
  """(inputs, targets) strings of each good record of one file, in order;
  each bad one goes to `bad` (by default: ValueError naming it) and is not
  yielded."""
  bad = bad or _raising(spec)
  if spec.file_type == 'tfrecord':
    yield from _tfrecord_rows(spec, path, bad)
    return
  header = None
  for number, line in enumerate(_lines(path), 1):
    line = line.rstrip(b'\r')
    if not (line.strip() if spec.file_type == 'jsonl' else line):
      continue  # blank lines hold no record (in jsonl, whitespace either)
    try:
      text = line.decode('utf-8')
    except UnicodeDecodeError as e:
      bad(BadRecord(path, number, f'not UTF-8 ({e.reason} at byte '
                                  f'{e.start})', _raw(line)))
      continue
    if spec.file_type == 'jsonl':
      try:
        row = json.loads(text)
      except ValueError as e:
        bad(BadRecord(path, number, f'not JSON ({e})', _raw(line)))
        continue
      if not isinstance(row, dict):
        bad(BadRecord(path, number, 'not a JSON object', _raw(line)))
        continue
    elif header is None:
      header = text.split('\t')
      if spec.inputs_key not in header:
        bad(BadRecord(path, number, f'the header has no column '
                                    f'{spec.inputs_key!r} (INFER_INPUTS_KEY);'
                                    ' the file is skipped', _raw(line)))
        return
      continue
    else:
      fields = text.split('\t')
      if len(fields) != len(header):
        bad(BadRecord(path, number, f'{len(fields)} columns, the header '
                                    f'has {len(header)}', _raw(line)))
        continue
      row = dict(zip(header, fields))
    problem = _check_fields(spec, row)
    if problem:
      bad(BadRecord(path, number, problem, _raw(line)))
      continue
    yield row[spec.inputs_key], (row.get(spec.targets_key, '')
                                 if spec.targets_key else '')


def _check_fields(spec: FileTaskSpec, row, targets_required: bool = False,
                  not_text: str = 'is not a string') -> Optional[str]:
  """What is wrong with a record's fields (None: nothing). A field that is
  present but not text (None in `row`, or not a str) is `not_text`."""
  if spec.inputs_key not in row:
    return f'no field {spec.inputs_key!r} (INFER_INPUTS_KEY)'
  for key in (spec.inputs_key, spec.targets_key):
    if key and key in row and not isinstance(row[key], str):
      return f'field {key!r} {not_text}'
  if targets_required and spec.targets_key and spec.targets_key not in row:
    return f'no field {spec.targets_key!r} (INFER_TARGETS_KEY)'
  return None


def _tfrecord_rows(spec: FileTaskSpec, path: str,
                   bad: Callable[[BadRecord], None]):
  """_text_rows of a TFRecord file of tf.Examples with bytes features. A
  file damaged mid-way cannot be read past the damage: that is reported
  as a bad record at the record where reading stopped."""
  from google.protobuf import message  # pylint: disable=g-import-not-at-top
  records = iter(tf.data.TFRecordDataset(path).as_numpy_iterator())
  number = 0
  while True:
    try:
      record = next(records)
    except StopIteration:
      return
    except tf.errors.OpError as e:
      bad(BadRecord(path, number + 1, f'the file is damaged; reading stopped '
                                      f'here ({type(e).__name__})'))
      return
    number += 1
    try:
      features = tf.train.Example.FromString(record).features.feature
    except message.DecodeError:
      bad(BadRecord(path, number, 'not a tf.Example', _raw(record)))
      continue
    row = {}
    for key in (spec.inputs_key, spec.targets_key):
      if key and key in features:
        values = features[key].bytes_list.value
        try:
          row[key] = values[0].decode('utf-8') if len(values) == 1 else None
        except UnicodeDecodeError:
          row[key] = None
    # tf.Examples hold every field they name (as FixedLenFeature reads).
    problem = _check_fields(spec, row, targets_required=True,
                            not_text='is not one UTF-8 bytes value')
    if problem:
      bad(BadRecord(path, number, problem, _raw(record)))
      continue
    yield row[spec.inputs_key], row.get(spec.targets_key, '')


def _text_batches(spec: FileTaskSpec, path: bytes):
  """_text_rows in lists of up to _ROWS_PER_BATCH (inputs, targets); bad
  records are skipped, as the pipeline's reader skips them."""
  inputs, targets = [], []
  for row_inputs, row_targets in _text_rows(spec, path.decode(), _skipping):
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


def shard_texts(spec: FileTaskSpec, shard: int, num_shards: int,
                bad: Optional[Callable[[BadRecord], None]] = None):
  """(inputs, targets) strings of each good record of one input shard, in
  the order the task reads them; bad records go to `bad` (by default:
  ValueError)."""
  for path in shard_files(spec, shard, num_shards):
    yield from _text_rows(spec, path, bad)


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
      try:
        fields = (set(json.loads(first)) if spec.file_type == 'jsonl' else
                  set(first.rstrip('\n').split('\t')))
      except (ValueError, TypeError):
        continue  # a bad first record: reported when the file is read
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
