"""One live run per output directory: a lock file with a heartbeat and expiry.

A scheduler may start a run while the previous one on the same output
directory is still going. The lock makes the second refuse, with a message
naming the live run, and lets a later run take over the lock of a run that
died (its heartbeat stopped for longer than its expiry).

The lock is a file `t5beam-run.lock-{generation}` in the output directory.
Taking it means creating the next generation's file exclusively (a hard
link on local disk, `ifGenerationMatch=0` on GCS), so of runs racing for
the same generation exactly one wins, whether the directory was free or held
by a dead run. The owner rewrites its file with a fresh `heartbeat` time:
the launcher from a thread while it waits for the job, and the workers after
each chunk, so a job that outlives its launcher (a Flex Template launch, a
Dataflow job) keeps its lock alive. A local run's launcher removes the file
at the end; a remote or non-waiting job's last step does.
"""

import dataclasses
import json
import logging
import os
import re
import socket
import threading
import time
import uuid
from typing import Dict, List, Optional, Tuple

from model import files
from pipeline.plan import PlanError

LOCK_PREFIX = 't5beam-run.lock-'
_LOCK_RE = re.compile(r'^t5beam-run\.lock-(\d{8})$')
# Workers heartbeat into objects of their own, one per worker process:
# `t5beam-run.beat-{generation}-{worker}`. GCS allows about one write per
# second to one object; each of these is written at most once per heartbeat
# interval, whatever the number of workers.
BEAT_PREFIX = 't5beam-run.beat-'
DEFAULT_EXPIRY_SECONDS = 900.0


class LockHeldError(PlanError):
  """Another live run holds the output directory."""


def new_owner() -> str:
  """An identity for one launch: host, process and a random part."""
  return f'{socket.gethostname()}:{os.getpid()}:{uuid.uuid4().hex[:8]}'


@dataclasses.dataclass(frozen=True)
class Holder:
  """What a lock file says: who holds it and since when."""
  generation: int
  owner: str
  started: float
  heartbeat: float
  expiry_seconds: float
  description: str = ''
  # The launcher process holds the run (it waits for the job): when that
  # process is gone, so is the run, whatever the heartbeat says.
  bound_to_process: bool = False

  def age(self, now: float) -> float:
    return now - self.heartbeat

  def is_live(self, now: float) -> bool:
    return self.age(now) < self.expiry_seconds


def _lock_path(output_dir: str, generation: int) -> str:
  return files.join(output_dir, f'{LOCK_PREFIX}{generation:08d}')


def _generations(names: List[str]):
  found = []
  for name in names:
    match = _LOCK_RE.match(name)
    if match:
      found.append(int(match.group(1)))
  return sorted(found)


def _beat_prefix(generation: int) -> str:
  return f'{BEAT_PREFIX}{generation:08d}-'


def _beat_names(names: List[str], generation: int):
  prefix = _beat_prefix(generation)
  return [n for n in names if n.startswith(prefix)]


def _newest_beat(output_dir: str, names: List[str],
                 generation: int) -> Optional[dict]:
  """The freshest worker heartbeat of a lock generation, or None."""
  newest = None
  for name in _beat_names(names, generation):
    try:
      beat = json.loads(files.read_text(files.join(output_dir, name)))
    except (FileNotFoundError, ValueError):
      continue
    if newest is None or beat['heartbeat'] > newest['heartbeat']:
      newest = beat
  return newest


def current_holder(output_dir: str) -> Optional[Holder]:
  """The newest lock in `output_dir`, or None when it is free. Its
  heartbeat is the freshest of the lock file's and its workers'; once a
  worker has heartbeat, the workers' expiry applies."""
  for _ in range(10):
    names = files.list_names(output_dir)  # locks and beats, one listing
    generations = _generations(names)
    if not generations:
      return None
    path = _lock_path(output_dir, generations[-1])
    try:
      record = json.loads(files.read_text(path))
    except FileNotFoundError:
      continue  # taken over or released since the listing: list again
    except ValueError:
      # Lock files appear whole; an unreadable one is a holder of unknown
      # liveness, and expires with the default expiry.
      record = {'owner': 'unknown', 'started': 0, 'heartbeat': 0}
    heartbeat_at = record['heartbeat']
    expiry = record.get('expiry_seconds', DEFAULT_EXPIRY_SECONDS)
    beat = _newest_beat(output_dir, names, generations[-1])
    if beat is not None:
      heartbeat_at = max(heartbeat_at, beat['heartbeat'])
      expiry = beat['expiry_seconds']
    return Holder(generations[-1], record['owner'], record['started'],
                  heartbeat_at, expiry, record.get('description', ''),
                  record.get('bound_to_process', False))
  raise LockHeldError(f'INFER_OUTPUT_DIR {output_dir!r}: its run lock keeps '
                      'changing hands; retry later')


