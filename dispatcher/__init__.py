"""The dispatcher: ``dispatch_inference.delay(prompt)`` runs the prompt on the best GPU and returns its answer.

    from dispatcher import dispatch_inference

    result = dispatch_inference.delay("Explain attention", max_tokens=64)
    result.get(timeout=60)  # {"text": ..., "gpu": {...}, "timings": {...}, ...}

Read in the order a request flows: :mod:`dispatcher.request` (the call is
checked), :mod:`dispatcher.view` (the live view of the GPUs),
:mod:`dispatcher.tasks` (the producer and central paths),
:mod:`dispatcher.rescue` (orphaned queues), :mod:`dispatcher.metrics`.
``docs/dispatcher.md`` explains the design and its measurements.
"""

from dispatcher.errors import InvalidRequest, NoGpuAvailable
from dispatcher.tasks import dispatch_inference

__all__ = ["InvalidRequest", "NoGpuAvailable", "dispatch_inference"]
