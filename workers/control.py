"""Remote-control commands of GPU workers (``celery -A gpu_dispatch inspect/control ...``).

``gpu_set_tenants``: change the other tenants' load on a simulated GPU while
it runs — what the demo and the tests use to show the dispatcher follow load::

    celery -A gpu_dispatch control gpu_set_tenants nearly-full -d gpu0@host
"""

from celery.worker.control import control_command

from workers import runtime
from workers.gpu import TENANT_PROFILES, SimulatedGpu


@control_command(args=[("tenants", str)], signature="<" + "|".join(TENANT_PROFILES) + ">")
def gpu_set_tenants(state, tenants: str) -> dict:
    """Set the other tenants' profile of this worker's simulated GPU."""
    gpu = runtime.current().gpu
    if not isinstance(gpu, SimulatedGpu):
        return {"error": f"GPU {gpu.index} is read through {gpu.source}; only a simulated GPU's load can be set"}
    try:
        gpu.set_tenants(tenants)
    except ValueError as exc:
        return {"error": str(exc)}
    return {"ok": f"GPU {gpu.index}: other tenants now {tenants}"}
