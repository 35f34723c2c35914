"""What recovery re-dispatches, and why (dispatcher.recovery.due): a table of ledger records in, decisions
out — no servers."""

from __future__ import annotations

import pytest

from dispatcher.recovery import OWNERLESS_SWEEPS, TRANSIT_GRACE_MS, due
from gpu_dispatch.ledger import Record

NOW = 1_800_000_000_000
Q, DEAD_Q = "gpu.10.0.0.1.8000", "gpu.10.0.0.9.8000"


def record(state: str, queue: str = Q, holder: str | None = None, sent_ago_ms: int = 10_000) -> Record:
    return Record(id=f"{state}-{queue}-{holder}", state=state, queue=queue, attempt=1, memory_mb=1,
                  sent_ms=NOW - sent_ago_ms, holder=holder, started_ms=None, running_ms=None,
                  message={"args": ["p"], "kwargs": {}}, path="producer")


ALIVE = {"live": True, "dead": False}
OWNERS = {Q: "live", DEAD_Q: None}


@pytest.mark.parametrize("case, r, ownerless, missing, suspected, expected", [
    ("running on a live incarnation", record("running", holder="live"), {}, {}, set(), None),
    ("running on a dead incarnation", record("running", holder="dead"), {}, {}, set(), "holder"),
    ("started (waiting for memory) on a dead incarnation", record("started", holder="dead"), {}, {}, set(),
     "holder"),
    ("waiting for a queue with a live owner", record("queued"), {}, {}, set(), None),
    ("waiting for a queue ownerless for one sweep", record("queued", DEAD_Q), {DEAD_Q: 1}, {}, set(), None),
    ("waiting for a queue ownerless long enough", record("queued", DEAD_Q), {DEAD_Q: OWNERLESS_SWEEPS}, {},
     set(), "ownerless"),
    ("missing from its queue's lists once", record("queued"), {}, {Q: {"queued-" + Q + "-None"}}, set(), None),
    ("missing twice: lost in transit", record("queued"), {}, {Q: {"queued-" + Q + "-None"}},
     {"queued-" + Q + "-None"}, "lost"),
    ("missing twice but just sent (not published yet)", record("queued", sent_ago_ms=TRANSIT_GRACE_MS // 2), {},
     {Q: {"queued-" + Q + "-None"}}, {"queued-" + Q + "-None"}, None),
    ("its outcome claimed: left to the settle check", record("finishing"), {DEAD_Q: 9}, {}, set(), None),
])
def test_a_record_is_re_dispatched_only_for_a_reason(case, r, ownerless, missing, suspected, expected):
    decided = due([r], ALIVE, OWNERS, ownerless, missing, suspected, NOW)
    assert decided.get(r.id) == expected, case
