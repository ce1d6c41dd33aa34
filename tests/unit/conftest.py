"""Unit tests must not start Ray or sleep: stages are tested by calling them directly."""

import time

import pytest


@pytest.fixture(autouse=True)
def _no_ray_no_sleep(monkeypatch):
    def forbidden(*args, **kwargs):
        raise RuntimeError("unit tests must not start Ray or sleep; use tests/integration")

    monkeypatch.setattr(time, "sleep", forbidden)
    try:
        import ray

        monkeypatch.setattr(ray, "init", forbidden)
    except ImportError:  # pragma: no cover
        pass
    yield
