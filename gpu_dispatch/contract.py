"""Names other parts and other teams rely on (DESIGN.md, "External contract"), written once."""

#: Queue the apps' dispatch_inference requests go to (central dispatcher workers consume it).
DISPATCH_QUEUE = "dispatch"
#: Fan-out exchange that carries refresh_gpu_metadata to every GPU worker.
REFRESH_EXCHANGE = "gpu.refresh"

DISPATCH_TASK = "dispatch_inference"
INFERENCE_TASK = "run_inference"
REFRESH_TASK = "refresh_gpu_metadata"


def gpu_queue(ip: str, port: int) -> str:
    """The per-GPU queue of the instance at ``ip:port`` (also published in its metadata as ``queue``)."""
    return f"gpu.{ip}.{port}"
