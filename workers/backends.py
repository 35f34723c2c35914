"""What ``run_inference`` calls to produce text: one small class per backend.

- ``simulated`` (default): deterministic text; latency from a token model,
  slowed by the simulated GPU's load; the request's memory is held meanwhile.
- ``openai``: an OpenAI-compatible server on this GPU (vLLM, llama.cpp's
  ``llama-server``, llama-cpp-python's server): completions, or chat
  completions when the request carries ``messages``; streamed, so the time to
  the first token is measured; one pooled HTTP client per worker.
- ``python``: a user callable ``module:function``, loaded once per worker.

Every backend has the same four methods:

- ``complete(prompt, *, max_tokens, **options) -> (text, usage)``; failures
  raise :class:`BackendError` whose message says what went wrong and which
  setting to look at;
- ``health() -> str | None``: ``None`` when the backend can serve, else why not;
- ``signals() -> dict[str, str]``: the model server's own load signals as
  instance-metadata keys (see :mod:`workers.model_metrics`), ``{}`` when none;
- ``close()``: release what the backend holds (connections).
"""

from __future__ import annotations

import hashlib
import importlib
import json
import logging
import threading
import time
from typing import Any, Callable, Iterator, Protocol
from urllib.parse import urlsplit

from workers.gpu import Gpu

log = logging.getLogger(__name__)


class BackendError(RuntimeError):
    """The inference backend failed; the message names the cause and the setting to check."""


class Backend(Protocol):
    name: str

    def complete(self, prompt: str, *, max_tokens: int, **options: Any) -> tuple[str, dict]: ...

    def health(self) -> str | None: ...

    def signals(self) -> dict[str, str]: ...

    def close(self) -> None: ...


#: Tokens generated when the request does not say max_tokens.
DEFAULT_MAX_TOKENS = 32

_WORDS = ("tensor", "kernel", "warp", "cache", "token", "shard", "queue", "stream", "block", "lane")


class InProcessBackend:
    """A backend with no model server of its own to check, read load from, or close."""

    def health(self) -> str | None:
        return None

    def signals(self) -> dict[str, str]:
        return {}

    def close(self) -> None:
        pass


class SimulatedBackend(InProcessBackend):
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



#: Settings named in the openai backend's messages.
_URL_SETTING = "GPU_DISPATCH_OPENAI_URL"
_TIMEOUT_SETTINGS = "GPU_DISPATCH_OPENAI_CONNECT_TIMEOUT / GPU_DISPATCH_OPENAI_READ_TIMEOUT"
#: Longest wait of a health or metrics probe (they run in the worker's refresh lane, never for long).
PROBE_TIMEOUT = 2.0
#: Request options that steer dispatch and mean nothing to a model server: never sent to it.
DISPATCH_ONLY_OPTIONS = ("affinity_key",)
#: After a /metrics that answers 404 (llama-cpp-python's server has none), ask again only after this long.
NO_METRICS_RETRY = 60.0


def derive_urls(completions_url: str) -> dict[str, str]:
    """The endpoints of an OpenAI-compatible server, from its completions endpoint.

    ``http://h:p/v1/completions`` gives ``chat`` = ``http://h:p/v1/chat/completions``,
    ``models`` = ``http://h:p/v1/models`` and ``metrics`` = ``http://h:p/metrics`` (vLLM and
    llama.cpp serve their metrics at the root).  A URL that does not end in ``/completions``
    (a proxy of its own shape) has no ``chat`` or ``models`` entry.
    """
    parts = urlsplit(completions_url)
    root = f"{parts.scheme}://{parts.netloc}"
    urls = {"completions": completions_url, "metrics": f"{root}/metrics"}
    path = parts.path.rstrip("/")
    if path.endswith("/completions") and not path.endswith("/chat/completions"):
        base = root + path[: -len("/completions")]
        urls.update(chat=f"{base}/chat/completions", models=f"{base}/models")
    return urls


