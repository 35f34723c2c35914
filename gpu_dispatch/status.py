"""``gpu-dispatch status``: every registered GPU, its live state, score and chance of being picked.

One snapshot = one list from Nacos + one pipelined ``LLEN`` per GPU queue +
the scoring's own explanation (:func:`scoring.explain`), so the table shows
exactly what a dispatcher would decide on, including why a GPU is excluded.
"""

from __future__ import annotations

import time
from typing import Any

import redis

from gpu_dispatch.registry import Registry
from scoring import Candidate, MalformedMetadata, Profile, Request, explain, parse_instance

COLUMNS = ("host", "gpu", "name", "queue", "free_mb", "total_mb", "util", "in_flight", "queue_depth",
           "age_s", "source", "score", "probability", "excluded")


def snapshot(registry: Registry, broker: redis.Redis, profile: Profile, request: Request) -> list[dict[str, Any]]:
    """One row per registered instance (malformed ones included, with the reason), scored as a
    dispatcher with ``profile`` would score ``request``."""
    now_ms = int(time.time() * 1000)
    rows: dict[str, dict[str, Any]] = {}
    candidates = []
    for instance in registry.list_instances(healthy_only=False):
        meta = instance.metadata
        row = {**dict.fromkeys(COLUMNS), "key": instance.key, "host": instance.ip, "gpu": meta.get("gpu_index"),
               "name": meta.get("gpu_name"), "queue": meta.get("queue"), "source": meta.get("source"),
               "probability": 0.0}
        rows[instance.key] = row
        try:
            state = parse_instance(instance.ip, instance.port, meta, healthy=instance.healthy,
                                   enabled=instance.enabled, now_ms=now_ms)
        except MalformedMetadata as exc:
            row["excluded"] = exc.reason
            continue
        age = state.age_s(now_ms)
        row.update(free_mb=state.memory_free_mb, total_mb=state.memory_total_mb, util=state.gpu_util,
                   in_flight=state.concurrent_requests, age_s=None if age is None else round(age, 1))
        candidates.append(state)
    with broker.pipeline() as pipe:
        for state in candidates:
            pipe.llen(state.queue)
        depths = pipe.execute()
    for state, depth in zip(candidates, depths):
        rows[state.key]["queue_depth"] = depth
    reports = explain([Candidate(s, queue_depth=d) for s, d in zip(candidates, depths)], request,
                      profile=profile, now_ms=now_ms)
    for report in reports:
        rows[report.key].update(score=report.score, probability=report.probability, excluded=report.dropped)
    return sorted(rows.values(), key=lambda r: (r["host"], str(r["gpu"])))


def render(rows: list[dict[str, Any]], profile: Profile, request: Request):
    """A rich Table of the rows (colour where the terminal supports it)."""
    from rich.table import Table

    table = Table(title=f"GPUs in Nacos — profile {profile.name!r}, request {request.describe()}, "
                        f"{time.strftime('%H:%M:%S')}")
    for column in COLUMNS:
        table.add_column(column, justify="right" if column not in {"host", "name", "queue", "source",
                                                                   "excluded"} else "left")
    for row in rows:
        style = "dim" if row["excluded"] else ("bold green" if row["probability"] >= 0.3 else "")
        table.add_row(*[_cell(row.get(column), column) for column in COLUMNS], style=style)
    if not rows:
        table.caption = "no GPU registered"
    return table


def _cell(value: Any, column: str) -> str:
    if value is None:
        return "-"
    if column == "probability":
        return f"{value:.1%}"
    if column == "score":
        return f"{value:.3f}"
    return str(value)
