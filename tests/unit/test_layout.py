"""The import graph runs one way (docs/architecture.md, "Layers"): a small base that apps, workers and
the dispatcher share; workers and the dispatcher never import each other; the tools on top.  Read from
the source (every import statement, lazy ones included), and from what an application's import loads."""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
#: Our packages, and which of them each may import (besides itself).
ALLOWED = {
    "gpu_dispatch": set(),
    "scoring": {"gpu_dispatch"},
    "workers": {"gpu_dispatch"},
    "dispatcher": {"gpu_dispatch", "scoring"},
    "gpu_dispatch_tools": {"gpu_dispatch", "scoring", "workers", "dispatcher"},
}


def imports(package: str) -> dict[str, set[str]]:
    """Each module of ``package`` → the packages of ours it imports."""
    found = {}
    for path in sorted((ROOT / package).rglob("*.py")):
        names = set()
        for node in ast.walk(ast.parse(path.read_text(), str(path))):
            if isinstance(node, ast.Import):
                names.update(alias.name.split(".")[0] for alias in node.names)
            elif isinstance(node, ast.ImportFrom) and node.module and not node.level:
                names.add(node.module.split(".")[0])
        found[str(path.relative_to(ROOT))] = names & set(ALLOWED)
    return found


def test_every_package_imports_only_the_layers_below_it():
    wrong = {module: sorted(used - ALLOWED[package] - {package})
             for package in ALLOWED for module, used in imports(package).items()
             if used - ALLOWED[package] - {package}}
    assert wrong == {}


def test_the_package_graph_has_no_cycle():
    edges = {package: {used for names in imports(package).values() for used in names} - {package}
             for package in ALLOWED}
    seen: dict[str, int] = {}

    def visit(package: str, path: tuple[str, ...]) -> None:
        assert package not in path, f"import cycle: {' → '.join(path + (package,))}"
        for used in edges[package]:
            visit(used, path + (package,))

    for package in ALLOWED:
        visit(package, ())
    assert seen == {}


def test_importing_the_dispatcher_loads_no_worker_code():
    """What an application does: `from dispatcher import dispatch_inference`."""
    code = ("import sys, dispatcher; print(','.join(sorted(m for m in sys.modules "
            "if m.split('.')[0] in ('workers', 'gpu_dispatch_tools'))))")
    done = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == ""
