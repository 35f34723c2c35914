"""``gpu-dispatch status``: every registry entry, its reading, its ledger load, score and chance of being picked.

One snapshot is one pass of a dispatcher's own view (:class:`dispatcher.view.RegistryView`:
Nacos list, broker-side claims, ledger loads) scored with :func:`scoring.explain`,
so the table shows exactly what a dispatcher decides on, including why an
entry is excluded.  One row per Nacos entry (a foreign registration of a
GPU's address is a row of its own).
"""

from __future__ import annotations

import time
from typing import Any

from dispatcher.view import RegistryView
from scoring import Profile, Request, explain

COLUMNS = ("instance", "incarnation", "gpu", "name", "queue", "free_mb", "total_mb", "util", "running", "queued",
           "held_mb", "age_s", "source", "score", "probability", "excluded")


def snapshot(view: RegistryView, profile: Profile, request: Request) -> dict[str, Any]:
    """The view's entries as rows, scored as a dispatcher with ``profile`` would score ``request``."""
    now_ms = int(time.time() * 1000)
    verdicts, loads = view.verdicts(), view.loads()
    candidates = view.candidates()
    reports = {r.key: r for r in explain(candidates, request, profile=profile, now_ms=now_ms)}
    rows = []
    for v in verdicts:
        reading, entry = v.reading, v.entry
        meta = entry.metadata if entry is not None else {}
        row = {**dict.fromkeys(COLUMNS), "instance": v.instance, "verdict": v.kind, "note": v.note,
               "excluded": v.reason, "probability": 0.0,
               "incarnation": v.claim.incarnation if v.claim else meta.get("incarnation"),
               "gpu": meta.get("gpu_index"), "name": meta.get("gpu_name"), "queue": meta.get("queue"),
               "source": meta.get("source")}
        if reading is not None:
            load = loads.get(reading.queue)
            age = reading.age_s(now_ms)
            row.update(gpu=str(reading.gpu_index), name=reading.gpu_name, queue=reading.queue, source=reading.source,
                       free_mb=reading.memory_free_mb, total_mb=reading.memory_total_mb, util=reading.gpu_util,
                       age_s=None if age is None else round(age, 1))
            if load is not None:
                row.update(running=load.running, queued=load.queued, held_mb=load.running_mb)
        report = reports.get(v.instance) if v.state is not None else None
        if report is not None:
            row.update(score=report.score, probability=report.probability, excluded=report.dropped)
        rows.append(row)
    rows.sort(key=lambda r: (r["instance"], r["verdict"] != "trusted"))
    return {"service": view.service, "profile": profile.name, "request": request.describe(),
            "registry_outage_s": view.registry_outage_s(), "rows": rows}


def render(snap: dict[str, Any]):
    """A rich Table of a snapshot (colour where the terminal supports it)."""
    from rich.table import Table

    outage = snap["registry_outage_s"]
    title = (f"GPUs of {snap['service']!r} — profile {snap['profile']!r}, request {snap['request']}, "
             f"{time.strftime('%H:%M:%S')}")
    if outage is not None:
        title += f" — Nacos unreachable for {outage:.0f} s: GPUs proven by the broker"
    table = Table(title=title)
    text_columns = {"instance", "incarnation", "name", "queue", "source", "excluded"}
    for column in COLUMNS:
        table.add_column(column, justify="left" if column in text_columns else "right")
    for row in snap["rows"]:
        style = "dim" if row["excluded"] else ("bold green" if row["probability"] >= 0.3 else "")
        table.add_row(*[_cell(row.get(column), column) for column in COLUMNS], style=style)
    if not snap["rows"]:
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
