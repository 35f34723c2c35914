"""dispatch_inference against real Redis, real Nacos and simulated GPU workers: routing and results."""

from __future__ import annotations

from dispatcher import dispatch_inference
from tests.integration.dispatch_support import start_dispatcher, start_gpus, wait_for_gpus


def test_the_producer_path_returns_the_inference_result_on_the_callers_async_result(
        service_name, celery_processes, producer_view):
    start_gpus(service_name, celery_processes, ["idle"])
    wait_for_gpus(producer_view, 1)

    result = dispatch_inference.delay("hello GPU", max_tokens=4)
    answer = result.get(timeout=30)

    assert answer["task_id"] == result.id
    assert answer["gpu"]["queue"] == "gpu.127.0.0.1.8000"
    assert answer["text"] and answer["usage"]["completion_tokens"] == 4


def test_the_central_path_forwards_to_a_gpu_and_the_callers_result_is_the_inference(
        service_name, celery_processes, central_mode):
    start_gpus(service_name, celery_processes, ["idle"])
    start_dispatcher(service_name, celery_processes)

    result = dispatch_inference.delay("hello GPU", max_tokens=4)
    answer = result.get(timeout=30)

    assert answer["task_id"] == result.id
    assert answer["gpu"]["queue"] == "gpu.127.0.0.1.8000"