def _record(owner: str, started: float, now: float, expiry_seconds: float,
            description: str, bound_to_process: bool) -> bytes:
  return json.dumps({'owner': owner, 'started': started, 'heartbeat': now,
                     'expiry_seconds': expiry_seconds,
                     'description': description,
                     'bound_to_process': bound_to_process},
                    indent=2).encode('utf-8')


def _process_is_gone(holder: Holder) -> bool:
  """True when the holder's launcher ran on this host and has exited (a
  killed local run), so its lock need not wait out its expiry."""
  host, _, rest = holder.owner.partition(':')
  pid = rest.partition(':')[0]
  if not holder.bound_to_process or host != socket.gethostname() or (
      not pid.isdigit()):
    return False
  try:
    os.kill(int(pid), 0)
  except ProcessLookupError:
    return True
  except PermissionError:
    return False
  return False


def _describe(holder: Holder, now: float) -> str:
  what = f' ({holder.description})' if holder.description else ''
  return (f'run {holder.owner}{what}, started '
          f'{time.strftime("%Y-%m-%d %H:%M:%S UTC", time.gmtime(holder.started))}'
          f', last heartbeat {holder.age(now):.0f} s ago')


def acquire(output_dir: str, owner: str,
            expiry_seconds: float = DEFAULT_EXPIRY_SECONDS,
            description: str = '', bound_to_process: bool = False) -> int:
  """Takes the output directory's lock for `owner`; returns its generation.

  Raises LockHeldError while another run's heartbeat is fresher than its
  expiry. A stale lock is taken over (and its file removed), as is the lock
  of a launcher on this host that has exited (`bound_to_process`).
  """
  files.makedirs(output_dir)
  for _ in range(5):
    now = time.time()
    holder = current_holder(output_dir)
    if holder is not None and holder.owner == owner:
      return holder.generation
    if (holder is not None and holder.is_live(now) and
        not _process_is_gone(holder)):
      raise LockHeldError(
          f'INFER_OUTPUT_DIR {output_dir!r} is in use by another live '
          f'{_describe(holder, now)}: wait for it, or use another '
          'directory')
    generation = holder.generation + 1 if holder else 1
    path = _lock_path(output_dir, generation)
    try:
      files.create_exclusively(path, _record(
          owner, now, now, expiry_seconds, description, bound_to_process))
    except FileExistsError:
      continue  # another run took this generation first: look again
    if holder is not None:
      logging.warning('t5beam: took over the stale lock of %s',
                      _describe(holder, now))
      _remove_lock(output_dir, holder.generation)
    return generation
  raise LockHeldError(f'INFER_OUTPUT_DIR {output_dir!r}: could not take the '
                      'run lock while other runs kept taking it; retry later')


def _owned_record(path: str, owner: str) -> Optional[dict]:
  """The lock file's record if it exists and `owner` holds it, else None."""
  try:
    record = json.loads(files.read_text(path))
  except (FileNotFoundError, ValueError):
    return None
  return record if record.get('owner') == owner else None


def heartbeat(output_dir: str, owner: str, generation: int,
              expiry_seconds: Optional[float] = None) -> bool:
  """Refreshes `owner`'s lock, and sets its expiry if given; False when the
  lock is no longer `owner`'s."""
  path = _lock_path(output_dir, generation)
  record = _owned_record(path, owner)
  if record is None:
    return False
  record['heartbeat'] = time.time()
  if expiry_seconds is not None:
    record['expiry_seconds'] = expiry_seconds
  files.write_atomically(path, json.dumps(record, indent=2).encode('utf-8'))
  return True


