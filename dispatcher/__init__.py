"""The dispatcher: ``dispatch_inference.delay(prompt)`` runs the prompt on the best GPU and returns its answer.

    from dispatcher import dispatch_inference

    dispatch_inference.delay("Explain attention", max_tokens=64).get(timeout=60)

``docs/dispatcher.md`` follows one request through the modules here.
"""

from dispatcher.errors import InvalidRequest, NoGpuAvailable
from dispatcher.tasks import dispatch_inference

__all__ = ["InvalidRequest", "NoGpuAvailable", "dispatch_inference"]
