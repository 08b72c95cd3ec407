"""A whole Flower deployment on one machine: SuperLink, SuperNodes and `flwr run`, on 127.0.0.1.

`LocalFederation` starts real processes (the same commands each party runs on its own machine,
see README "Deploying across institutions"), with free ports, optional TLS and SuperNode
authentication, and always stops everything it started (`close`, or the `with` block). Used by
`launch.deploy_local` (`make deploy-demo`) and the deployment tests.
"""

from __future__ import annotations

import dataclasses
import os
import queue
import signal
import socket
import subprocess
import sys
import threading
import time

HERE = os.path.dirname(os.path.abspath(__file__))
REPO = os.path.dirname(os.path.dirname(HERE))
APP_DIR = os.path.join(REPO, "launch", "flower")


def free_port() -> int:
  with socket.socket() as s:
    s.bind(("127.0.0.1", 0))
    return s.getsockname()[1]


def _bin(name: str) -> str:
  path = os.path.join(os.path.dirname(sys.executable), name)
  if not os.path.exists(path):
    raise FileNotFoundError(f"{name} not found next to {sys.executable}; install the deploy extra "
                            "(pip install -e .[deploy]).")
  return path


@dataclasses.dataclass
class Certificates:
  """Paths of a self-signed CA and a SuperLink certificate for 127.0.0.1 / localhost."""
  ca: str
  cert: str
  key: str


def make_certificates(out_dir: str) -> Certificates:
  """Creates a test CA and a SuperLink certificate with openssl (launch/flower/certificates.sh
  documents the same commands)."""
  os.makedirs(out_dir, exist_ok=True)
  script = os.path.join(APP_DIR, "certificates.sh")
  subprocess.run(["bash", script, out_dir], check=True, capture_output=True, timeout=60)
  return Certificates(*(os.path.join(out_dir, n) for n in ("ca.crt", "server.pem", "server.key")))


def make_node_key(path: str) -> str:
  """An ECDSA P-384 key pair in OpenSSH format (what SuperNode authentication takes); returns
  the private key path (the public key is PATH.pub)."""
  if os.path.exists(path):
    os.remove(path)
  subprocess.run(["ssh-keygen", "-q", "-t", "ecdsa", "-b", "384", "-N", "", "-f", path],
                 check=True, capture_output=True, timeout=60)
  return path


