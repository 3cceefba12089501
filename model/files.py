"""File helpers for local paths and gs:// alike (through fsspec), used by the
checkpoint readers and by every pipeline stage.

The one promise that matters: `write_atomically` makes a file appear under
its final name only once its whole content is there, so a reader (or a
resumed run) never sees half a chunk. Writers use a unique temporary name,
so concurrent retries of the same chunk cannot interleave their bytes.
"""

import concurrent.futures
import contextlib
import hashlib
import json
import os
import uuid
from typing import Any, Dict, Iterator, List, Sequence

import fsspec

TEMP_PREFIX = '.inprogress-'


def filesystem(path: str):
  """The fsspec filesystem of `path`. Remote ones keep no listings cache:
  gcsfs would otherwise answer a directory's second listing (and existence
  checks under it) from its first, for the life of the process, blind to
  what other workers and the launcher wrote since (chunk files, heartbeats,
  locks)."""
  if _local(path) is None:
    return fsspec.core.url_to_fs(path, use_listings_cache=False)[0]
  return fsspec.core.url_to_fs(path)[0]


def join(base: str, *names: str) -> str:
  path = base.rstrip('/')
  for name in names:
    path += '/' + name
  return path


def _local(path: str):
  """The OS path of a local path (plain or file://), else None: local files
  skip fsspec's per-call work, which is most of a small write's cost."""
  if path.startswith('file://'):
    return path[len('file://'):]
  return None if '://' in path else path


def is_remote(path: str) -> bool:
  """Whether `path` is reached over a network (gs://), not the local disk."""
  return _local(path) is None


def exists(path: str) -> bool:
  local = _local(path)
  if local is not None:
    return os.path.exists(local)
  return filesystem(path).exists(path)


# Remote requests `map_concurrently` has in flight at once.
CONCURRENT_CHECKS = 16


def names_present(directory: str, names: Sequence[str],
                  prefixes: Sequence[str]) -> List[bool]:
  """Whether each of `names` (each starting with one of `prefixes`) is a
  file directly in `directory`. Remote: one listing of the entries that
  start with each prefix (GCS answers 1,000 a request), concurrently,
  instead of a few requests for each name; local: one check each."""
  local = _local(directory)
  if local is not None:
    return [os.path.exists(os.path.join(local, name)) for name in names]
  fs = filesystem(directory)

  def listed(prefix: str):
    return {os.path.basename(path) for path in fs.find(
        directory, prefix=prefix, maxdepth=1, update_cache=False)}
  found = set().union(*map_concurrently(listed, list(prefixes), True))
  return [name in found for name in names]


def map_concurrently(function, items: Sequence[Any],
                     remote: bool) -> List[Any]:
  """[function(item) for item in items], up to CONCURRENT_CHECKS at a time
  when they reach a `remote` store (round trips, not CPU, are their cost);
  one after another otherwise."""
  if not remote or len(items) < 2:
    return [function(item) for item in items]
  with concurrent.futures.ThreadPoolExecutor(
      min(CONCURRENT_CHECKS, len(items))) as pool:
    return list(pool.map(function, items))


def makedirs(path: str):
  filesystem(path).makedirs(path, exist_ok=True)


def list_names(directory: str) -> List[str]:
  """Base names of the files directly in `directory` ([] if it is absent)."""
  local = _local(directory)
  if local is not None:
    try:
      return sorted(os.listdir(local))
    except (FileNotFoundError, NotADirectoryError):
      return []
  return sorted(_listing(directory))  # one listing, no existence check


def _listing(directory: str) -> Dict[str, Dict[str, Any]]:
  """{base name: fsspec's entry} of what is directly in `directory` ({} if
  it is absent): one listing (gcsfs pages it), no request per file."""
  try:
    entries = filesystem(directory).ls(directory, detail=True)
  except FileNotFoundError:
    return {}
  return {os.path.basename(e['name'].rstrip('/')): e for e in entries}


def list_sizes(directory: str) -> Dict[str, int]:
  """{base name: bytes} of the files directly in `directory` ({} if it is
  absent), from one listing."""
  return {name: int(e.get('size') or 0)
          for name, e in _listing(directory).items()
          if e.get('type') != 'directory'}


def versions(paths: List[str]) -> Dict[str, str]:
  """{path: 'size:version'} of existing files, the version being GCS's
  generation or the modification time: one listing per directory."""
  out = {}
  by_directory = {}
  for path in paths:
    by_directory.setdefault(os.path.dirname(path), []).append(path)
  for directory, members in by_directory.items():
    entries = _listing(directory)
    for path in members:
      entry = (entries.get(os.path.basename(path)) or
               filesystem(path).info(path))
      version = entry.get('generation') or entry.get('mtime') or entry.get(
          'updated') or ''
      if hasattr(version, 'timestamp'):
        version = version.timestamp()
      out[path] = f'{int(entry.get("size") or 0)}:{version}'
  return out


