"""Celery's Redis result backends, with a fence: an outcome whose claim its worker lost is not stored.

A GPU worker claims a request's one outcome in the ledger (``finish``), then
Celery stores it.  If the worker is cut off between the two (a network cut, a
long pause), its lease runs out, recovery finds the claim unsettled and
re-dispatches the request; another GPU answers it.  When the cut-off worker
comes back, Celery's store — retried all along (``result_backend_always_retry``)
— would land a second outcome over the first one the caller may already have
read.  So each try of the store asks the worker's fence first
(:meth:`workers.runtime.GpuWorker.may_store`): cheap while the worker's lease
has never lapsed since the claim, a look at the ledger otherwise.

Selected for the ``redis://``, ``rediss://`` and ``sentinel://`` schemes by
``celeryconfig.override_backends``; in a process that is no GPU worker (no
fence installed) they are Celery's own.
"""

from __future__ import annotations

import logging
from typing import Callable

from celery.backends.redis import RedisBackend as _RedisBackend, SentinelBackend as _SentinelBackend

log = logging.getLogger(__name__)

#: ``fence(task_id, state) -> bool``: whether this process may store that outcome now (``None``: always).
_fence: Callable[[str, str], bool] | None = None


def install_fence(fence: Callable[[str, str], bool] | None) -> None:
    """Make ``fence`` decide every result this process stores (a GPU worker installs its own)."""
    global _fence
    _fence = fence


class _Fenced:
    def _store_result(self, task_id, result, state, traceback=None, request=None, **kwargs):
        fence = _fence
        if fence is not None and not fence(task_id, state):
            log.warning("task %s: outcome %s not stored: this worker lost its claim on it while cut off (its "
                        "lease ran out, the request was re-dispatched)", task_id, state)
            return result
        return super()._store_result(task_id, result, state, traceback, request=request, **kwargs)


class RedisBackend(_Fenced, _RedisBackend):
    pass


class SentinelBackend(_Fenced, _SentinelBackend):
    pass
