"""Inference over chunks: ((task, shard), chunks) -> each chunk's jsonl file.

The model side is `pipeline.inference`, the seam T5ModelHandler uses too;
what is here is the pipeline's own: chunk files written atomically, records
with their `inputs`, counters, and the run lock's heartbeat.
"""

import concurrent.futures
import dataclasses
import json
import logging
import os
import threading
import time
from typing import Dict, List, Optional, Tuple

import apache_beam as beam
from apache_beam.metrics import Metrics
from apache_beam.utils import shared

from model import files
from model import runtime
from pipeline import inference, lock, plan
from pipeline.config import InferConfig
from pipeline.inference import NAMESPACE

# Failure injection for tests of Beam's retries: "task:shard:chunk=marker"
# raises once, in the middle of that chunk's inference, unless `marker`
# exists (it is created when the fault fires).
FAULT_ONCE_ENV = 'T5BEAM_INJECT_FAULT_ONCE'


def _maybe_inject_fault(task_name: str, shard: int, chunk: int):
  spec = os.environ.get(FAULT_ONCE_ENV)
  if not spec:
    return
  target, marker = spec.split('=', 1)
  if target == f'{task_name}:{shard}:{chunk}' and not os.path.exists(marker):
    with open(marker, 'w') as f:
      f.write(str(os.getpid()))
    raise RuntimeError(f'{FAULT_ONCE_ENV}: injected fault in {target}')


def record_line(inputs_json: str, record: Dict) -> str:
  """One output line: the record with its `inputs` (already JSON) first,
  the bytes json.dumps({'inputs': inputs, **record}) would give."""
  rest = json.dumps(record)
  return ('{"inputs": ' + inputs_json + (', ' + rest[1:] if record else '}')
          + '\n')


@dataclasses.dataclass(frozen=True)
class ChunkStats:
  """What inferring some chunks took (one element's; chunks finished by an
  earlier run have none)."""
  chunks: int
  examples: int
  decoded_tokens: int
  seconds: float
  # The worker's device mesh: (data axis, model axis).
  mesh: Tuple[int, int] = (1, 1)


# Chunk files a DoFn may have waiting to be written while it infers on, and
# the threads writing them. A local write is the kernel's work, done by one
# thread; a write to GCS is a few requests (upload, then the move into
# place) that mostly wait: with 20 ms per request a chunk file takes 180 ms
# on one thread and 24 ms each on 8, which small chunks need to keep up
# with an accelerator.
MAX_PENDING_WRITES = 4
REMOTE_WRITERS = 8
REMOTE_PENDING_WRITES = 16
# Thread names, in Python and in the operating system (`top -H`; the
# benchmarks account CPU time by them): at most 15 bytes. A thread takes
# its creator's OS name, so XLA's runtime threads, which the model load
# starts with JAX's backend, are 't5beam-model' too.
LOAD_THREAD = 't5beam-model'
WRITER_THREAD = 't5beam-writer'
# A worker logs its progress at most this often (and after its first chunk),
# not once per chunk: a billion examples are hundreds of thousands of chunks.
LOG_EVERY_SECONDS = 60.0
COUNTERS = ('model_loads', 'startup_milliseconds', 'chunks_already_written',
            'examples_inferred', 'batches', 'chunks_inferred',
            'decoded_tokens')


class ModelLoader:
  """The run's model, loaded once per worker process and shared by every
  DoFn and thread of that process that asks (Beam's `Shared`).

  `start` begins the load on a background thread and returns at once: the
  reading step calls it at its first chunk still to infer, so that a
  worker restores and compiles the model while it reads its input shards.
  On a batch runner inference starts only once every shard is read (the
  shuffle between them is a barrier), so a load begun by the inference
  step would sit between the two: minutes for a large checkpoint on GCS.
  `acquire` returns the model, waiting for a load in progress; it raises
  the load's error (a failed background load is only logged, and
  `acquire` tries again)."""

  def __init__(self, config: InferConfig, fingerprint: str):
    self._spec = config.model
    self._queue_rows = config.chunk_size
    self._tag = f'{config.model.checkpoint_path}:{fingerprint}'
    self._handle = shared.Shared()

  def acquire(self) -> inference.LoadedModel:
    return self._handle.acquire(
        lambda: inference.load_model(self._spec, self._queue_rows),
        tag=self._tag)

  def start(self) -> List[inference.LoadedModel]:
    """Starts loading the model on a background thread of this process
    (which finds it at once if it is loaded, or waits for a load in
    progress); returns a list that will hold it: keep the list while the
    model should stay loaded."""
    holder = []

    def load():
      runtime.name_os_thread(LOAD_THREAD)
      try:
        holder.append(self.acquire())
      except Exception:  # pylint: disable=broad-except
        logging.warning('t5beam: loading the model ahead of inference '
                        'failed; inference loads it again', exc_info=True)

    threading.Thread(target=load, name=LOAD_THREAD,
                     daemon=True).start()
    return holder


