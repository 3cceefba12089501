"""The t5beam command line: a T5X inference Gin file, run as a Beam pipeline.

    python -m launch.infer --gin_file=my_infer.gin \\
        --gin.INFER_OUTPUT_DIR=\\"/tmp/out\\" [--gin.NAME=VALUE ...] \\
        [--gin_bindings=...] [--gin_search_paths=a,b] [Beam options ...]

Every flag that is not a Gin flag goes to Beam as a pipeline option
(`--runner=DataflowRunner --project=...`). Without `--runner` the job runs
locally on Beam's FnApiRunner (the DirectRunner's engine), which needs no
network. Configuration errors stop here, before any worker starts, with one
line naming what is wrong and what to do.
"""

import gc

# The command starts (TensorFlow, JAX, Beam, Gin: millions of objects that
# live as long as the process) with Python's cycle collector off: its full
# passes over that growing heap took 1.2 of the 7 s before the first chunk
# of a local run. `_main` turns it back on once the plan is made, with what
# start-up built frozen out of its passes (`_start_collector`).
if __name__ == '__main__':
  gc.disable()

import dataclasses  # pylint: disable=g-import-not-at-top,g-bad-import-order
import difflib
import inspect
import logging
import math
import os
import re
import sys
import time
import tokenize
from typing import List, Optional, Sequence, Tuple

from launch import gin_config, progress, t5x_names

LOCAL_RUNNERS = ('FnApiRunner', 'DirectRunner', 'BundleBasedDirectRunner',
                 'SwitchingDirectRunner')


class LaunchError(Exception):
  """A problem the user must fix; its message is one line saying what."""


# A refusal is one short line: under 200 characters besides the paths it
# names (tests hold every refusal to that), each path at most PATH_LIMIT,
# shortened in its middle.
PATH_LIMIT = 64
_PATH = re.compile(r"[\w.~:-]*/[^\s'\",;()]+")


def short_path(path: str) -> str:
  if len(path) <= PATH_LIMIT:
    return path
  keep = (PATH_LIMIT - 3) // 2
  return f'{path[:keep]}...{path[-keep:]}'


def one_line(message: str) -> str:
  """A refusal as printed: on one line, its long paths shortened."""
  return _PATH.sub(lambda m: short_path(m.group()), ' '.join(message.split()))


def split_flags(argv: Sequence[str]) -> Tuple[List[str], List[str], List[str],
                                               List[str]]:
  """(gin files, gin bindings, search paths, Beam arguments) from argv.

  `--flagfile=PATH` reads more flags from a file, one per line ('#' starts
  a comment line), in place: launch/dataflow/gpu.flags for example."""
  gin_files, bindings, search_paths, beam_args = [], [], [], []
  args = list(argv)
  i = 0
  while i < len(args):
    arg = args[i]
    name, has_value, value = arg.partition('=')
    if name == '--flagfile':
      args[i + 1:i + 1] = read_flagfile(value if has_value else '')
      i += 1
      continue
    takes_value = name in ('--gin_file', '--gin_bindings', '--gin_search_paths')
    if takes_value and not has_value:
      if i + 1 >= len(args):
        raise LaunchError(f'{name} needs a value')
      value = args[i + 1]
      i += 1
    if name == '--gin_file':
      gin_files.append(value)
    elif name == '--gin_bindings':
      bindings.append(value)
    elif name == '--gin_search_paths':
      search_paths.extend(p for p in value.split(',') if p)
    elif name.startswith('--gin.'):
      if not has_value:
        raise LaunchError(f'{arg}: write --gin.NAME=VALUE')
      bindings.append(f'{name[len("--gin."):]} = {value}')
    else:
      beam_args.append(arg)
    i += 1
  return gin_files, bindings, search_paths, beam_args


