"""A GPU worker admits its requests to GPU memory first come, first served, failing open (no servers)."""

from __future__ import annotations

import threading

from workers.admission import Admission
from workers.gpu import InFlight

TOTAL = 10_000


def admission(others_mb: list[int]) -> tuple[Admission, InFlight]:
    inflight = InFlight()
    return Admission(lambda: TOTAL - others_mb[0] - inflight.memory_mb, inflight), inflight


def test_a_request_that_fits_is_admitted_at_once_and_its_memory_counted_until_it_leaves():
    line, inflight = admission([0])
    ticket = line.enter(4000)
    assert line.try_admit(ticket)
    assert (inflight.count, inflight.memory_mb) == (1, 4000)
    line.leave(ticket)
    assert (inflight.count, inflight.memory_mb) == (0, 0)


def test_a_large_request_at_the_head_is_not_overtaken_by_small_ones_behind_it():
    line, _ = admission([0])
    running = line.enter(8000)
    assert line.try_admit(running)
    large, small = line.enter(5000), line.enter(1000)
    assert not line.try_admit(large)
    assert not line.try_admit(small)  # 1000 MB would fit, but the large one came first

    line.leave(running)
    assert line.try_admit(large)
    assert line.try_admit(small)


def test_with_none_of_ours_running_the_head_is_admitted_even_if_other_tenants_leave_too_little():
    line, _ = admission([9_500])
    ticket = line.enter(4000)
    assert line.try_admit(ticket)  # fails open: it runs, or fails with the model's own out-of-memory error


def test_a_waiting_request_is_admitted_when_memory_frees_and_gives_up_when_the_line_closes():
    line, _ = admission([0])
    first = line.enter(9000)
    line.try_admit(first)
    waiting, closed = line.enter(5000), line.enter(5000)
    admitted = []
    waiter = threading.Thread(target=lambda: admitted.append(line.wait(waiting)))
    waiter.start()
    line.leave(first)
    waiter.join(5)
    assert admitted == [True]

    line.close()
    assert line.wait(closed) is False


def test_other_tenants_freeing_memory_admits_the_head_without_any_of_ours_leaving():
    others = [6_000]
    line, _ = admission(others)
    running = line.enter(1000)
    line.try_admit(running)
    head = line.enter(5000)
    assert not line.try_admit(head)
    others[0] = 1_000
    assert line.try_admit(head)