def release(output_dir: str, owner: str, generation: int):
  """Removes `owner`'s lock file (nothing if another run has taken over)."""
  path = _lock_path(output_dir, generation)
  if _owned_record(path, owner) is not None:
    _remove_lock(output_dir, generation)


def _remove_lock(output_dir: str, generation: int):
  """Removes a lock file, then its workers' heartbeat objects."""
  files.remove(_lock_path(output_dir, generation))
  for name in _beat_names(files.list_names(output_dir), generation):
    files.remove(files.join(output_dir, name))


@dataclasses.dataclass(frozen=True)
class LockRef:
  """What the launcher and the workers need to refresh the run's lock."""
  output_dir: str
  owner: str
  generation: int
  expiry_seconds: float
  # The job's last step removes the lock (remote or non-waiting runs).
  release_at_end: bool = False
  # Such a job's lock expires this long after its launcher's last heartbeat
  # until a worker heartbeats (VMs, image and model can be slow to start).
  startup_seconds: float = 0.0

  @property
  def startup_expiry_seconds(self) -> float:
    """The expiry written when the lock is taken."""
    if not self.release_at_end:
      return self.expiry_seconds
    return max(self.expiry_seconds, self.startup_seconds)

  @property
  def heartbeat_interval(self) -> float:
    return min(60.0, max(0.5, self.expiry_seconds / 6))


class Heartbeat:
  """Refreshes a lock every heartbeat interval from a daemon thread."""

  def __init__(self, ref: LockRef):
    self._ref = ref
    self._stop = threading.Event()
    self._thread = threading.Thread(target=self._run, daemon=True,
                                    name='t5beam-lock-heartbeat')

  def _run(self):
    ref = self._ref
    while not self._stop.wait(ref.heartbeat_interval):
      try:
        if not heartbeat(ref.output_dir, ref.owner, ref.generation):
          holder = current_holder(ref.output_dir)
          if holder is not None and holder.owner != ref.owner:
            logging.warning('t5beam: the run lock in %s was taken over by '
                            '%s', ref.output_dir, holder.owner)
          return  # taken over, or released by the job's last step
      except Exception:  # pylint: disable=broad-except
        logging.warning('t5beam: lock heartbeat failed; will retry',
                        exc_info=True)

  def __enter__(self):
    self._thread.start()
    return self

  def __exit__(self, *unused):
    self._stop.set()
    self._thread.join(timeout=self._ref.heartbeat_interval + 5)


_last_beats: Dict[Tuple[str, str, int, str], float] = {}
_beats_lock = threading.Lock()


def worker_name() -> str:
  """This worker process's name in its heartbeat object."""
  return re.sub(r'[^A-Za-z0-9_.-]', '_', f'{socket.gethostname()}-'
                f'{os.getpid()}')


def worker_heartbeat(ref: Optional[LockRef], worker: Optional[str] = None,
                     now: Optional[float] = None):
  """Called by workers as they finish work: writes this worker's own
  heartbeat object, at most once per heartbeat interval. The first worker
  heartbeat also ends the job's start-up expiry (`startup_expiry_seconds`):
  from then on the lock expires `ref.expiry_seconds` after the freshest
  heartbeat. `worker` and `now` default to this process and the clock."""
  if ref is None:
    return
  worker = worker or worker_name()
  now = time.time() if now is None else now
  key = (ref.output_dir, ref.owner, ref.generation, worker)
  with _beats_lock:  # a worker's chunk writers call this from threads
    if now - _last_beats.get(key, float('-inf')) < ref.heartbeat_interval:
      return
    _last_beats[key] = now
  path = files.join(ref.output_dir,
                    f'{_beat_prefix(ref.generation)}{worker}')
  try:
    if not files.exists(_lock_path(ref.output_dir, ref.generation)):
      return  # released, or taken over: nothing to keep alive
    files.write_atomically(path, json.dumps({
        'owner': ref.owner, 'worker': worker, 'heartbeat': now,
        'expiry_seconds': ref.expiry_seconds}).encode('utf-8'))
  except Exception:  # pylint: disable=broad-except
    logging.warning('t5beam: lock heartbeat failed', exc_info=True)