def read_flagfile(path: str) -> List[str]:
  if not path:
    raise LaunchError('write --flagfile=PATH')
  try:
    with open(path, encoding='utf-8') as f:
      lines = [line.strip() for line in f]
  except OSError as e:
    raise LaunchError(f'--flagfile {path!r} cannot be read: {e.strerror}; '
                      'check the path') from e
  flags = [line for line in lines if line and not line.startswith('#')]
  bad = [line for line in flags if not line.startswith('--')]
  if bad:
    raise LaunchError(f'--flagfile {path!r}: {bad[0]!r} is not a flag; write '
                      'one --name=value per line')
  return flags


class _QuietGinLookups(logging.Filter):
  """Drops Gin's own log lines about looking for an include as a Python
  package resource ('Path not found: runs/infer.gin', logged as errors on
  every run) before it finds the file on the search path; a file found
  nowhere is still refused with one line."""

  def filter(self, record: logging.LogRecord) -> bool:
    return not record.pathname.endswith(
        os.path.join('gin', 'resource_reader.py'))


def parse_gin(gin_files: Sequence[str], bindings: Sequence[str],
              search_paths: Sequence[str]):
  """Parses Gin files and bindings; LaunchError on any Gin problem."""
  import gin  # pylint: disable=g-import-not-at-top
  gin.clear_config()
  for path in list(search_paths) + [gin_config.CONFIG_DIR, '.']:
    gin.add_config_file_search_path(path)
  if not gin_files:
    raise LaunchError('no --gin_file given; pass a Gin file that includes '
                      "'runs/infer.gin' (see the README)")
  source = None
  lookups = _QuietGinLookups()
  logging.getLogger().addFilter(lookups)
  try:
    for source in gin_files:
      gin.parse_config_file(source)
    source = '--gin bindings'
    gin.parse_config(bindings)
  except SyntaxError as e:
    raise LaunchError(f'Gin syntax error in {e.filename}:{e.lineno}: '
                      f'{e.msg}') from e
  except tokenize.TokenError as e:
    message, (line, _) = e.args
    raise LaunchError(f'Gin syntax error in {source} (or a file it '
                      f'includes) at line {line}: {message}; look for an '
                      'unclosed bracket or quote') from e
  except IOError as e:
    raise LaunchError(f'Gin file not found: {e}; check --gin_file and '
                      '--gin_search_paths') from e
  except Exception as e:  # pylint: disable=broad-except
    raise LaunchError(describe_gin_error(e, source)) from e
  finally:
    logging.getLogger().removeFilter(lookups)
  for macro in gin_config.REQUIRED_MACROS + gin_config.OPTIONAL_REQUIRED:
    try:
      value = gin.query_parameter(f'%{macro}')
    except ValueError:
      if macro in gin_config.OPTIONAL_REQUIRED:
        continue  # not defined by the files in use
      value = gin.REQUIRED
    if value is gin.REQUIRED or repr(value) == '%gin.REQUIRED':
      if macro == 'DROPOUT_RATE':
        raise LaunchError(
            "macro DROPOUT_RATE is required by T5X's model files (unused at "
            'inference): set DROPOUT_RATE = 0.0 in your Gin file')
      raise LaunchError(
          f'required macro {macro} is not set; set it in your Gin file or '
          f'pass --gin.{macro}=...')


_GIN_LOCATION = re.compile(r'In (?:file "([^"]+)", line|bindings string '
                           r'line) (\d+)')


