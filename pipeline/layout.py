"""The output layout, defined once: the file names of every task's outputs
and of the run record, and which examples form which chunk. Reading,
inference, the merge, planning and the progress line all ask here. (The run
lock's files are pipeline.lock's; config.gin and model-info.txt the
launcher's.)

Layout of INFER_OUTPUT_DIR (one set per task; a Mixture gives one per
sub-task):

    t5beam-run.json                          the run's fingerprint, first
    tmp-{task}-{mode}/chunk-{S}-of-{N}-{C}.jsonl   finished chunks
    tmp-{task}-{mode}/count-{S}-of-{N}.json        examples per input shard
    {task}-{mode}.jsonl-{i:05d}-of-{n:05d}   merged records, input order
    {task}-{mode}.manifest.json              counts, checksums, fingerprint
    {task}-{mode}.jsonl-{i:05d}-of-{n:05d}.COMPLETED   markers, last

S, N and C are written with at least five digits, and read with any number.
A chunk is `chunk_size` consecutive examples of one input shard: example i
of a shard is in chunk i // chunk_size.
"""

import dataclasses
import json
import re
from typing import Dict, List, Optional, Sequence, Set, Tuple

from model import files

RUN_FILE = 't5beam-run.json'
MARKER_SUFFIX = '.COMPLETED'
_CHUNK_RE = re.compile(r'^chunk-(\d+)-of-(\d+)-(\d+)\.jsonl$')
_COUNT_RE = re.compile(r'^count-(\d+)-of-(\d+)\.json$')
_ERRORS_RE = re.compile(r'^errors-(\d+)-of-(\d+)\.jsonl$')