class OpenAIBackend:
    """An OpenAI-compatible server, streamed over one pooled, thread-safe :class:`httpx.Client`.

    ``complete(prompt, max_tokens=..., **options)`` POSTs
    ``{"model", "prompt", "max_tokens", "stream": true, "stream_options": {"include_usage": true}, **options}``
    to the completions endpoint.  With ``messages=[{"role": ..., "content": ...}, ...]`` among the
    options it POSTs a chat completion instead (to ``.../chat/completions``, derived from
    ``GPU_DISPATCH_OPENAI_URL``); a non-empty ``prompt`` is then appended as a last user message.
    ``stream=False`` asks for one JSON reply (no ``ttft_ms`` then).

    The usage returned is the server's ``usage`` (``prompt_tokens``, ``completion_tokens``, ...)
    when it reports one (``usage_source: "server"``), plus ``ttft_ms`` (request sent to first
    generated text), ``total_ms``, ``finish_reason`` when known and ``stream_chunks``.  A server
    that streams no usage (llama-cpp-python ignores ``stream_options``) gets ``completion_tokens``
    counted from the streamed chunks (one per token there; ``usage_source: "stream_chunks"``)
    and no ``prompt_tokens``; ``stream=False`` gets its full usage but no ``ttft_ms``.  The read timeout bounds each wait for bytes from the
    server, not the whole stream: a long answer that keeps streaming is not cut off.
    """

    name = "openai"

    def __init__(self, url: str, model: str, connect_timeout: float, read_timeout: float, *,
                 max_connections: int = 16, transport: Any = None) -> None:
        import httpx

        self.url, self.model = url, model
        self.connect_timeout, self.read_timeout = connect_timeout, read_timeout
        self.urls = derive_urls(url)
        self._httpx = httpx
        self._client = httpx.Client(
            timeout=httpx.Timeout(connect=connect_timeout, read=read_timeout, write=read_timeout,
                                  pool=read_timeout),
            limits=httpx.Limits(max_connections=max_connections, max_keepalive_connections=max_connections),
            transport=transport, headers={"Accept": "text/event-stream, application/json"})
        self._no_metrics_until = 0.0
        self._lock = threading.Lock()
        #: Why the last :meth:`signals` call returned nothing (``None`` when it returned signals).
        self.signals_reason: str | None = None

    # -- inference ------------------------------------------------------------------

    def complete(self, prompt: str, *, max_tokens: int, **options: Any) -> tuple[str, dict]:
        for name in DISPATCH_ONLY_OPTIONS:  # for the dispatcher's choice of GPU, not for the model server
            options.pop(name, None)
        messages = options.pop("messages", None)
        stream = bool(options.pop("stream", True))
        options.pop("stream_options", None)
        body: dict[str, Any] = {"model": self.model, "max_tokens": max_tokens, **options}
        if messages is not None:
            url, kind = self._chat_url(), "chat"
            body["messages"] = _chat_messages(messages, prompt)
        else:
            url, kind = self.url, "completion"
            body["prompt"] = prompt
        if stream:
            body.update(stream=True, stream_options={"include_usage": True})
        started = time.perf_counter()
        try:
            if stream:
                text, usage = self._stream(url, body, kind, started)
            else:
                text, usage = self._single(url, body, kind)
        except self._httpx.TimeoutException:
            raise BackendError(f"model server at {url} did not answer in time (connect {self.connect_timeout} s, "
                               f"read {self.read_timeout} s; {_TIMEOUT_SETTINGS})") from None
        except self._httpx.HTTPError as exc:
            raise BackendError(f"cannot reach the model server at {url}: {_describe(exc)} "
                               f"(is it running? {_URL_SETTING})") from None
        usage["total_ms"] = round((time.perf_counter() - started) * 1000, 3)
        return text, usage

    def _chat_url(self) -> str:
        if "chat" not in self.urls:
            raise BackendError(f"{_URL_SETTING}={self.url!r} does not end in /completions, so the chat "
                               "endpoint (…/chat/completions) cannot be derived from it; point it at the "
                               "server's /v1/completions")
        return self.urls["chat"]

    def _stream(self, url: str, body: dict, kind: str, started: float) -> tuple[str, dict]:
        pieces: list[str] = []
        usage: dict[str, Any] = {}
        ttft_ms = None
        finish = None
        with self._client.stream("POST", url, json=body) as reply:
            if reply.status_code >= 400:
                reply.read()
                raise _http_error(url, reply.status_code, reply.content)
            content_type = reply.headers.get("content-type", "")
            if "text/event-stream" not in content_type:  # a server that ignores "stream": one JSON reply
                reply.read()
                return _parse_reply(url, reply.content, kind)
            chunks = 0
            done = False
            for event in _sse_events(reply.iter_lines()):
                if event == "[DONE]":
                    done = True
                    break
                try:
                    chunk = json.loads(event)
                except ValueError:
                    raise BackendError(f"model server at {url} streamed an event that is not JSON: "
                                       f"{event[:200]!r} (is {_URL_SETTING} an OpenAI-compatible endpoint?)") from None
                if not isinstance(chunk, dict):
                    raise _not_a_completion(url, kind, event.encode())
                if "error" in chunk and not chunk.get("choices"):
                    raise BackendError(f"model server at {url} reported an error mid-stream: "
                                       f"{json.dumps(chunk['error'])[:300]}")
                if isinstance(chunk.get("usage"), dict):
                    usage.update(chunk["usage"])
                choices = chunk.get("choices")
                if choices is None and "usage" not in chunk:
                    raise _not_a_completion(url, kind, event.encode())
                for choice in choices or []:
                    piece = _choice_text(choice, kind, delta=True)
                    if piece is None:
                        raise _not_a_completion(url, kind, event.encode())
                    if piece:
                        if ttft_ms is None:
                            ttft_ms = round((time.perf_counter() - started) * 1000, 3)
                        pieces.append(piece)
                        chunks += 1
                    finish = choice.get("finish_reason") or finish
            if not done and not finish:
                raise BackendError(f"model server at {url} ended the stream before the answer was complete "
                                   f"(no finish_reason, no [DONE]): did it stop or crash? ({_URL_SETTING})")
            usage["stream_chunks"] = chunks
            if "completion_tokens" in usage:
                usage["usage_source"] = "server"
            elif chunks:  # e.g. llama-cpp-python ignores stream_options: one streamed chunk per token
                usage.update(completion_tokens=chunks, usage_source="stream_chunks")
        if ttft_ms is not None:
            usage["ttft_ms"] = ttft_ms
        if finish:
            usage["finish_reason"] = finish
        return "".join(pieces), usage

    def _single(self, url: str, body: dict, kind: str) -> tuple[str, dict]:
        reply = self._client.post(url, json=body)
        if reply.status_code >= 400:
            raise _http_error(url, reply.status_code, reply.content)
        return _parse_reply(url, reply.content, kind)

    # -- health and load signals ---------------------------------------------------------

    def health(self) -> str | None:
        """``None`` when the server lists its models at ``GET …/v1/models``, else why it cannot serve."""
        url = self.urls.get("models")
        if url is None:  # an endpoint of its own shape: all we can check is that it takes connections
            url = self.url
        try:
            reply = self._client.get(url, timeout=self._probe_timeout())
        except self._httpx.TimeoutException:
            return (f"model server at {url} did not answer within {self._probe_timeout().read} s "
                    f"(overloaded or hung? {_URL_SETTING})")
        except self._httpx.HTTPError as exc:
            return f"cannot reach the model server at {url}: {_describe(exc)} (is it running? {_URL_SETTING})"
        if "models" not in self.urls:
            return None if reply.status_code < 500 else f"model server at {url} answered HTTP {reply.status_code}"
        if reply.status_code != 200:
            return f"model server at {url} answered HTTP {reply.status_code}: {_snippet(reply.content)}"
        try:
            models = [m.get("id") for m in reply.json()["data"]]
        except (ValueError, KeyError, TypeError, AttributeError):
            return (f"model server at {url} sent a reply that is not an OpenAI model list: "
                    f"{_snippet(reply.content)} ({_URL_SETTING})")
        if not models:
            return f"model server at {url} serves no model yet"
        return None

    def signals(self) -> dict[str, str]:
        """The server's load from its Prometheus ``/metrics`` (vLLM, llama.cpp); ``{}`` when it has none.

        Never raises and never waits more than :data:`PROBE_TIMEOUT`; why nothing came back is
        kept in :attr:`signals_reason`.  A server without ``/metrics`` (404) is asked again only
        after :data:`NO_METRICS_RETRY` seconds.
        """
        from workers.model_metrics import signals_from_exposition

        url = self.urls["metrics"]
        with self._lock:
            if time.monotonic() < self._no_metrics_until:
                return {}
        try:
            reply = self._client.get(url, timeout=self._probe_timeout(), headers={"Accept": "text/plain"})
            if reply.status_code == 404:
                with self._lock:
                    self._no_metrics_until = time.monotonic() + NO_METRICS_RETRY
                self.signals_reason = f"{url} answered 404: this model server has no Prometheus metrics"
                return {}
            if reply.status_code != 200:
                self.signals_reason = f"{url} answered HTTP {reply.status_code}"
                return {}
            signals, self.signals_reason = signals_from_exposition(reply.text)
            return signals
        except Exception as exc:  # the refresh must go on whatever the model server does
            self.signals_reason = f"cannot read {url}: {_describe(exc)}"
            return {}

    def _probe_timeout(self):
        return self._httpx.Timeout(min(self.connect_timeout, PROBE_TIMEOUT), read=min(self.read_timeout, PROBE_TIMEOUT))

    def close(self) -> None:
        self._client.close()


