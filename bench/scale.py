"""Benchmark: does every step's cost grow with its own work only?

The demo model over generated jsonl inputs (4 files, batches of 32,
checkpoint_period 1, so a chunk is one batch), run as the whole command
(`python -m launch.infer`, DirectRunner) at two sizes 10x apart. For each it
prints: total wall time, time to the first chunk file (start-up and
planning), time after the last chunk (merge and manifest), steady time per
chunk and its overhead beyond the model's own time, the command's peak
memory, the model's examples/s of model time inside the run (the
manifest's: the time during which at least one of its calls ran) against
alone, its restore and compile seconds (the log's), and where the
command's CPU went per chunk in its steady state, by thread
(the main thread, XLA's compute pool and runtime threads, the chunk
writer, the rest; user and system time, from /proc on Linux). The model's
own examples/s on the same batches, in one stream and in two (as the
launcher's two worker threads drive it), is measured first, in this
process. Then it times planning a resumed run over 10^5 finished
chunk files, on local disk and on the loopback GCS server of the tests.
Not a test: run it by hand.

    .venv/bin/python bench/scale.py [--chunks 1000] [--factor 10] [--repeat 2]
        [--plan-chunks 100000] [--gcs-plan-chunks 10000] [--no-gcs]
        [--gcs-files] [--planning-only] [--dir /dev/shm]
        [--beam=--direct_num_workers=1 ...]
"""

import argparse
import json
import os
import random
import re
import shutil
import subprocess
import sys
import tempfile
import threading
import time

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, REPO)

BATCH = 32
GIN = """
include 'runs/infer_from_files.gin'
include 'models/t5beam_demo.gin'
CHECKPOINT_PATH = @t5beam.package_path()
t5beam.package_path.relative = 'launch/demo/checkpoint'
TASK_FEATURE_LENGTHS = {'inputs': 16, 'targets': 8}
INFER_TARGETS_KEY = 'targets'
RestoreCheckpointConfig.dtype = 'float32'
DatasetConfig.batch_size = %d
infer.checkpoint_period = 1
""" % BATCH