@dataclasses.dataclass(frozen=True)
class TaskLayout:
  """Where one task's files go, and how its shards divide into chunks."""
  output_dir: str
  task: str
  mode: str
  # None: chosen at merge time (num_output_shards='auto'); the manifest
  # records it.
  num_output_shards: Optional[int]
  chunk_size: int

  @property
  def stem(self) -> str:
    return f'{self.task}-{self.mode}'

  def owns(self, name: str) -> bool:
    """Whether `name` (in the output directory) is one of this task's."""
    return owned_by_task(name, self.task, self.mode)

  # --- chunk arithmetic --------------------------------------------------------

  def chunk_of(self, index: int) -> int:
    """The chunk holding example `index` of its input shard."""
    return index // self.chunk_size

  def chunk_sizes(self, examples: int) -> List[int]:
    """The record count of each chunk of a shard of `examples` examples."""
    return [min(self.chunk_size, examples - start)
            for start in range(0, examples, self.chunk_size)]

  # --- chunk files -------------------------------------------------------------

  @property
  def chunk_dir(self) -> str:
    return files.join(self.output_dir, f'tmp-{self.stem}')

  @staticmethod
  def chunk_name(shard: int, num_shards: int, chunk: int) -> str:
    return f'chunk-{shard:05d}-of-{num_shards:05d}-{chunk:05d}.jsonl'

  def written_chunks(self, shard: int, num_shards: int,
                     chunks: Sequence[int]) -> List[bool]:
    """Whether each chunk of the input shard has its file (a retried or
    duplicated bundle's). Listed by the names' prefix without the chunk
    number's last two digits: on GCS an element's consecutive chunks take
    one or two listings of about 100 names, not a few requests each."""
    names = [self.chunk_name(shard, num_shards, chunk) for chunk in chunks]
    suffix = len('.jsonl') + 2
    return files.names_present(self.chunk_dir, names,
                               sorted({name[:-suffix] for name in names}))

  def chunk_path(self, shard: int, num_shards: int, chunk: int) -> str:
    return files.join(self.chunk_dir, self.chunk_name(shard, num_shards, chunk))

  def count_path(self, shard: int, num_shards: int) -> str:
    """Written by the reader: the number of examples in one input shard."""
    return files.join(self.chunk_dir,
                      f'count-{shard:05d}-of-{num_shards:05d}.json')

  def finished_chunks(self, num_shards: int) -> Set[Tuple[int, int]]:
    """(input shard, chunk) of every complete chunk file, from one (paged)
    listing of the chunk directory's names."""
    return set(self._chunks_of(files.list_names(self.chunk_dir),
                               num_shards).values())

  def chunk_file_sizes(self, num_shards: int) -> Dict[Tuple[int, int], int]:
    """{(input shard, chunk): bytes} of every complete chunk file, from one
    listing with sizes (GCS lists them anyway; local disk stats each)."""
    sizes = files.list_sizes(self.chunk_dir)
    return {key: sizes[name]
            for name, key in self._chunks_of(sizes, num_shards).items()}

  @staticmethod
  def _chunks_of(names, num_shards: int) -> Dict[str, Tuple[int, int]]:
    found = {}
    for name in names:
      parsed = parse_chunk_name(name)
      if parsed and parsed[1] == num_shards:
        found[name] = (parsed[0], parsed[2])
    return found

  def shard_counts(self) -> Tuple[Optional[int], dict]:
    """(number of input shards, {shard: examples}) from the count files the
    readers wrote so far; (None, {}) before the first."""
    counts, num_shards = {}, None
    for name in files.list_names(self.chunk_dir):
      match = _COUNT_RE.match(name)
      if match:
        num_shards = int(match.group(2))
        counts[int(match.group(1))] = files.read_json(
            files.join(self.chunk_dir, name))['examples']
    return num_shards, counts

  # --- final files ---------------------------------------------------------------

  def output_name(self, index: int, num_files: Optional[int] = None) -> str:
    """Output file `index` of `num_files` (by default the configured
    number; with 'auto', the number the merge chose)."""
    num_files = num_files or self.num_output_shards
    return f'{self.stem}.jsonl-{index:05d}-of-{num_files:05d}'

  def output_path(self, index: int, num_files: Optional[int] = None) -> str:
    return files.join(self.output_dir, self.output_name(index, num_files))

  def marker_path(self, index: int, num_files: Optional[int] = None) -> str:
    return self.output_path(index, num_files) + MARKER_SUFFIX

  @property
  def manifest_path(self) -> str:
    return files.join(self.output_dir, f'{self.stem}.manifest.json')

  def errors_path(self, shard: Optional[int] = None,
                  num_shards: Optional[int] = None) -> str:
    """The task's bad input records: `{stem}.errors.jsonl`, or one input
    shard's in the chunk directory."""
    if shard is None:
      return files.join(self.output_dir, f'{self.stem}.errors.jsonl')
    return files.join(self.chunk_dir,
                      f'errors-{shard:05d}-of-{num_shards:05d}.jsonl')

  def shards_with_bad_records_of(self, path: str) -> List[Tuple[int, int]]:
    """(shard, number of shards) of each input shard whose bad records, as
    last read, include one of the input file `path`."""
    if not files.exists(self.chunk_dir):
      return []
    found = []
    for name in files.list_names(self.chunk_dir):
      match = _ERRORS_RE.match(name)
      if match and any(
          json.loads(line)['file'] == path
          for line in files.read_lines(files.join(self.chunk_dir, name))):
        found.append((int(match.group(1)), int(match.group(2))))
    return found

  def remove_shard_chunks(self, shard: int, num_shards: int):
    """Removes the finished chunk files of one input shard."""
    names = files.list_names(self.chunk_dir)
    for name, (chunk_shard, _) in self._chunks_of(names, num_shards).items():
      if chunk_shard == shard:
        files.remove(files.join(self.chunk_dir, name))

  @property
  def metrics_path(self) -> str:
    return files.join(self.output_dir, f'{self.stem}.metrics.json')


def owned_by_task(name: str, task: str, mode: str) -> bool:
  """Whether `name` in an output directory is one of the files of `task`'s
  outputs in `mode` (its chunk directory, outputs, markers, manifest)."""
  stem = f'{task}-{mode}'
  return name == f'tmp-{stem}' or name.startswith(f'{stem}.')


def parse_chunk_name(name: str) -> Optional[Tuple[int, int, int]]:
  """(shard, number of shards, chunk) of a chunk file name, else None."""
  match = _CHUNK_RE.match(name)
  return tuple(int(g) for g in match.groups()) if match else None


def run_file(output_dir: str) -> str:
  return files.join(output_dir, RUN_FILE)