def _chat_messages(messages: Any, prompt: str) -> list[dict]:
    if not isinstance(messages, list) or not all(
            isinstance(m, dict) and isinstance(m.get("role"), str) and isinstance(m.get("content"), str)
            for m in messages):
        raise BackendError("messages must be a list of {'role': str, 'content': str} objects")
    out = list(messages)
    if prompt:
        out.append({"role": "user", "content": prompt})
    if not out:
        raise BackendError("a chat completion needs at least one message (messages=[...] or a prompt)")
    return out


def _sse_events(lines: Iterator[str]) -> Iterator[str]:
    """The data of each server-sent event (``data:`` lines joined); comments and other fields skipped."""
    data: list[str] = []
    for line in lines:
        if not line:
            if data:
                yield "\n".join(data)
                data = []
            continue
        if line.startswith(":"):  # a comment, e.g. llama-cpp-python's pings
            continue
        field, _, value = line.partition(":")
        if field == "data":
            data.append(value[1:] if value.startswith(" ") else value)
    if data:
        yield "\n".join(data)


def _choice_text(choice: Any, kind: str, delta: bool) -> str | None:
    """A choice's text (``""`` when it has none yet), or ``None`` when it is not a choice of that kind."""
    if not isinstance(choice, dict):
        return None
    if kind == "chat":
        holder = choice.get("delta" if delta else "message")
        if not isinstance(holder, dict):
            return None
        text = holder.get("content")
        return "" if text is None else text if isinstance(text, str) else None
    text = choice.get("text")
    return "" if text is None and delta else text if isinstance(text, str) else None