class InferChunk(beam.DoFn):
  """((task, input shard), [(chunk, Chunk), ...]) -> each chunk's jsonl
  file; yields the element's ChunkStats.

  The model is loaded in `setup` (or earlier, by the reading step: see
  ModelLoader), once per worker process, and shared by the DoFn instances
  of that process's threads. A chunk's records are made and
  its file written by background threads while the model runs the next
  chunk; the bundle ends only once every file of it is written (a failed
  record or write fails the bundle, which Beam retries), so a committed
  bundle's chunks are all on disk.
  """

  def __init__(self, config: InferConfig, fingerprint: str,
               num_shards: Dict[str, int],
               lock_ref: Optional[lock.LockRef] = None,
               loader: Optional[ModelLoader] = None):
    self._config = config
    self._loader = loader or ModelLoader(config, fingerprint)
    self._num_shards = dict(num_shards)  # input shards of each task
    self._lock_ref = lock_ref
    self._vocabularies = {}

  def setup(self):
    runtime.keep_tensorflow_off_accelerators()
    plan.prepare_tasks(self._config)
    self._model = self._loader.acquire()
    lock.worker_heartbeat(self._lock_ref)
    remote = files.is_remote(self._config.output_dir)
    self._max_pending = REMOTE_PENDING_WRITES if remote else MAX_PENDING_WRITES
    self._writer = concurrent.futures.ThreadPoolExecutor(
        REMOTE_WRITERS if remote else 1,
        thread_name_prefix=WRITER_THREAD,
        initializer=runtime.name_os_thread, initargs=(WRITER_THREAD,))
    self._pending = []
    self._counters = {name: Metrics.counter(NAMESPACE, name)
                      for name in COUNTERS}
    self._progress = _ProgressLog()

  def start_bundle(self):
    self._pending = []

  def finish_bundle(self):
    self._wait_for_writes(0)

  def teardown(self):
    writer = getattr(self, '_writer', None)
    if writer is not None:
      writer.shutdown(wait=True)

  def _wait_for_writes(self, keep: int):
    """Waits until at most `keep` chunk files are still being written;
    raises the first write's error."""
    while len(self._pending) > keep:
      self._pending.pop(0).result()

  def _write(self, path: str, inputs, vocabulary, outputs, count: int):
    """Makes a chunk's records from the model's outputs and writes its file
    (on a writer thread, while the model runs the next chunk)."""
    inferences = inference.records(self._config.model, vocabulary, outputs,
                                   count)
    files.write_atomically(path, ''.join(
        record_line(line_inputs, record)
        for line_inputs, record in zip(inputs, inferences)).encode('utf-8'))
    lock.worker_heartbeat(self._lock_ref)

  def _vocabulary(self, task_name: str):
    if task_name not in self._vocabularies:
      import seqio  # pylint: disable=g-import-not-at-top
      task = seqio.get_mixture_or_task(task_name)
      self._vocabularies[task_name] = task.output_features['targets'].vocabulary
    return self._vocabularies[task_name]

  def process(self, element):
    (task_name, shard), chunks = element
    counters = self._counters
    startup = self._model.take_load_report()
    if startup is not None:
      counters['model_loads'].inc()
      counters['startup_milliseconds'].inc(int(1000 * startup))
    task_layout = self._config.layout(task_name)
    num_shards = self._num_shards[task_name]
    paths = [task_layout.chunk_path(shard, num_shards, chunk)
             for chunk, _ in chunks]
    written = task_layout.written_chunks(shard, num_shards,
                                         [chunk for chunk, _ in chunks])
    done = examples = decoded = 0
    seconds = 0.0
    for (chunk, data), path, already in zip(chunks, paths, written):
      if already:
        # A retried or duplicated bundle: the chunk is already complete.
        counters['chunks_already_written'].inc()
        continue
      chunk_tokens, chunk_seconds = self._infer(task_name, shard, chunk,
                                                data, path)
      done += 1
      examples += len(data)
      decoded += chunk_tokens
      seconds += chunk_seconds
    if not done:
      return
    counters['examples_inferred'].inc(examples)
    counters['chunks_inferred'].inc(done)
    counters['decoded_tokens'].inc(decoded)
    self._progress.add(task_name, shard, chunks[-1][0], done, examples,
                       seconds)
    mesh = self._model.mesh_shape()
    yield task_name, ChunkStats(done, examples, decoded, seconds,
                                (mesh['data'], mesh['model']))

  def _infer(self, task_name: str, shard: int, chunk: int, data, path: str):
    """Runs the model on one chunk and hands its outputs to a writer thread,
    which makes the records and writes the file (`path`): (decoded tokens,
    seconds of model time)."""
    config = self._config
    outputs, count, decoded_tokens, seconds = inference.run_examples(
        self._model, config.model, data.features,
        [(task_name, shard, data.first + i) for i in range(len(data))],
        queue_rows=config.chunk_size)
    _maybe_inject_fault(task_name, shard, chunk)
    self._wait_for_writes(self._max_pending - 1)
    self._pending.append(self._writer.submit(
        self._write, path, data.inputs, self._vocabulary(task_name), outputs,
        count))
    self._counters['batches'].inc(-(-len(data) // config.model.batch_size))
    return decoded_tokens, seconds


class _ProgressLog:
  """A worker's progress line: after its first chunk, then at most every
  LOG_EVERY_SECONDS, with what it did since the last line."""

  def __init__(self):
    self._last = None
    self._chunks = self._examples = 0
    self._seconds = 0.0

  def add(self, task_name: str, shard: int, chunk: int, chunks: int,
          examples: int, seconds: float):
    self._chunks += chunks
    self._examples += examples
    self._seconds += seconds
    now = time.monotonic()
    if self._last is not None and now - self._last < LOG_EVERY_SECONDS:
      return
    logging.info('t5beam: %d chunk(s), %d examples inferred in %.1f s of '
                 'model time (%.1f examples/s); last: %s shard %d chunk %d',
                 self._chunks, self._examples, self._seconds,
                 self._examples / max(self._seconds, 1e-9), task_name, shard,
                 chunk)
    self._last = now
    self._chunks = self._examples = 0
    self._seconds = 0.0