def describe_gin_error(error: Exception, source: str) -> str:
  """Gin's error as one line: what is unknown, where it was bound (file
  and line), and the closest known name."""
  import gin  # pylint: disable=g-import-not-at-top
  text = str(error)
  first = text.strip().split('\n')[0].strip()
  found = _GIN_LOCATION.search(text)
  where = source
  if found:
    where = f'{found[1] or source}:{found[2]}'
  match = re.match(r"Configurable '([^']+)' doesn't have a parameter named "
                   r"'([^']+)'", first)
  if match:
    name, parameter = match.groups()
    try:
      wrapped = gin.config._REGISTRY.get_match(name).wrapped  # pylint: disable=protected-access
      known = list(inspect.signature(wrapped).parameters)
    except (ValueError, TypeError, AttributeError):
      known = []
    return (f'Gin: {name} has no parameter {parameter!r} ({where})'
            f'{_closest(parameter, known)}')
  match = re.match(r"Couldn't resolve selector [^;]+; <module '([^']+)'.*> "
                   r'has no attribute (\w+)', first)
  if match:
    module, name = match.groups()
    known = [n for n in dir(sys.modules.get(module)) if not n.startswith('_')]
    return (f'Gin: {module} has no {name!r} ({where}){_closest(name, known)}')
  match = re.match(r"No module named '([^']+)'", first)
  if match:
    module = match[1]
    if t5x_names.is_t5x_import(module):
      return (f"Gin: t5beam does not provide T5X's module {module} ({where})"
              f'{_closest(module, list(t5x_names.MODULES))}')
    return (f'Gin: cannot import {module} ({where}): check that it is '
            'installed and on PYTHONPATH')
  match = re.match(r"No configurable matching '([^']+)'", first)
  if match:
    name = match[1]
    selectors = [selector for selector, _ in gin.config._REGISTRY.items()]  # pylint: disable=protected-access
    depth = name.count('.') + 1
    known = sorted({'.'.join(s.split('.')[-depth:]) for s in selectors})
    return (f'Gin: no configurable {name!r} ({where}){_closest(name, known)}')
  return f'Gin configuration error in {where}: {first}'


def _closest(name: str, known: Sequence[str]) -> str:
  close = difflib.get_close_matches(name, known, n=1, cutoff=0.6)
  return f'; did you mean {close[0]!r}?' if close else ''


def build_config():
  """The InferConfig and the model (a gin_config.GinModel: its
  vocabularies) the parsed Gin config describes."""
  try:
    config = gin_config.infer()
    model = gin_config.bound_model()
  except (ValueError, TypeError) as e:
    # Gin adds lines saying which configurable raised: the first is ours.
    raise LaunchError(str(e).strip().split('\n')[0]) from e
  # Modules the Gin files import to register tasks (T5X's files do, e.g.
  # `from t5.data import mixtures`): workers import them too.
  modules = tuple(sorted({statement.module for statement in _gin_imports()
                          if not t5x_names.is_t5x_import(statement.module)}))
  return dataclasses.replace(config, task_modules=modules), model


def _gin_imports():
  import gin  # pylint: disable=g-import-not-at-top
  return gin.config._IMPORTS  # pylint: disable=protected-access


def check_checkpoint(spec):
  """The checkpoint exists, is readable, and agrees with the model spec.

  Returns the architecture (from the model spec or the checkpoint)."""
  from model import checkpoints  # pylint: disable=g-import-not-at-top
  try:
    return checkpoints.resolve_architecture(spec.checkpoint_path,
                                            spec.model_config)
  except checkpoints.CheckpointError as e:
    raise LaunchError(str(e)) from e


def worker_devices(options) -> Optional[Tuple[str, int]]:
  """(accelerator type, devices per worker VM) that Dataflow's
  `worker_accelerator` service option asks for, or None when the flags do
  not say (a CPU job, or a runner that is not Dataflow)."""
  from apache_beam.options.pipeline_options import GoogleCloudOptions  # pylint: disable=g-import-not-at-top
  service_options = options.view_as(GoogleCloudOptions).dataflow_service_options
  for option in service_options or ():
    name, _, value = option.partition('=')
    if name != 'worker_accelerator':
      continue
    fields = dict(part.partition(':')[::2] for part in value.split(';'))
    try:
      if 'topology' in fields:  # TPU: chips = the topology's product
        sizes = [int(s) for s in fields['topology'].lower().split('x')]
        return fields.get('type', 'tpu'), math.prod(sizes)
      return fields.get('type', 'gpu'), int(fields.get('count', 1))
    except ValueError:
      raise LaunchError(
          f'--dataflow_service_options=worker_accelerator={value}: cannot '
          'read the devices per worker; write type:TYPE;count:N for GPUs '
          'or type:TYPE;topology:AxB for TPUs') from None
  return None


