"""``vllm serve`` processes (tests, benchmarks): started side by side, ready when /health answers, always stopped.

Each server runs in its own session (process group), so stopping it reaches
vLLM's engine core and worker processes too: SIGTERM to the group, a bounded
wait, then SIGKILL. Every wait has a deadline; a server that dies or never
becomes ready raises with the end of its log (failing the test).
"""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import sys
import time
import urllib.error
import urllib.request
from dataclasses import dataclass

from devtools.engine import ENGINE_ENV, with_checkout_on_path
from devtools.launch import free_ports

STOP_WAIT_S = 30


@dataclass
class Server:
    name: str
    process: subprocess.Popen
    port: int
    log_path: str

    @property
    def base_url(self) -> str:
        return f"http://127.0.0.1:{self.port}/v1"

    def log_tail(self, chars: int = 6000) -> str:
        with open(self.log_path, errors="replace") as f:
            return f.read()[-chars:]


@dataclass(frozen=True)
class Python:
    """The environment a server runs in: this interpreter's with this checkout first on the path (default), or an
    installed one (``checkout=False``: a virtualenv with fcpass's wheel), started in ``cwd``, away from the
    checkout, so nothing of it can be imported."""

    executable: str = sys.executable
    checkout: bool = True
    cwd: str | None = None


def start(name: str, port: int, model_dir: str, log_dir: str, extra_args=(), extra_env=None,
          max_model_len: int = 512, python: Python = Python()) -> Server:
    # ``vllm serve`` as the vllm console script runs it (its module's main)
    command = [python.executable, "-m", "vllm.entrypoints.cli.main", "serve", model_dir,
               "--host", "127.0.0.1", "--port", str(port),
               "--tensor-parallel-size", "2", "--dtype", "float32", "--max-model-len", str(max_model_len),
               "--skip-tokenizer-init", "--no-enable-prefix-caching", "--seed", "0", *extra_args]
    env = {**os.environ, **ENGINE_ENV, **(extra_env or {})}
    if python.checkout:  # the server's processes import this checkout's fcpass (the plugin), as the engine runner's do
        env = with_checkout_on_path(env)
    env.pop("VLLM_ALLOW_INSECURE_SERIALIZATION", None)  # only the LLM runs' collective_rpc readers need it
    log_path = os.path.join(log_dir, f"vllm-serve-{name}.log")
    with open(log_path, "w") as log:
        process = subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT, env=env, start_new_session=True,
                                   cwd=python.cwd)
    return Server(name, process, port, log_path)


def wait_ready(servers: list[Server], timeout: float) -> None:
    deadline = time.monotonic() + timeout
    waiting = list(servers)
    while waiting:
        for server in list(waiting):
            if server.process.poll() is not None:
                raise RuntimeError(f"vllm serve ({server.name}) exited with code {server.process.returncode}:\n"
                                   f"{server.log_tail()}")
            if _healthy(server):
                waiting.remove(server)
        if waiting and time.monotonic() > deadline:
            raise TimeoutError(f"vllm serve ({', '.join(s.name for s in waiting)}) not ready within {timeout:.0f} s:"
                               f"\n{waiting[0].log_tail()}")
        if waiting:
            time.sleep(2)


def _healthy(server: Server) -> bool:
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{server.port}/health", timeout=2) as response:
            return response.status == 200
    except (urllib.error.URLError, ConnectionError, TimeoutError):
        return False


def stop(server: Server) -> None:
    """SIGTERM to the server's whole process group, then SIGKILL after a bounded wait."""
    if server.process.poll() is not None:
        return
    with contextlib.suppress(ProcessLookupError):
        os.killpg(server.process.pid, signal.SIGTERM)
    try:
        server.process.wait(timeout=STOP_WAIT_S)
    except subprocess.TimeoutExpired:
        pass
    with contextlib.suppress(ProcessLookupError):  # stragglers of the group (engine core, workers)
        os.killpg(server.process.pid, signal.SIGKILL)
    server.process.wait(timeout=10)


@contextlib.contextmanager
def running(specs: dict, model_dir: str, log_dir: str, timeout: float, max_model_len: int = 512):
    """Start every server of ``specs`` ({name: (extra_args, extra_env[, Python])}) side by side; yield them
    ready."""
    servers = []
    try:
        for port, (name, spec) in zip(free_ports(len(specs)), specs.items()):
            extra_args, extra_env, *python = spec
            servers.append(start(name, port, model_dir, log_dir, extra_args, extra_env, max_model_len, *python))
        wait_ready(servers, timeout)
        yield {server.name: server for server in servers}
    finally:
        for server in servers:
            stop(server)