def _parse_reply(url: str, raw: bytes, kind: str) -> tuple[str, dict]:
    try:
        reply = json.loads(raw)
        text = _choice_text(reply["choices"][0], kind, delta=False)
    except (ValueError, KeyError, IndexError, TypeError):
        text = None
    if text is None:
        raise _not_a_completion(url, kind, raw)
    usage = dict(reply.get("usage") or {})
    finish = reply["choices"][0].get("finish_reason")
    if finish:
        usage["finish_reason"] = finish
    return text, usage


def _not_a_completion(url: str, kind: str, raw: bytes) -> BackendError:
    expected = "choices[0].message.content" if kind == "chat" else "choices[0].text"
    return BackendError(f"model server at {url} sent a reply that is not an OpenAI {kind} "
                        f"(expected {expected}): {raw[:200]!r} (is {_URL_SETTING} an OpenAI-compatible endpoint?)")


def _http_error(url: str, status: int, raw: bytes) -> BackendError:
    return BackendError(f"model server at {url} answered HTTP {status}: {_snippet(raw)}")


def _snippet(raw: bytes, limit: int = 300) -> str:
    return raw[:limit].decode(errors="replace")


def _describe(exc: BaseException) -> str:
    text = str(exc) or type(exc).__name__
    return text if type(exc).__name__ in text else f"{type(exc).__name__}: {text}"


class PythonBackend(InProcessBackend):
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



def open_backend(conf: Any, gpu: Gpu, ip: str, port: int, max_connections: int | None = None) -> Backend:
    """The backend named by ``GPU_DISPATCH_BACKEND``, built once per worker.

    ``max_connections``: the openai backend's connection pool (default: the worker's
    ``GPU_DISPATCH_MAX_CONCURRENCY`` plus 2, for the health and metrics probes).
    """
    if conf.backend == "openai":
        url = conf.openai_url or f"http://{ip}:{port}/v1/completions"
        return OpenAIBackend(url, conf.openai_model or conf.model_name, conf.openai_connect_timeout,
                             conf.openai_read_timeout,
                             max_connections=max_connections or getattr(conf, "max_concurrency", 4) + 2)
    if conf.backend == "python":
        if not conf.python_callable:
            raise BackendError("GPU_DISPATCH_BACKEND=python needs GPU_DISPATCH_PYTHON_CALLABLE=module:function")
        return PythonBackend(conf.python_callable)
    return SimulatedBackend(gpu, conf.sim_ms_per_token)
