"""Tools on top of gpu-dispatch: the ``gpu-dispatch`` command, its status view and demo, and the
local-server tooling (Redis, Sentinel, Nacos, llama.cpp servers, test hosts) for development and tests.

Nothing in ``gpu_dispatch``, ``scoring``, ``workers`` or ``dispatcher`` imports this package
(docs/architecture.md, "Layers").
"""
