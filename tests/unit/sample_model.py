"""Callables for the python backend's tests (loaded as GPU_DISPATCH_PYTHON_CALLABLE=tests.unit.sample_model:...)."""

import os


def visible_devices(prompt: str, max_tokens: int, **options) -> str:
    """The CUDA devices the worker process was pinned to."""
    return os.environ.get("CUDA_VISIBLE_DEVICES", "(unset)")


def shout(prompt: str, max_tokens: int, **options) -> str:
    return prompt.upper()[:max_tokens]


def with_usage(prompt: str, max_tokens: int, **options) -> dict:
    return {"text": prompt[::-1], "tokens": len(prompt)}


def wrong_type(prompt: str, max_tokens: int, **options) -> int:
    return 42


NOT_CALLABLE = "just a string"
