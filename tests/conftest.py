"""Settings for the whole test run, fixed before any project module is imported.

Integration tests run their own Redis and Nacos on non-default ports, so a
developer's servers on the default ports (6379, 8848) are never touched.  Their
Nacos runs with auth on: its admin is the user below, with a password made for
the session, and every client and process the tests start (workers, beat, the
dispatcher) logs in with them, through the same environment variables a user sets.
"""

import os
import secrets

#: Ports of the servers the test session starts (Nacos also uses +1000 and +1001 for gRPC, -1000 for JRaft).
#: Override with GPU_DISPATCH_TEST_REDIS_PORT / GPU_DISPATCH_TEST_NACOS_PORT to run two test sessions at once
#: (give each its own GPU_DISPATCH_HOME too: pid files live there).
TEST_REDIS_PORT = int(os.environ.get("GPU_DISPATCH_TEST_REDIS_PORT", 16399))
TEST_NACOS_PORT = int(os.environ.get("GPU_DISPATCH_TEST_NACOS_PORT", 18848))
#: First HTTP port of the 3-node Nacos cluster of the `ha` tests (nodes 20 apart; override with
#: GPU_DISPATCH_TEST_NACOS_HA_PORT).
TEST_NACOS_HA_PORT = int(os.environ.get("GPU_DISPATCH_TEST_NACOS_HA_PORT", 18900))

#: The test Redis wants a password, as any shared Redis would; tests check it never leaks (test_security.py).
REDIS_PASSWORD = os.environ.setdefault("GPU_DISPATCH_TEST_REDIS_PASSWORD", "redis-" + secrets.token_hex(8))
os.environ["GPU_DISPATCH_BROKER_URL"] = f"redis://:{REDIS_PASSWORD}@127.0.0.1:{TEST_REDIS_PORT}/0"
os.environ["GPU_DISPATCH_RESULT_BACKEND"] = f"redis://:{REDIS_PASSWORD}@127.0.0.1:{TEST_REDIS_PORT}/1"
os.environ["GPU_DISPATCH_NACOS_SERVER"] = f"127.0.0.1:{TEST_NACOS_PORT}"
#: The test Nacos's admin user; its password is new each session (never printed).
TEST_NACOS_USERNAME = "gpu-dispatch-test"
os.environ["GPU_DISPATCH_NACOS_USERNAME"] = TEST_NACOS_USERNAME
os.environ["GPU_DISPATCH_NACOS_PASSWORD"] = secrets.token_urlsafe(18)
for name in ("GPU_DISPATCH_NACOS_NAMESPACE", "GPU_DISPATCH_NACOS_SERVICE", "GPU_DISPATCH_NACOS_GROUP"):
    os.environ.pop(name, None)