class LocalFederation:
  """SuperLink + SuperNodes on 127.0.0.1 (see module docstring).

  Args:
    root: a directory for logs, FLWR_HOME and node state.
    tls: certificates (None: --insecure, the default of a local demo only).
    auth: require SuperNode authentication (registered public keys).
  """

  def __init__(self, root: str, *, tls: Certificates | None = None, auth: bool = False,
               log=print):
    self.root, self.tls, self.auth, self.log = os.path.abspath(root), tls, auth, log
    os.makedirs(self.root, exist_ok=True)
    self.port = free_port()
    self.home = os.path.join(self.root, "flwr_home")
    os.makedirs(self.home, exist_ok=True)
    self.env = dict(os.environ, FLWR_HOME=self.home, FLWR_DISABLE_UPDATE_CHECK="1",
                    PYTHONUNBUFFERED="1")
    self.env["PYTHONPATH"] = REPO + os.pathsep + self.env.get("PYTHONPATH", "")
    # the SuperLink and SuperNodes start flower-superexec / flwr-serverapp / flwr-clientapp by name
    self.env["PATH"] = os.path.dirname(sys.executable) + os.pathsep + self.env.get("PATH", "")
    self.superlink: subprocess.Popen | None = None
    self.nodes: dict[int, subprocess.Popen] = {}
    self._logs = []
    with open(os.path.join(self.home, "config.toml"), "w") as f:
      f.write('[superlink]\ndefault = "local"\n\n[superlink.local]\n'
              f'address = "127.0.0.1:{self.port}"\n')
      f.write(f'root-certificates = "{tls.ca}"\n' if tls else "insecure = true\n")

  def __enter__(self):
    return self

  def __exit__(self, *exc):
    self.close()

  def _spawn(self, name: str, cmd: list[str]) -> subprocess.Popen:
    log = open(os.path.join(self.root, f"{name}.log"), "ab")
    self._logs.append(log)
    return subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, env=self.env,
                            cwd=REPO, start_new_session=True)

  def _security(self) -> list[str]:
    if self.tls is None:
      return ["--insecure"]
    return ["--ssl-ca-certfile", self.tls.ca, "--ssl-certfile", self.tls.cert,
            "--ssl-keyfile", self.tls.key]

  def start_superlink(self, timeout: float = 60.0):
    """Starts the SuperLink (its APIs on one port) and waits until it accepts connections."""
    cmd = [_bin("flower-superlink"), *self._security(), "--host", "127.0.0.1",
           "--port", str(self.port), "--database", os.path.join(self.root, "superlink.db"),
           "--disable-runtime-dependency-installation"]
    if self.auth:
      cmd.append("--enable-supernode-auth")
    self.superlink = self._spawn("superlink", cmd)
    deadline = time.time() + timeout
    while time.time() < deadline:
      if self.superlink.poll() is not None:
        raise RuntimeError(f"the SuperLink exited; see {self.root}/superlink.log")
      try:
        with socket.create_connection(("127.0.0.1", self.port), timeout=1):
          return
      except OSError:
        time.sleep(0.3)
    raise TimeoutError(f"the SuperLink did not listen on port {self.port} in {timeout:.0f} s")

  def register(self, public_key: str):
    """Registers a SuperNode's public key with the SuperLink (`flwr supernode register`)."""
    out = subprocess.run([_bin("flwr"), "supernode", "register", public_key, "local"],
                         capture_output=True, text=True, env=self.env, timeout=120, cwd=REPO)
    if out.returncode:
      raise RuntimeError(f"flwr supernode register failed: {out.stdout[-500:]} {out.stderr[-500:]}")

  def start_node(self, i: int, node_config: dict, private_key: str | None = None):
    """Starts SuperNode i with its node config (`deploy.client.NodeSettings`)."""
    items = " ".join(f'{k}="{v}"' if isinstance(v, str) else f"{k}={str(v).lower()}"
                     if isinstance(v, bool) else f"{k}={v}" for k, v in node_config.items())
    cmd = [_bin("flower-supernode"), "--superlink", f"127.0.0.1:{self.port}",
           "--host", "127.0.0.1", "--port", str(free_port()), "--node-config", items]
    cmd += ["--root-certificates", self.tls.ca] if self.tls else ["--insecure"]
    if private_key:
      cmd += ["--auth-supernode-private-key", private_key]
    self.nodes[i] = self._spawn(f"supernode_{i}", cmd)

  def stop_node(self, i: int):
    """Kills SuperNode i and its ClientApp processes (a crash, not a goodbye)."""
    p = self.nodes.pop(i, None)
    if p is not None:
      _kill(p)

  def run(self, run_config: dict, *, timeout: float, app_dir: str = APP_DIR,
          on_line=None) -> tuple[int, str]:
    """`flwr run APP local --stream --run-config ...`; returns (exit code, output).

    `on_line(line)` sees each output line as it arrives (return True to stop waiting: the run
    keeps going on the SuperLink).
    """
    rc = " ".join(f'{k}="{v}"' if isinstance(v, str) else
                  f"{k}={str(v).lower()}" if isinstance(v, bool) else f"{k}={v}"
                  for k, v in run_config.items())
    cmd = [_bin("flwr"), "run", app_dir, "local", "--stream", "--run-config", rc]
    p = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                         env=self.env, cwd=REPO, start_new_session=True)
    lines: queue.Queue = queue.Queue()
    reader = threading.Thread(target=lambda: [lines.put(l.rstrip("\n")) for l in p.stdout],
                              daemon=True)
    reader.start()
    out, deadline = [], time.time() + timeout
    try:
      while reader.is_alive() or not lines.empty():
        try:
          line = lines.get(timeout=0.2)
        except queue.Empty:
          if time.time() > deadline:
            raise TimeoutError(f"flwr run did not finish in {timeout:.0f} s:\n"
                               + "\n".join(out[-20:]))
          continue
        out.append(line)
        self.log(line)
        with open(os.path.join(self.root, "flwr_run.log"), "a") as f:
          f.write(f"{time.strftime('%H:%M:%S')} {line}\n")
        if on_line and on_line(line):
          return -1, "\n".join(out)
      p.wait(timeout=30)
      return p.returncode, "\n".join(out)
    finally:
      _kill(p)

  def close(self):
    """Stops every process this federation started (nodes, their apps, the SuperLink)."""
    for i in list(self.nodes):
      self.stop_node(i)
    if self.superlink is not None:
      _kill(self.superlink)
      self.superlink = None
    for f in self._logs:
      f.close()
    self._logs = []

  def log_text(self, name: str) -> str:
    path = os.path.join(self.root, f"{name}.log")
    return open(path, errors="replace").read() if os.path.exists(path) else ""


def _kill(p: subprocess.Popen):
  """Kills a process group (the process and everything it spawned) and reaps it."""
  if p.poll() is None:
    try:
      os.killpg(p.pid, signal.SIGKILL)
    except ProcessLookupError:
      pass
  try:
    p.wait(timeout=10)
  except subprocess.TimeoutExpired:
    pass

