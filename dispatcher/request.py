"""What a caller asks for, checked before anything is queued.

:func:`check` is called by ``dispatch_inference.apply_async`` (and so by
``delay``) in the caller's process: a bad prompt, option or Celery argument
raises :class:`~dispatcher.errors.InvalidRequest` there, naming what was
wrong and the setting or argument to change, and nothing reaches the broker.
"""

from __future__ import annotations

import datetime
import json
import math
from typing import Any, Mapping

from dispatcher.errors import InvalidRequest
from scoring import Request

#: Celery arguments of apply_async a caller may pass; everything else is refused by name.
CALLER_OPTIONS = frozenset({"task_id", "countdown", "eta", "expires", "priority", "headers", "link", "link_error",
                            "ignore_result", "shadow", "producer", "add_to_parent", "connection", "retry",
                            "retry_policy", "parent_id", "root_id"})
#: Celery's own arguments when it retries or replaces a task (then every option is its own).
CELERY_INTERNAL = frozenset({"retries", "chain", "chord", "group_id", "group_index", "reply_to",
                             "replaced_task_nesting", "origin", "time_limit", "soft_time_limit", "stamped_headers"})
#: Arguments that would pick the queue: the dispatcher's job.
ROUTING_OPTIONS = ("queue", "exchange", "routing_key", "declare")


def check(args: tuple | list | None, kwargs: Mapping[str, Any] | None, options: Mapping[str, Any],
          conf: Any) -> Request:
    """Refuse a call that cannot be sent as asked; return what the scoring places.

    :param args: positional arguments given to ``dispatch_inference``: ``(prompt,)``.
    :param kwargs: its keyword arguments (``prompt`` may be one of them).
    :param options: the other ``apply_async`` arguments (Celery's).
    :param conf: the settings (``GPU_DISPATCH_MAX_PROMPT_BYTES``, ``GPU_DISPATCH_MAX_TOKENS``,
        ``GPU_DISPATCH_REQUEST_MEMORY_MB``).
    :raises InvalidRequest: saying what is wrong.
    """
    args = tuple(args or ())
    kwargs = dict(kwargs or {})
    if len(args) > 1:
        raise InvalidRequest(f"dispatch_inference takes one positional argument, the prompt; got {len(args)}: "
                             "pass options by name (model=, max_tokens=, memory_mb=)")
    if args and "prompt" in kwargs:
        raise InvalidRequest("dispatch_inference got the prompt twice (positionally and as prompt=)")
    if not args and "prompt" not in kwargs:
        raise InvalidRequest("dispatch_inference needs a prompt: dispatch_inference.delay('your prompt')")
    prompt = args[0] if args else kwargs.pop("prompt")
    if not any(name in options for name in CELERY_INTERNAL):
        check_celery_options(options)
    prompt_bytes = check_prompt(prompt, conf.max_prompt_bytes)
    options_bytes = _json_size(kwargs, "option")
    if prompt_bytes + options_bytes > conf.max_prompt_bytes:
        raise InvalidRequest(f"the prompt and its options are {_bytes(prompt_bytes + options_bytes)} together; "
                             f"the limit is {_bytes(conf.max_prompt_bytes)} (GPU_DISPATCH_MAX_PROMPT_BYTES)")
    return scoring_request(kwargs, conf.request_memory_mb, conf.max_tokens)


def check_prompt(prompt: Any, max_prompt_bytes: int) -> int:
    """Refuse a prompt that is not text, is empty, is not valid Unicode, or is over the limit; its size in bytes."""
    if not isinstance(prompt, str):
        raise InvalidRequest(f"the prompt must be text (str), not {type(prompt).__name__}"
                             + ("; decode bytes first, e.g. prompt.decode('utf-8')" if isinstance(prompt, bytes)
                                else ""))
    if not prompt.strip():
        raise InvalidRequest("the prompt is empty" + (" (only whitespace)" if prompt else ""))
    # A str of n characters is n to 4n bytes of UTF-8: a huge one is refused without encoding it.
    if len(prompt) > 4 * max_prompt_bytes:
        raise InvalidRequest(f"the prompt is at least {_bytes(len(prompt))}; the limit is {_bytes(max_prompt_bytes)} "
                             "(GPU_DISPATCH_MAX_PROMPT_BYTES)")
    try:
        size = len(prompt.encode("utf-8"))
    except UnicodeEncodeError as exc:
        raise InvalidRequest(f"the prompt is not valid Unicode text: {exc.reason} at character {exc.start} "
                             f"({prompt[exc.start]!r}); fix or drop that character") from None
    if size > max_prompt_bytes:
        raise InvalidRequest(f"the prompt is {_bytes(size)}; the limit is {_bytes(max_prompt_bytes)} "
                             "(GPU_DISPATCH_MAX_PROMPT_BYTES)")
    return size