def check_mesh(config, architecture, options):
  """The model axis divides the model's dimensions; on Dataflow, where the
  flags say each worker's devices, also the devices and the batch, and the
  estimated memory per device fits theirs. Logs the estimate."""
  from model import memory, partitioning  # pylint: disable=g-import-not-at-top
  spec = config.model
  model_axis = spec.partitioning.model_axis_size
  devices = worker_devices(options)
  try:
    spec.partitioning.check_model(architecture)
    data = 1
    if devices is not None:
      mesh = spec.partitioning.make_mesh([_FlagDevice(devices[0])] *
                                         devices[1])
      partitioning.check_batch(spec.batch_size, mesh)
      data = mesh.shape[partitioning.DATA]
  except partitioning.PartitioningError as e:
    raise LaunchError(str(e)) from e
  settings = _memory_settings(spec)
  need = memory.estimate(architecture, batch_size=spec.batch_size, data=data,
                         model=model_axis, **settings)
  where = (f'a ({data}, {model_axis}) mesh of {devices[1]} {devices[0]}'
           if devices else f'a model axis of {model_axis} (data axis: the '
           'other devices of the worker; estimated for one)')
  capacity = memory.ACCELERATOR_MEMORY.get(devices[0]) if devices else None
  usable = capacity * memory.USABLE_FRACTION if capacity else None
  has = (f'; a {devices[0]} has {capacity / memory.GiB:.1f} GiB, of which '
         f'a run may plan on {usable / memory.GiB:.1f} GiB' if capacity else
         '' if devices is None else
         f'; the memory of a {devices[0]} is not known here, so not checked')
  logging.info('t5beam: estimated memory: %s on %s%s', need.describe(), where,
               has)
  if capacity is None or config.skip_memory_check or need.total <= usable:
    return
  fits, _ = memory.smallest_fitting_model_axis(
      architecture, devices[1], capacity, batch_size=spec.batch_size,
      **settings)
  fix = (f'set partitioning.PjitPartitioner.num_partitions = {fits}'
         if fits else 'no model axis fits: use a smaller batch_size, '
         'bfloat16 or a bigger accelerator')
  # The estimate's parts are in the log line above.
  raise LaunchError(
      f'the run needs {need.total / memory.GiB:.2f} GiB per device '
      f'(parameters {need.parameters / memory.GiB:.2f}) but a {devices[0]} '
      f'has {capacity / memory.GiB:.1f} GiB, {usable / memory.GiB:.1f} '
      f'usable: {fix}, or infer.skip_memory_check=True')


def _memory_settings(spec):
  """The memory estimate's settings from a model spec."""
  return dict(input_length=spec.input_length,
              target_length=spec.target_length, mode=spec.mode,
              strategy=spec.decoding.strategy,
              num_decodes=spec.decoding.num_decodes,
              param_dtype=spec.restore_dtype,
              activation_dtype=spec.activation_dtype,
              rules=spec.partitioning.logical_axis_rules)


class _FlagDevice:
  """A device a worker will have, as the flags describe it (for checking a
  mesh's arithmetic at launch; never used to run anything)."""

  def __init__(self, platform: str):
    self.platform = platform


def check_vocabularies(tasks, model):
  """Every task's inputs and targets vocabularies equal the model's
  (`model`: a gin_config.GinModel)."""
  if model.vocabulary is None:
    logging.info('t5beam: no model VOCABULARY in the Gin config; the tasks\' '
                 'vocabularies are not checked')
    return
  expected = {'inputs': model.vocabulary, 'targets': model.targets_vocabulary}
  for task in tasks:
    for name, vocabulary in expected.items():
      feature = task.output_features.get(name)
      if feature is not None and feature.vocabulary != vocabulary:
        raise LaunchError(
            f'task {task.name!r} feature {name!r} has '
            f'{_describe(feature.vocabulary)}, the model '
            f'{_describe(vocabulary)}: set VOCABULARY to the model\'s, or '
            'use a matching task')


