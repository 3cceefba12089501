"""File helpers for local paths and gs:// alike (through fsspec), used by the
checkpoint readers and by every pipeline stage.

The one promise that matters: `write_atomically` makes a file appear under
its final name only once its whole content is there, so a reader (or a
resumed run) never sees half a chunk. Writers use a unique temporary name,
so concurrent retries of the same chunk cannot interleave their bytes.
"""

import hashlib
import json
import os
import uuid
from typing import Any, Dict, List

import fsspec

TEMP_PREFIX = '.inprogress-'


def filesystem(path: str):
  return fsspec.core.url_to_fs(path)[0]


def join(base: str, *names: str) -> str:
  path = base.rstrip('/')
  for name in names:
    path += '/' + name
  return path


def exists(path: str) -> bool:
  return filesystem(path).exists(path)


def makedirs(path: str):
  filesystem(path).makedirs(path, exist_ok=True)


def list_names(directory: str) -> List[str]:
  """Base names of the files directly in `directory` ([] if it is absent)."""
  fs = filesystem(directory)
  if not fs.exists(directory):
    return []
  return sorted(os.path.basename(p.rstrip('/'))
                for p in fs.ls(directory, detail=False))


def read_bytes(path: str) -> bytes:
  with fsspec.open(path, 'rb') as f:
    return f.read()


def read_text(path: str) -> str:
  return read_bytes(path).decode('utf-8')


def read_json(path: str) -> Dict[str, Any]:
  return json.loads(read_bytes(path))


def is_dir(path: str) -> bool:
  return filesystem(path).isdir(path)


def write_atomically(path: str, data: bytes):
  """Writes `data` to `path` so that `path` exists only when complete."""
  directory, name = os.path.split(path)
  temporary = join(directory, f'{TEMP_PREFIX}{uuid.uuid4().hex}-{name}')
  fs = filesystem(path)
  fs.makedirs(directory, exist_ok=True)
  with fs.open(temporary, 'wb') as f:
    f.write(data)
  fs.mv(temporary, path)


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
