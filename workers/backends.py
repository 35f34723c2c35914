"""What ``run_inference`` calls to produce text: one small class per backend.

- ``simulated`` (default): deterministic text; latency from a token model,
  slowed by the simulated GPU's load; the request's memory is held meanwhile.
- ``openai``: an OpenAI-compatible completions server on this GPU (vLLM's
  ``/v1/completions``), with connect/read timeouts and clear errors.
- ``python``: a user callable ``module:function``, loaded once per worker.

Every backend returns ``(text, usage)``; failures raise :class:`BackendError`
whose message says what went wrong and which setting to look at.
"""

from __future__ import annotations

import hashlib
import http.client
import importlib
import json
import socket
import time
from urllib.parse import urlsplit
from typing import Any, Callable, Protocol

from workers.gpu import Gpu


class BackendError(RuntimeError):
    """The inference backend failed; the message names the cause and the setting to check."""


class Backend(Protocol):
    name: str

    def complete(self, prompt: str, *, max_tokens: int, **options: Any) -> tuple[str, dict]: ...


#: Tokens generated when the request does not say max_tokens.
DEFAULT_MAX_TOKENS = 32

_WORDS = ("tensor", "kernel", "warp", "cache", "token", "shard", "queue", "stream", "block", "lane")


class SimulatedBackend:
    """Deterministic text whose latency follows a token model scaled by the GPU's load.

    Time = (prompt tokens / 8 + max_tokens) × ``ms_per_token`` × (1 + 2 × utilisation),
    utilisation (0..1) read from the GPU when the request starts.
    """

    name = "simulated"

    def __init__(self, gpu: Gpu, ms_per_token: float, sleep: Callable[[float], None] = time.sleep) -> None:
        self.gpu, self.ms_per_token, self._sleep = gpu, ms_per_token, sleep

    def complete(self, prompt: str, *, max_tokens: int, **options: Any) -> tuple[str, dict]:
        prompt_tokens = max(1, len(prompt) // 4)
        load = self.gpu.read().gpu_util / 100.0
        seconds = (prompt_tokens / 8 + max_tokens) * self.ms_per_token / 1000.0 * (1 + 2 * load)
        self._sleep(seconds)
        digest = hashlib.sha256(prompt.encode()).digest()
        text = " ".join(_WORDS[b % len(_WORDS)] for b in digest[:max(1, min(max_tokens, 32))])
        return text, {"prompt_tokens": prompt_tokens, "completion_tokens": max_tokens,
                      "simulated_seconds": round(seconds, 4)}


class OpenAIBackend:
    """POST ``{"model", "prompt", "max_tokens", ...}`` to an OpenAI-compatible ``/v1/completions``."""

    name = "openai"

    def __init__(self, url: str, model: str, connect_timeout: float, read_timeout: float) -> None:
        self.url, self.model = url, model
        self.connect_timeout, self.read_timeout = connect_timeout, read_timeout

    def complete(self, prompt: str, *, max_tokens: int, **options: Any) -> tuple[str, dict]:
        body = json.dumps({"model": self.model, "prompt": prompt, "max_tokens": max_tokens, **options})
        url = urlsplit(self.url)
        connection_class = http.client.HTTPSConnection if url.scheme == "https" else http.client.HTTPConnection
        connection = connection_class(url.hostname, url.port, timeout=self.connect_timeout)
        try:
            connection.connect()
            connection.sock.settimeout(self.read_timeout)
            connection.request("POST", url.path or "/", body, {"Content-Type": "application/json"})
            reply = connection.getresponse()
            raw = reply.read()
        except (socket.timeout, TimeoutError):
            raise BackendError(f"model server at {self.url} did not answer in time (connect "
                               f"{self.connect_timeout} s, read {self.read_timeout} s; "
                               "GPU_DISPATCH_OPENAI_CONNECT_TIMEOUT / GPU_DISPATCH_OPENAI_READ_TIMEOUT)") from None
        except (http.client.HTTPException, OSError) as exc:
            raise BackendError(f"cannot reach the model server at {self.url}: {exc} "
                               "(is it running? GPU_DISPATCH_OPENAI_URL)") from None
        finally:
            connection.close()
        if reply.status >= 400:
            raise BackendError(f"model server at {self.url} answered HTTP {reply.status}: "
                               f"{raw[:300].decode(errors='replace')}")
        try:
            reply_json = json.loads(raw)
            text = reply_json["choices"][0]["text"]
        except (ValueError, KeyError, IndexError, TypeError):
            raise BackendError(f"model server at {self.url} sent a reply that is not an OpenAI completion "
                               f"(expected choices[0].text): {raw[:200]!r}") from None
        return str(text), dict(reply_json.get("usage") or {})


class PythonBackend:
    """A user callable ``f(prompt, max_tokens=..., **options) -> str | {"text": str, ...}``."""

    name = "python"

    def __init__(self, spec: str) -> None:
        module_name, _, attr = spec.partition(":")
        if not module_name or not attr:
            raise BackendError(f"GPU_DISPATCH_PYTHON_CALLABLE={spec!r} is not 'module:function'")
        try:
            self.function = getattr(importlib.import_module(module_name), attr)
        except (ImportError, AttributeError) as exc:
            raise BackendError(f"cannot load GPU_DISPATCH_PYTHON_CALLABLE={spec!r}: {exc}") from None
        if not callable(self.function):
            raise BackendError(f"GPU_DISPATCH_PYTHON_CALLABLE={spec!r} is not callable")
        self.spec = spec

    def complete(self, prompt: str, *, max_tokens: int, **options: Any) -> tuple[str, dict]:
        out = self.function(prompt, max_tokens=max_tokens, **options)
        if isinstance(out, str):
            return out, {}
        if isinstance(out, dict) and isinstance(out.get("text"), str):
            return out["text"], {k: v for k, v in out.items() if k != "text"}
        raise BackendError(f"{self.spec} returned {type(out).__name__}; it must return a str or a dict "
                           "with a 'text' string")


def open_backend(conf: Any, gpu: Gpu, ip: str, port: int) -> Backend:
    """The backend named by ``GPU_DISPATCH_BACKEND``, built once per worker."""
    if conf.backend == "openai":
        url = conf.openai_url or f"http://{ip}:{port}/v1/completions"
        return OpenAIBackend(url, conf.openai_model or conf.model_name, conf.openai_connect_timeout,
                             conf.openai_read_timeout)
    if conf.backend == "python":
        if not conf.python_callable:
            raise BackendError("GPU_DISPATCH_BACKEND=python needs GPU_DISPATCH_PYTHON_CALLABLE=module:function")
        return PythonBackend(conf.python_callable)
    return SimulatedBackend(gpu, conf.sim_ms_per_token)