def write_inputs(directory: str, examples: int):
  """4 jsonl files of two-digit additions ("47 + 38" -> "85")."""
  os.makedirs(directory, exist_ok=True)
  rng = random.Random(examples)
  for f in range(4):
    with open(os.path.join(directory, f'part-{f}.jsonl'), 'w') as out:
      for _ in range(examples // 4):
        a, b = rng.randrange(10, 100), rng.randrange(10, 100)
        out.write(json.dumps({'inputs': f'{a} + {b}',
                              'targets': str(a + b)}) + '\n')
  return os.path.join(directory, '*.jsonl')


def gin_args(work: str, pattern: str, output: str):
  gin_file = os.path.join(work, 'scale.gin')
  with open(gin_file, 'w') as f:
    f.write(GIN)
  return [f'--gin_file={gin_file}',
          f'--gin.INFER_FILE_PATTERNS=["{pattern}"]',
          f'--gin.INFER_OUTPUT_DIR="{output}"']


def model_alone(work: str, pattern: str):
  """The demo model's examples/s on the task's own batches, no Beam: (one
  stream of calls, two streams on two threads as the launcher's two
  worker threads drive it)."""
  from model import runtime  # pylint: disable=g-import-not-at-top
  runtime.configure_xla_cpu()
  from launch import infer  # pylint: disable=g-import-not-at-top
  from pipeline import inference, plan, read  # pylint: disable=g-import-not-at-top
  import dataclasses  # pylint: disable=g-import-not-at-top
  args = gin_args(work, pattern, os.path.join(work, 'unused'))
  gin_files, bindings, paths, _ = infer.split_flags(args)
  infer.parse_gin(gin_files, bindings, paths)
  config, _ = infer.build_config()
  run_plan = plan.make_run_plan(config)
  task = run_plan.tasks[0]
  spec = dataclasses.replace(config.model,
                             model_config=infer.check_checkpoint(config.model))
  loaded = inference.load_model(spec)
  batches = [inference.pad_batch(chunk.features, BATCH)
             for shard in range(task.num_shards)
             for _, _, chunk in read.read_chunks(config, task.name, shard,
                                                 task.num_shards)]

  def run(part):
    for batch in part:
      loaded.run(batch)

  best = [0.0, 0.0]
  for _ in range(3):
    for streams in (1, 2):
      threads = [threading.Thread(target=run, args=(batches[i::streams],))
                 for i in range(streams)]
      start = time.perf_counter()
      for thread in threads:
        thread.start()
      for thread in threads:
        thread.join()
      best[streams - 1] = max(best[streams - 1], len(batches) * BATCH /
                              (time.perf_counter() - start))
  return tuple(best)


def timed_run(work: str, pattern: str, output: str, chunks: int,
              beam_args=()):
  """Runs the whole command (`chunks` chunks); (seconds to the first chunk
  file, to the last, to the end, peak RSS MB, manifest, steady_cpu's
  line)."""
  args = gin_args(work, pattern, output) + list(beam_args)
  seen = {'first': None, 'last': None, 'count': 0, 'pid': None, 'cpu': []}
  done = threading.Event()

  def watch():
    chunk_dir = None
    while not done.wait(0.1):
      if chunk_dir is None and os.path.isdir(output):
        found = [n for n in os.listdir(output) if n.startswith('tmp-')]
        chunk_dir = os.path.join(output, found[0]) if found else None
      if chunk_dir is None:
        continue
      try:
        count = sum(1 for e in os.scandir(chunk_dir)
                    if e.name.startswith('chunk-'))
      except FileNotFoundError:
        continue  # removed after the manifest
      now = time.perf_counter()
      if count and seen['first'] is None:
        seen['first'] = now
      if count > seen['count']:
        seen['count'], seen['last'] = count, now
      # The CPU of the command's threads at 10% and 90% of its chunks.
      marks = [chunks * p // 10 for p in (1, 9)][len(seen['cpu']):]
      if marks and count >= marks[0] and seen['pid']:
        seen['cpu'].append((count, thread_cpu(seen['pid'])))

  watcher = threading.Thread(target=watch, daemon=True)
  start = time.perf_counter()
  watcher.start()
  log_path = output + '.log'
  with open(log_path, 'wb') as log:
    process = subprocess.Popen(
        [sys.executable, '-m', 'launch.infer', *args], cwd=REPO,
        stdout=subprocess.DEVNULL, stderr=log)
    seen['pid'] = process.pid
    _, status, usage = os.wait4(process.pid, 0)
  end = time.perf_counter()
  done.set()
  watcher.join()
  if status:
    with open(log_path) as log:
      raise SystemExit(f'the run failed:\n{log.read()[-3000:]}')
  (manifest,) = [n for n in os.listdir(output) if n.endswith('manifest.json')]
  with open(os.path.join(output, manifest)) as f:
    manifest = json.load(f)
  return (seen['first'] - start, seen['last'] - start, end - start,
          usage.ru_maxrss / 1024, manifest, steady_cpu(process.pid,
                                                       seen['cpu']))


def thread_cpu(pid: int):
  """{thread id: (its name in the OS, user seconds, system seconds)} of a
  running process (Linux's /proc; {} elsewhere or once it has ended)."""
  ticks = os.sysconf('SC_CLK_TCK')
  threads = {}
  try:
    tids = os.listdir(f'/proc/{pid}/task')
  except OSError:
    return threads
  for tid in tids:
    try:
      with open(f'/proc/{pid}/task/{tid}/stat') as f:
        stat = f.read()
    except OSError:
      continue  # ended meanwhile
    name = stat[stat.index('(') + 1:stat.rindex(')')]
    fields = stat[stat.rindex(')') + 2:].split()  # from field 3, the state
    threads[int(tid)] = (name, int(fields[11]) / ticks,
                         int(fields[12]) / ticks)
  return threads


def steady_cpu(pid: int, marks) -> str:
  """Where the command's CPU went per chunk between two (chunks written,
  thread_cpu) marks, by thread: the worker's main thread (Beam, and the
  model's dispatch), XLA's compute pool and runtime threads, the chunk
  writer, the rest; user + system milliseconds."""
  if len(marks) < 2 or not marks[0][1] or marks[1][0] <= marks[0][0]:
    return 'no per-thread CPU (not Linux, or too few chunks)'
  from pipeline.infer_chunks import LOAD_THREAD  # pylint: disable=g-import-not-at-top
  (count0, before), (count1, after) = marks
  roles = {}
  for tid, (name, user, system) in after.items():
    _, user0, system0 = before.get(tid, (name, 0.0, 0.0))
    # A new thread takes its creator's OS name: XLA's runtime threads are
    # named after the thread that started JAX's backend, the model load.
    role = ('main thread' if tid == pid else
            'XLA compute pool' if name == 'tf_XLAEigen' else
            f'XLA runtime ({name})' if name == LOAD_THREAD else
            name if name.startswith('t5beam-') else 'other threads')
    spent = roles.setdefault(role, [0.0, 0.0])
    spent[0] += user - user0
    spent[1] += system - system0
  per_chunk = 1000 / (count1 - count0)
  parts = [f'{role} {user * per_chunk:.2f} + {system * per_chunk:.2f}'
           for role, (user, system) in sorted(
               roles.items(), key=lambda r: -sum(r[1])) if user + system]
  total = sum(sum(spent) for spent in roles.values()) * per_chunk
  return (f'CPU per chunk (ms, user + system): {"; ".join(parts)}; in all '
          f'{total:.2f}')


def load_report(output: str) -> str:
  """What the run's log says of its model load: restore and compilation
  seconds (the load overlaps the reading)."""
  with open(output + '.log') as log:
    found = re.search(r'loaded the model in ([0-9.]+) s .* compiled batch '
                      r'shape [0-9]+ in ([0-9.]+) s', log.read())
  if not found:
    return 'no model load in its log'
  return (f'model restored in {found[1]} s and compiled in {found[2]} s '
          '(while the shards were read)')


def plan_over_finished_chunks(root: str, chunks: int):
  """Seconds (wall, and this process's CPU) to plan a resume over `chunks`
  finished chunk files in `root` (a local directory or gs:// path), made
  there beforehand."""
  from pipeline import layout  # pylint: disable=g-import-not-at-top
  task_layout = layout.TaskLayout(root, 'bench', 'predict', 1, BATCH)
  start, cpu = time.perf_counter(), time.process_time()
  finished = task_layout.finished_chunks(4)
  seconds = time.perf_counter() - start
  cpu = time.process_time() - cpu
  assert len(finished) == chunks, (len(finished), chunks)
  return seconds, cpu


def make_chunk_files(directory: str, chunks: int, size: int = BATCH):
  """`chunks` small chunk files of 4 input shards, written directly."""
  from pipeline import layout  # pylint: disable=g-import-not-at-top
  os.makedirs(directory, exist_ok=True)
  line = b'{"inputs": {"inputs_pretokenized": "1 + 1"}, "prediction": "2"}\n'
  for i in range(chunks):
    name = layout.TaskLayout.chunk_name(i % 4, 4, i // 4)
    with open(os.path.join(directory, name), 'wb') as f:
      f.write(line * size)


def file_cost(directory: str, count: int = 500) -> float:
  """Milliseconds to create (and write 2 KB into) one new file there."""
  probe = os.path.join(directory, 'probe')
  os.makedirs(probe)
  start = time.perf_counter()
  for i in range(count):
    with open(os.path.join(probe, str(i)), 'wb') as f:
      f.write(b'.' * 2048)
  seconds = time.perf_counter() - start
  shutil.rmtree(probe)
  return 1000 * seconds / count


def wait_for_preload(host: str, bucket: str) -> float:
  """Seconds until the loopback server answers a listing of `bucket`: it
  answers once its -data preload is done."""
  import urllib.request  # pylint: disable=g-import-not-at-top
  opener = urllib.request.build_opener(urllib.request.ProxyHandler({}))
  start = time.perf_counter()
  with opener.open(f'{host}/storage/v1/b/{bucket}/o?maxResults=1',
                   timeout=3600) as response:
    response.read()
  return time.perf_counter() - start


def main():
  parser = argparse.ArgumentParser(description=__doc__.split('\n')[0])
  parser.add_argument('--chunks', type=int, default=1000)
  parser.add_argument('--factor', type=int, default=10)
  # Runs of each size, alternated (small, large, small, ...); the ratios
  # compare each size's fastest steady state.
  parser.add_argument('--repeat', type=int, default=1)
  parser.add_argument('--plan-chunks', type=int, default=100_000)
  # The loopback server preloads its data directory in time quadratic in
  # the object count (each object it adds scans the bucket's list: 12.7-22
  # s for 10^4 here, 84.5 s for 2x10^4, so by extrapolation most of an
  # hour for 10^5), so its default is smaller. The preload is waited for
  # and reported apart; only the listing is timed.
  parser.add_argument('--gcs-plan-chunks', type=int, default=10_000)
  parser.add_argument('--no-gcs', action='store_true')
  # The server's files backend preloads in linear time, so 10^5 objects
  # can be made; but it walks the whole bucket for every page of a listing
  # (1,000 objects), so the wall time is mostly the server's: the planning
  # process's own CPU time is printed beside it.
  parser.add_argument('--gcs-files', action='store_true')
  parser.add_argument('--planning-only', action='store_true')
  # Where inputs and outputs go (a temporary directory under it). Creating a
  # small file costs the kernel about 1 ms on some virtual disks (0.015 ms
  # on tmpfs): --dir /dev/shm separates the pipeline's own cost per chunk
  # from the disk's.
  parser.add_argument('--dir', default=None)
  # Beam options for the runs (repeat it), e.g. --beam=--direct_num_workers=1
  # for one worker thread instead of the launcher's default of two.
  parser.add_argument('--beam', action='append', default=[])
  parser.add_argument('--plan-only', help=argparse.SUPPRESS)
  args = parser.parse_args()
  if args.plan_only:  # the GCS planning child
    print(json.dumps(plan_over_finished_chunks(args.plan_only,
                                               args.plan_chunks)))
    return
  work = tempfile.mkdtemp(prefix='t5beam-scale-', dir=args.dir)
  print(f'files under {work}: creating a file takes {file_cost(work):.3f} ms '
        'here')
  try:
    if not args.planning_only:
      runs(args, work)
    planning(args, work)
  finally:
    shutil.rmtree(work, ignore_errors=True)


def runs(args, work):
  """The whole command at two sizes, against the model alone."""
  sizes = [args.chunks, args.chunks * args.factor]
  patterns = {n: write_inputs(os.path.join(work, f'in{n}'), n * BATCH)
              for n in sizes}
  rate, two_streams = model_alone(work, patterns[sizes[0]])
  print(f'model alone: {rate:.0f} examples/s (batches of {BATCH}, '
        f'demo model, float32; {two_streams:.0f} in two streams, as two '
        'worker threads drive it: the figures in brackets)')
  rows = {}  # (size index) -> [row of each of its runs]
  order = [(i, n) for _ in range(args.repeat) for i, n in enumerate(sizes)]
  for run, (i, n) in enumerate(order):  # `--factor 1`: one size twice
    output = os.path.join(work, f'out{run}-{n}')
    first, last, total, peak, manifest, cpu = timed_run(
        work, patterns[n], output, n, args.beam)
    examples = manifest['records']
    steady = last - first
    per_chunk = steady / max(n - 1, 1)
    rows.setdefault(i, []).append((n, examples, total, first, total - last,
                                   per_chunk, per_chunk - BATCH / rate, peak))
    print(f'{n} chunks ({examples} examples): {total:.1f} s in all '
          f'({examples / total / rate:.0%} of the model alone '
          f'[{examples / total / two_streams:.0%}]), '
          f'{first:.1f} s to the first chunk, {total - last:.1f} s after '
          f'the last; steady {1000 * per_chunk:.2f} ms per chunk '
          f'({BATCH / per_chunk / rate:.0%} of the model alone '
          f'[{BATCH / per_chunk / two_streams:.0%}]), overhead '
          f'{1000 * (per_chunk - BATCH / rate):.2f} ms per chunk; peak '
          f'{peak:.0f} MB')
    inside = manifest['this_run']['examples_per_second']
    print(f'  the model inside the run: {inside:.0f} examples/s of model '
          f'time ({inside / rate:.0%} of alone [{inside / two_streams:.0%}]; '
          'the time during which at least one of its calls ran); '
          f'{load_report(output)}')
    print(f'  steady state (10% to 90% of the chunks): {cpu}')
  # On a noisy host the fastest run of each size is the one least
  # disturbed: the ratios compare those.
  small, large = (min(rows[i], key=lambda row: row[5]) for i in (0, 1))
  best = ' (the fastest run of each size)' if args.repeat > 1 else ''
  print(f'per chunk, {args.factor}x larger / smaller: '
        f'{large[5] / small[5]:.3f}{best}; time after the last chunk as a '
        f'share of the run: {small[4] / small[2]:.1%} -> '
        f'{large[4] / large[2]:.1%}')


def planning(args, work):
  """Planning a resume over many finished chunk files: local, then GCS."""
  local = os.path.join(work, 'plan', 'tmp-bench-predict')
  make_chunk_files(local, args.plan_chunks)
  seconds, _ = plan_over_finished_chunks(os.path.dirname(local),
                                         args.plan_chunks)
  print(f'planning over {args.plan_chunks} finished chunk files, local '
        f'disk: {seconds:.2f} s')
  if args.no_gcs:
    return
  from tests import gcs_server  # pylint: disable=g-import-not-at-top
  data = os.path.join(work, 'gcs')
  make_chunk_files(os.path.join(data, 'bench-bucket', 'plan',
                                'tmp-bench-predict'), args.gcs_plan_chunks)
  start = time.perf_counter()
  root = os.path.join(work, 'gcs-root') if args.gcs_files else None
  with gcs_server.running_server(data_dir=data, filesystem_root=root) as env:
    preload = (time.perf_counter() - start
               + wait_for_preload(env['STORAGE_EMULATOR_HOST'], 'bench-bucket'))
    print(f'loopback GCS server ({"files" if root else "memory"}): '
          f'{args.gcs_plan_chunks} objects preloaded in {preload:.1f} s (the '
          "server's own start-up, not timed below)")
    child = subprocess.run(
        [sys.executable, __file__, '--plan-only', 'gs://bench-bucket/plan',
         '--plan-chunks', str(args.gcs_plan_chunks)], env=env, cwd=REPO,
        check=True, capture_output=True, text=True)
  seconds, cpu = json.loads(child.stdout.strip().splitlines()[-1])
  pages = -(-args.gcs_plan_chunks // 1000)
  print(f'planning over {args.gcs_plan_chunks} finished chunk files, GCS '
        f'(loopback server): {seconds:.2f} s ({pages} listing pages of '
        f'1,000; the planning process itself used {cpu:.2f} s of CPU)')


if __name__ == '__main__':
  main()
