"""What a caller asks for, checked before anything is queued.

:func:`check` is called by ``dispatch_inference.apply_async`` (and so by
``delay``) in the caller's process: a bad prompt or option raises
:class:`~dispatcher.errors.InvalidRequest` there, naming what was wrong and
the setting that limits it, and nothing reaches the broker.
"""

from __future__ import annotations

import math
from typing import Any, Mapping

from dispatcher.errors import InvalidRequest
from scoring import Request

def check(args: tuple | list | None, kwargs: Mapping[str, Any] | None, max_prompt_bytes: int,
          default_memory_mb: float = 0.0) -> Request:
    """Refuse a call whose prompt or options cannot be sent; return what the scoring places.

    :param args: the positional arguments given to ``dispatch_inference``: ``(prompt,)``.
    :param kwargs: its keyword arguments (``prompt`` may be one of them).
    :param max_prompt_bytes: the limit, bytes of UTF-8 (``GPU_DISPATCH_MAX_PROMPT_BYTES``).
    :param default_memory_mb: see :func:`scoring_request`.
    :raises InvalidRequest: saying what is wrong.
    """
    args = tuple(args or ())
    kwargs = kwargs or {}
    if len(args) > 1:
        raise InvalidRequest(f"dispatch_inference takes one positional argument, the prompt; got {len(args)}: "
                             "pass options by name (model=, max_tokens=, memory_mb=)")
    if args and "prompt" in kwargs:
        raise InvalidRequest("dispatch_inference got the prompt twice (positionally and as prompt=)")
    if not args and "prompt" not in kwargs:
        raise InvalidRequest("dispatch_inference needs a prompt: dispatch_inference.delay('your prompt')")
    check_prompt(args[0] if args else kwargs["prompt"], max_prompt_bytes)
    return scoring_request(kwargs, default_memory_mb)


def check_prompt(prompt: Any, max_prompt_bytes: int) -> None:
    """Refuse a prompt that is not text, is empty (or only whitespace), or is over the size limit."""
    if not isinstance(prompt, str):
        raise InvalidRequest(f"the prompt must be text (str), not {type(prompt).__name__}"
                             + ("; decode bytes first, e.g. prompt.decode('utf-8')" if isinstance(prompt, bytes)
                                else ""))
    if not prompt.strip():
        raise InvalidRequest("the prompt is empty" + (" (only whitespace)" if prompt else ""))
    # A str of n characters is at most 4n bytes of UTF-8: encode only when it could be over.
    if 4 * len(prompt) > max_prompt_bytes:
        size = len(prompt.encode("utf-8", "surrogatepass"))
        if size > max_prompt_bytes:
            raise InvalidRequest(f"the prompt is {_bytes(size)}; the limit is {_bytes(max_prompt_bytes)} "
                                 "(GPU_DISPATCH_MAX_PROMPT_BYTES)")


def scoring_request(options: Mapping[str, Any], default_memory_mb: float = 0.0) -> Request:
    """The scoring :class:`~scoring.Request` for a call's options; refuses unusable ``model``,
    ``max_tokens`` and ``memory_mb``.  A call that does not say ``memory_mb`` is taken to need
    ``default_memory_mb`` (``GPU_DISPATCH_REQUEST_MEMORY_MB``)."""
    model = options.get("model")
    if model is not None and (not isinstance(model, str) or not model.strip()):
        raise InvalidRequest(f"model must be a model name (a non-empty str) or None for any, not {model!r}")
    max_tokens = options.get("max_tokens")
    if max_tokens is not None and (isinstance(max_tokens, bool) or not isinstance(max_tokens, int)
                                   or max_tokens <= 0):
        raise InvalidRequest(f"max_tokens must be a whole number above 0 or None, not {max_tokens!r}")
    memory_mb = options.get("memory_mb")
    if memory_mb is not None and (isinstance(memory_mb, bool) or not isinstance(memory_mb, (int, float))
                                  or not math.isfinite(memory_mb) or memory_mb < 0):
        raise InvalidRequest(f"memory_mb must be the request's estimated GPU memory in MB (a number ≥ 0) "
                             f"or None, not {memory_mb!r}")
    return Request(model=model, memory_mb=float(default_memory_mb if memory_mb is None else memory_mb))


def _bytes(n: int) -> str:
    if n >= 1024 * 1024:
        return f"{n / (1024 * 1024):.1f} MiB ({n} bytes)"
    if n >= 1024:
        return f"{n / 1024:.1f} KiB ({n} bytes)"
    return f"{n} bytes"