def _describe(vocabulary) -> str:
  path = getattr(vocabulary, 'sentencepiece_model_file', None)
  return (f'{type(vocabulary).__name__} {path}' if path else
          f'{type(vocabulary).__name__} of {vocabulary.vocab_size} ids')


def write_run_info(config):
  """config.gin (the operative Gin config) and model-info.txt, as T5X."""
  import gin  # pylint: disable=g-import-not-at-top
  from model import checkpoints  # pylint: disable=g-import-not-at-top
  from model import files  # pylint: disable=g-import-not-at-top
  files.write_atomically(files.join(config.output_dir, 'config.gin'),
                         gin.operative_config_str().encode('utf-8'))
  from model import partitioning  # pylint: disable=g-import-not-at-top
  architecture = config.model.model_config
  rules = config.model.partitioning.logical_axis_rules
  specs = partitioning.parameter_specs(architecture, rules)
  lines = [f'# {config.model.checkpoint_path}', f'# {architecture}',
           f'# model axis (num_partitions): '
           f'{config.model.partitioning.model_axis_size}; the data axis is '
           'every other device of a worker',
           f'# {"parameter":<68} {"shape":<16} logical axes -> partition spec']
  for name, shape in checkpoints.expected_shapes(architecture).items():
    axes, spec = specs[name]
    lines.append(f'{name:<70} {str(shape):<16} {axes} -> {spec}')
  lines.append(f'# total parameters: {architecture.num_parameters():,}')
  files.write_atomically(files.join(config.output_dir, 'model-info.txt'),
                         ('\n'.join(lines) + '\n').encode('utf-8'))


# A run given no runner runs on FnApiRunner with this many worker threads
# in the launcher's process (unless a --direct_* option says otherwise):
# two chunks in flight keep a second core, or the accelerator, busy while
# the other thread does a chunk's host work.
LOCAL_THREADS = 2


def pipeline_options(beam_args: Sequence[str]):
  from apache_beam.options.pipeline_options import PipelineOptions  # pylint: disable=g-import-not-at-top
  from apache_beam.options.pipeline_options import StandardOptions  # pylint: disable=g-import-not-at-top
  args = list(beam_args)
  options = PipelineOptions(args)
  if options.view_as(StandardOptions).runner is None:
    args.append('--runner=FnApiRunner')
    if not any(arg.startswith(('--direct_running_mode',
                               '--direct_num_workers')) for arg in args):
      args += ['--direct_running_mode=multi_threading',
               f'--direct_num_workers={LOCAL_THREADS}']
    options = PipelineOptions(args)
  return options


def prepare(argv: Sequence[str]):
  """Everything before the pipeline: (run plan, Beam options). Tasks are
  resolved, the checkpoint checked (its architecture goes into the plan's
  model spec) and the fingerprint computed here, once. LaunchError on any
  configuration problem; nothing is written before all checks pass."""
  from pipeline import plan  # pylint: disable=g-import-not-at-top
  gin_files, bindings, search_paths, beam_args = split_flags(argv)
  parse_gin(gin_files, bindings, search_paths)
  config, model = build_config()
  options = pipeline_options(beam_args)
  try:
    tasks = plan.resolve_tasks(config)
  except plan.PlanError as e:
    raise LaunchError(str(e)) from e
  architecture = check_checkpoint(config.model)
  check_mesh(config, architecture, options)
  check_vocabularies(tasks, model)
  config = dataclasses.replace(config, model=dataclasses.replace(
      config.model, model_config=architecture))
  return plan.make_run_plan(config, tasks), options


def command() -> int:
  """The installed `t5beam-infer` command: `main`, with start-up's cycle
  collection deferred as `python -m launch.infer` does."""
  gc.disable()
  return main()


