"""A process that registers one instance and then waits to be killed (used by the liveness tests).

Usage: python -m tests.integration.register_instance SERVICE IP PORT KEY=VALUE...
Prints ``registered`` once the instance is in Nacos.
"""

import signal
import sys

import celeryconfig
from gpu_dispatch.registry import Registry

service, ip, port, *pairs = sys.argv[1:]
registry = Registry.from_config(celeryconfig, nacos_service=service)
registry.register(ip, int(port), dict(pair.split("=", 1) for pair in pairs))
print("registered", flush=True)
signal.pause()