def check_celery_options(options: Mapping[str, Any]) -> None:
    """Refuse Celery arguments that would lose or misroute the request, naming the argument."""
    for name in ROUTING_OPTIONS:
        if options.get(name) is not None:
            raise InvalidRequest(f"{name}= is not accepted: dispatch_inference picks the GPU queue itself "
                                 "(constrain it with model= or memory_mb=); drop the argument")
    unknown = sorted(set(options) - CALLER_OPTIONS)
    if unknown:
        raise InvalidRequest(f"dispatch_inference.apply_async does not take {', '.join(unknown)}; it takes "
                             f"{', '.join(sorted(CALLER_OPTIONS - {'producer', 'connection', 'add_to_parent'}))}")
    countdown = options.get("countdown")
    if countdown is not None and not _non_negative(countdown):
        raise InvalidRequest(f"countdown must be a number of seconds ≥ 0, not {countdown!r}")
    eta = options.get("eta")
    if eta is not None and not isinstance(eta, datetime.datetime):
        raise InvalidRequest(f"eta must be a datetime, not {type(eta).__name__}")
    expires = options.get("expires")
    if expires is not None and not (isinstance(expires, datetime.datetime) or _non_negative(expires)):
        raise InvalidRequest(f"expires must be a datetime or a number of seconds ≥ 0, not {expires!r}")
    priority = options.get("priority")
    if priority is not None and (isinstance(priority, bool) or not isinstance(priority, int)
                                 or not 0 <= priority <= 255):
        raise InvalidRequest(f"priority must be a whole number 0–255, not {priority!r}")
    task_id = options.get("task_id")
    if task_id is not None and (not isinstance(task_id, str) or not task_id or len(task_id) > 200
                                or any(c.isspace() for c in task_id)):
        raise InvalidRequest(f"task_id must be a non-empty string of at most 200 characters without spaces, "
                             f"not {task_id!r}")
    headers = options.get("headers")
    if headers is not None:
        if not isinstance(headers, Mapping):
            raise InvalidRequest(f"headers must be a dict, not {type(headers).__name__}")
        _json_size(headers, "header")


def scoring_request(options: Mapping[str, Any], default_memory_mb: float = 0.0,
                    max_tokens_limit: int | None = None) -> Request:
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
    if max_tokens is not None and max_tokens_limit is not None and max_tokens > max_tokens_limit:
        raise InvalidRequest(f"max_tokens is {max_tokens}; the limit is {max_tokens_limit} (GPU_DISPATCH_MAX_TOKENS)")
    affinity_key = options.get("affinity_key")
    if affinity_key is not None and (not isinstance(affinity_key, str) or not affinity_key or len(affinity_key) > 1000):
        raise InvalidRequest(f"affinity_key must be a non-empty str of at most 1000 characters (a session, a "
                             f"conversation, a system prompt's name), not {_short(affinity_key)}")
    memory_mb = options.get("memory_mb")
    if memory_mb is not None and (isinstance(memory_mb, bool) or not isinstance(memory_mb, (int, float))
                                  or not math.isfinite(memory_mb) or memory_mb < 0):
        raise InvalidRequest(f"memory_mb must be the request's estimated GPU memory in MB (a finite number ≥ 0) "
                             f"or None, not {memory_mb!r}")
    return Request(model=model, memory_mb=float(default_memory_mb if memory_mb is None else memory_mb))


def _non_negative(value: Any) -> bool:
    return (not isinstance(value, bool) and isinstance(value, (int, float)) and math.isfinite(value)
            and value >= 0)


def _json_size(values: Mapping[str, Any], what: str) -> int:
    """Bytes of ``values`` as the JSON the broker carries; refuses what JSON cannot carry, naming it."""
    total = 0
    for name, value in values.items():
        if not isinstance(name, str):
            raise InvalidRequest(f"{what} names must be strings, not {name!r}")
        try:
            total += len(json.dumps(value, allow_nan=False, ensure_ascii=False).encode("utf-8")) + len(name) + 4
        except (TypeError, ValueError, UnicodeEncodeError) as exc:
            raise InvalidRequest(f"{what} {name}={_short(value)} cannot be sent as JSON ({exc}); pass "
                                 "strings, numbers, booleans, lists or dicts of them") from None
    return total


def _short(value: Any) -> str:
    text = repr(value)
    return text if len(text) <= 60 else text[:60] + "…"


def _bytes(n: int) -> str:
    if n >= 1024 * 1024:
        return f"{n / (1024 * 1024):.1f} MiB ({n} bytes)"
    if n >= 1024:
        return f"{n / 1024:.1f} KiB ({n} bytes)"
    return f"{n} bytes"