def _start_collector():
  """Turns the cycle collector back on if start-up turned it off, with
  every object made so far frozen (never scanned again: they live as long
  as the process). Callers of `main` that left it on are not touched."""
  if not gc.isenabled():
    gc.freeze()
    gc.enable()


def main(argv: Optional[Sequence[str]] = None) -> int:
  """The command; T5X's Gin module paths are provided while it runs (Gin
  imports them again when it writes config.gin)."""
  with t5x_names.provided():
    return _main(sys.argv[1:] if argv is None else argv)


def _main(argv: Sequence[str]) -> int:
  logging.basicConfig(level=logging.INFO, format='%(message)s')
  for noisy in ('absl', 'apache_beam', 'jax', 'tensorflow', 'orbax',
                'etils'):
    logging.getLogger(noisy).setLevel(logging.WARNING)
  from model import runtime  # pylint: disable=g-import-not-at-top
  # Before JAX starts; local worker processes inherit the setting.
  runtime.configure_xla_cpu()
  from apache_beam.options.pipeline_options import StandardOptions  # pylint: disable=g-import-not-at-top
  from apache_beam.options.pipeline_options import TestOptions  # pylint: disable=g-import-not-at-top
  from pipeline import plan  # pylint: disable=g-import-not-at-top
  from pipeline.run import run_inference  # pylint: disable=g-import-not-at-top
  started = time.time()
  try:
    run_plan, options = prepare(argv)
  except (LaunchError, plan.PlanError) as e:
    print(f't5beam: error: {one_line(str(e))}', file=sys.stderr)
    return 2
  finally:
    _start_collector()
  config = run_plan.config
  runner = options.view_as(StandardOptions).runner or ''
  reporter = None
  if (runner.split('.')[-1] in LOCAL_RUNNERS and '://' not in config.output_dir
      and not options.view_as(TestOptions).dry_run):
    reporter = progress.ProgressReporter(config, run_plan.task_names)
  try:
    result = run_inference(
        run_plan, options,
        on_claimed=lambda c: _start(c, reporter))
  except plan.PlanError as e:  # a different run, or a live one, holds the dir
    print(f't5beam: error: {one_line(str(e))}', file=sys.stderr)
    return 2
  except Exception as e:  # pylint: disable=broad-except
    logging.exception('t5beam: the pipeline failed')
    last = ' '.join(str(e).split())[-500:]
    print(f't5beam: error: the pipeline failed: {last}; finished chunks are '
          'kept, rerun the same command to resume', file=sys.stderr)
    return 1
  finally:
    if reporter:
      reporter.stop()
  if result.status == 'dry_run':
    print(f't5beam: dry run: built the pipeline for {result.tasks} writing to '
          f'{config.output_dir}; nothing was run or written', file=sys.stderr)
  elif result.status == 'submitted':
    job_id = getattr(result.beam_result, 'job_id', lambda: None)()
    print(f't5beam: submitted job {job_id or ""} for {result.tasks}; it '
          f'writes to {config.output_dir} and releases the run lock when it '
          'ends. Rerun the same command to check it or to resume it.',
          file=sys.stderr)
  else:
    print(progress.summary(config, result, time.time() - started),
          file=sys.stderr)
  if result.failures:
    why = next(iter(result.failures.values()))
    print(f't5beam: error: {one_line(why)}; fix them and rerun (finished '
          'chunks are kept) or raise the limit', file=sys.stderr)
    return 1
  failed = [m['metrics_error'] for m in result.manifests.values()
            if 'metrics_error' in m]
  if failed:
    print(f't5beam: error: {one_line(failed[0])}; the outputs are complete: '
          'fix it and rerun to compute the metrics', file=sys.stderr)
    return 1
  return 0


def _start(config, reporter):
  """Once the run holds its output directory: config.gin, model-info.txt,
  and the progress line."""
  write_run_info(config)
  if reporter:
    reporter.start()


if __name__ == '__main__':
  sys.exit(main())
