"""Read settings from ``celeryconfig``, a Celery ``app.conf`` or a mapping, with per-call overrides."""

from __future__ import annotations

from typing import Any, Callable, Mapping


def getter(conf: Any, **overrides: Any) -> Callable[[str], Any]:
    """``get(name)``: ``overrides[name]`` when given, else setting ``name`` of ``conf``."""
    def get(name: str) -> Any:
        if name in overrides:
            return overrides[name]
        return conf[name] if isinstance(conf, Mapping) else getattr(conf, name)
    return get
