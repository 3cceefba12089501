"""The Dataflow Flex Template entry point: template parameters -> launch.infer.

A Flex Template launch (Cloud Scheduler, Airflow, `gcloud dataflow
flex-template run`) calls this file with the parameters of
launch/dataflow/flex/metadata.json as `--name=value` flags, plus Dataflow's
own options. The parameters become Gin bindings; every other flag goes to
Beam. The job is submitted and this launcher returns at once
(`infer.wait_until_finish=False`), as a template launcher must; the job
holds the output directory's lock from its workers and releases it at its
end.

    python -m launch.flex_template --checkpoint_path=gs://b/train \\
        --checkpoint_mode=latest --mixture_or_task_name=my_task \\
        --output_dir='gs://b/infer/{date}/step_{checkpoint_step}' ...
"""

import json
import sys
from typing import List, Optional, Sequence

from launch import infer

# Template parameter -> the Gin macro or configurable it sets (values are
# quoted as Gin strings, except those in LITERAL).
PARAMETERS = {
    'checkpoint_path': 'CHECKPOINT_PATH',
    'checkpoint_mode': 'RestoreCheckpointConfig.mode',
    'mixture_or_task_name': 'MIXTURE_OR_TASK_NAME',
    'mixture_or_task_module': 'MIXTURE_OR_TASK_MODULE',
    'task_feature_lengths': 'TASK_FEATURE_LENGTHS',
    'output_dir': 'INFER_OUTPUT_DIR',
    'wait_until_finish': 'infer.wait_until_finish',
    'lock_startup_seconds': 'infer.lock_startup_seconds',
}
LITERAL = ('task_feature_lengths', 'wait_until_finish', 'lock_startup_seconds')
# Parameters that are not single bindings.
GIN_FILES = ('gin_file', 'model_gin')
OVERRIDES = 'gin_overrides'
DEFAULT_GIN_FILE = 'runs/infer.gin'


def to_launch_argv(argv: Sequence[str]) -> List[str]:
  """The launch.infer argv for a template launch's argv."""
  values, rest = {}, []
  for arg in argv:
    name, has_value, value = arg.partition('=')
    key = name[2:] if name.startswith('--') else None
    if key in PARAMETERS or key in GIN_FILES or key == OVERRIDES:
      if not has_value:
        raise infer.LaunchError(f'template parameter {name} needs a value: '
                                f'write {name}=VALUE')
      values[key] = value
    else:
      rest.append(arg)
  result = [f'--gin_file={values.get("gin_file") or DEFAULT_GIN_FILE}']
  if values.get('model_gin'):
    result.append(f'--gin_file={values["model_gin"]}')
  values.setdefault('wait_until_finish', 'False')
  for key, target in PARAMETERS.items():
    value = values.get(key)
    if not value:
      continue
    if key == 'wait_until_finish':
      value = str(value.strip().lower() in ('1', 'true', 'yes'))
    result.append(f'--gin.{target}=' +
                  (value if key in LITERAL else json.dumps(value)))
  for binding in (values.get(OVERRIDES) or '').split(';'):
    if binding.strip():
      result.append(f'--gin_bindings={binding.strip()}')
  return result + rest


def main(argv: Optional[Sequence[str]] = None) -> int:
  argv = sys.argv[1:] if argv is None else argv
  try:
    launch_argv = to_launch_argv(argv)
  except infer.LaunchError as e:
    print(f't5beam: error: {e}', file=sys.stderr)
    return 2
  return infer.main(launch_argv)


if __name__ == '__main__':
  sys.exit(main())