def read_bytes(path: str) -> bytes:
  """The file's bytes (FileNotFoundError if it is absent): on GCS one
  download, with no request for its metadata first."""
  local = _local(path)
  if local is not None:
    with open(local, 'rb') as f:
      return f.read()
  return filesystem(path).cat_file(path)


def read_text(path: str) -> str:
  return read_bytes(path).decode('utf-8')


def read_json(path: str) -> Dict[str, Any]:
  return json.loads(read_bytes(path))


def is_dir(path: str) -> bool:
  return filesystem(path).isdir(path)


def _object_store(fs) -> bool:
  """Whether objects on `fs` appear only when their upload is finalized
  (GCS), so that writing straight to the final name is atomic."""
  protocols = (fs.protocol,) if isinstance(fs.protocol, str) else fs.protocol
  return bool({'gs', 'gcs'} & set(protocols))


@contextlib.contextmanager
def atomic_writer(path: str):
  """A binary file to stream into; it appears as `path` only once the block
  ends without an error. Files are written to a temporary name and renamed
  (removed on an error). On GCS an object appears only when its upload is
  finalized, so the upload goes straight to `path`: a small file in one
  request at the end, a larger one in blocks of a resumable upload that the
  last block finalizes; an error cancels the upload, and a worker that dies
  leaves no object (no temporary to copy, delete or clean up)."""
  directory, name = os.path.split(path)
  temporary = join(directory, f'{TEMP_PREFIX}{uuid.uuid4().hex}-{name}')
  local = _local(path)
  if local is not None:
    local_temporary = _local(temporary)
    os.makedirs(os.path.dirname(local) or '.', exist_ok=True)
    try:
      with open(local_temporary, 'wb') as f:
        yield f
    except BaseException:
      if os.path.exists(local_temporary):
        os.remove(local_temporary)
      raise
    os.replace(local_temporary, local)
    return
  fs = filesystem(path)
  if _object_store(fs):
    f = fs.open(path, 'wb')
    try:
      yield f
    except BaseException:
      _abandon(f)
      raise
    f.close()
    return
  fs.makedirs(directory, exist_ok=True)
  try:
    with fs.open(temporary, 'wb') as f:
      yield f
  except BaseException:
    if fs.exists(temporary):
      fs.rm(temporary)
    raise
  fs.mv(temporary, path)


def _abandon(f):
  """Drops a remote file being written without finalizing it: nothing it
  buffered is sent, and a resumable upload already begun is cancelled (if
  the cancel itself fails, the unfinalized upload never becomes an object
  and the store expires it)."""
  try:
    f.discard()
  except Exception:  # pylint: disable=broad-except
    pass
  # A file object closes itself when collected, which would upload what it
  # buffered: mark it closed first.
  f.closed = True


def write_atomically(path: str, data: bytes):
  """Writes `data` to `path` so that `path` exists only when complete: on
  GCS in one upload request (an object appears only when its upload ends;
  `atomic_writer`'s file would start a resumable upload: two requests)."""
  fs = None if _local(path) is not None else filesystem(path)
  if fs is not None and _object_store(fs):
    fs.pipe_file(path, data)
    return
  with atomic_writer(path) as f:
    f.write(data)


def write_json(path: str, value: Any):
  """`value` as indented JSON with sorted keys, written atomically (the
  run record, manifests, metrics)."""
  write_atomically(path, json.dumps(value, indent=2,
                                    sort_keys=True).encode('utf-8'))


def read_lines(path: str) -> Iterator[bytes]:
  """The lines of a file (with their b'\\n'), streamed."""
  local = _local(path)
  with (open(local, 'rb') if local is not None else
        filesystem(path).open(path, 'rb')) as f:
    yield from f


def create_exclusively(path: str, data: bytes):
  """Writes `data` to a new file `path`, whole; FileExistsError if `path`
  exists. Of concurrent creators exactly one succeeds: on local disk the
  complete file is hard-linked into place (link fails on an existing name),
  on GCS the upload carries ifGenerationMatch=0."""
  fs = filesystem(path)
  directory, name = os.path.split(path)
  fs.makedirs(directory, exist_ok=True)
  if 'file' in fs.protocol:
    local = fs._strip_protocol(path)  # pylint: disable=protected-access
    temporary = os.path.join(os.path.dirname(local),
                             f'{TEMP_PREFIX}{uuid.uuid4().hex}-{name}')
    with open(temporary, 'wb') as f:
      f.write(data)
    try:
      os.link(temporary, local)
    finally:
      os.remove(temporary)
  else:
    fs.pipe_file(path, data, mode='create')


def remove(path: str):
  fs = filesystem(path)
  if fs.exists(path):
    fs.rm(path, recursive=True)


def sha256(data: bytes) -> str:
  return hashlib.sha256(data).hexdigest()
