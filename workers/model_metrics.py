"""Load signals from a model server's Prometheus ``/metrics``, as short instance-metadata keys.

A GPU worker that fronts a model server can publish what the server itself
says about its load, beside the worker's own counts:

=====================  =====================================================================
metadata key           meaning (all values are strings, like every metadata value)
=====================  =====================================================================
``model_waiting``      requests queued inside the model server, not yet scheduled
``model_running``      requests the model server is executing now
``kv_cache_used_pct``  KV-cache in use, 0-100 (one decimal)
=====================  =====================================================================

Understood exposition formats (metric names checked against the servers' sources):

- **vLLM** (``vllm serve``; always on): ``vllm:num_requests_waiting``,
  ``vllm:num_requests_running`` and the KV-cache fraction (0..1)
  ``vllm:kv_cache_usage_perc`` (vLLM >= 0.9) or ``vllm:gpu_cache_usage_perc``
  (older; deprecated in 0.9, hidden later).  Series carry labels such as
  ``{engine="0",model_name="..."}``: counts are summed over every label set
  (several engines under data parallelism), the KV-cache fraction is averaged
  over them (two engines at 50 % are 50 % full, not 100 %).
- **llama.cpp's native server** (``llama-server --metrics``; unlabelled):
  ``llamacpp:requests_processing`` (running), ``llamacpp:requests_deferred``
  (waiting) and, in builds before the KV-cache rework of 2025,
  ``llamacpp:kv_cache_usage_ratio`` (0..1); newer builds no longer export a
  KV-cache figure, so only the two counts come back.
- **llama-cpp-python's server** (``python -m llama_cpp.server``, what
  :mod:`gpu_dispatch_tools.model_server` runs) has no ``/metrics`` at all (404):
  :meth:`OpenAIBackend.signals` then returns ``{}``.

:func:`signals_from_exposition` never raises: malformed or unrelated input
gives ``({}, reason)``.
"""

from __future__ import annotations

import math
import re

#: Metadata keys this module may produce (short: the whole Nacos metadata map stays under 900 characters).
WAITING, RUNNING, KV_CACHE = "model_waiting", "model_running", "kv_cache_used_pct"

#: (metadata key, metric names in order of preference, how label sets combine, scale to the published unit).
_VLLM = (
    (WAITING, ("vllm:num_requests_waiting",), "sum", 1.0),
    (RUNNING, ("vllm:num_requests_running",), "sum", 1.0),
    (KV_CACHE, ("vllm:kv_cache_usage_perc", "vllm:gpu_cache_usage_perc"), "mean", 100.0),
)
_LLAMACPP = (
    (WAITING, ("llamacpp:requests_deferred",), "sum", 1.0),
    (RUNNING, ("llamacpp:requests_processing",), "sum", 1.0),
    (KV_CACHE, ("llamacpp:kv_cache_usage_ratio",), "mean", 100.0),
)

# name{labels} value [timestamp]  — labels may hold escaped quotes, commas and braces inside values.
_SAMPLE = re.compile(
    r'^(?P<name>[a-zA-Z_:][a-zA-Z0-9_:]*)'
    r'(?:\{(?P<labels>(?:[^"}]|"(?:[^"\\]|\\.)*")*)\})?'
    r'\s+(?P<value>\S+)(?:\s+-?\d+)?\s*$')
#: Largest body we read (a vLLM /metrics is ~30-100 KB; anything far larger is not one).
MAX_BODY_CHARS = 4 * 1024 * 1024


def parse_exposition(text: str) -> tuple[dict[str, list[float]], int]:
    """Every sample of a Prometheus text exposition, by metric name: ``({name: [values]}, bad lines)``.

    Comments (``# HELP``, ``# TYPE``, others) and blank lines are skipped;
    a line that is not ``name[{labels}] value [timestamp]`` is counted as bad.
    Values that are not finite numbers (``NaN``, ``+Inf``) are dropped.
    """
    samples: dict[str, list[float]] = {}
    bad = 0
    for line in text.splitlines():
        line = line.strip()
        if not line or line.startswith("#"):
            continue
        match = _SAMPLE.match(line)
        if match is None:
            bad += 1
            continue
        try:
            value = float(match["value"])
        except ValueError:
            bad += 1
            continue
        if math.isfinite(value):
            samples.setdefault(match["name"], []).append(value)
    return samples, bad


def signals_from_exposition(text: str) -> tuple[dict[str, str], str | None]:
    """The model-server load signals in ``text`` as metadata, and why there are none (``None`` if some).

    ``({"model_waiting": "2", "model_running": "5", "kv_cache_used_pct": "42.5"}, None)`` for a vLLM
    exposition; ``({}, "no vllm: or llamacpp: metrics ...")`` for a page of something else. Never raises.
    """
    try:
        if not isinstance(text, str):
            return {}, f"metrics body is {type(text).__name__}, not text"
        if len(text) > MAX_BODY_CHARS:
            return {}, f"metrics body of {len(text)} characters is too large to be a model server's"
        samples, bad = parse_exposition(text)
        for table in (_VLLM, _LLAMACPP):
            signals = _read(samples, table)
            if signals:
                return signals, None
        if not samples:
            why = f"{bad} malformed line(s)" if bad else "no samples"
            return {}, f"not a Prometheus text exposition ({why})"
        return {}, (f"no vllm: or llamacpp: load metrics among {len(samples)} metric name(s) "
                    "(not a vLLM or llama.cpp server, or its metrics are off)")
    except Exception as exc:  # a parser for untrusted input: never take the worker's refresh down
        return {}, f"cannot read the metrics: {type(exc).__name__}: {exc}"


def _read(samples: dict[str, list[float]], table) -> dict[str, str]:
    out: dict[str, str] = {}
    for key, names, combine, scale in table:
        for name in names:
            values = samples.get(name)
            if values:
                total = sum(values) if combine == "sum" else sum(values) / len(values)
                out[key] = _format(total * scale, whole=combine == "sum")
                break
    return out


def _format(value: float, whole: bool) -> str:
    if whole:
        return str(int(round(value)))
    return f"{min(max(value, 0.0), 100.0):.1f}"
