"""`core.retry.with_backoff`: transient errors are retried with doubling delays, others not."""

from __future__ import annotations

import pytest

from curation.core import retry


def test_retries_transient_then_gives_up(monkeypatch):
    slept: list[float] = []
    monkeypatch.setattr(retry.time, "sleep", slept.append)
    calls = []

    def flaky() -> str:
        calls.append(1)
        if len(calls) < 3:
            raise ConnectionResetError("reset")
        return "ok"

    kw = {"first_delay_s": 0.5, "transient": retry.oserror_not_missing}
    assert retry.with_backoff(flaky, attempts=3, give_up=lambda e, n: RuntimeError(n), **kw) == "ok"
    assert slept == [0.5, 1.0]

    def broken() -> None:
        raise TimeoutError("slow")

    with pytest.raises(RuntimeError, match="gave up after 4") as info:
        retry.with_backoff(
            broken, attempts=4, give_up=lambda e, n: RuntimeError(f"gave up after {n}"), **kw
        )
    assert isinstance(info.value.__cause__, TimeoutError)
    assert slept == [0.5, 1.0, 0.5, 1.0, 2.0]


def test_missing_file_and_other_errors_are_not_retried(monkeypatch):
    monkeypatch.setattr(retry.time, "sleep", lambda s: pytest.fail("slept"))
    for exc in (FileNotFoundError("gone"), ValueError("bad data")):

        def fail(exc: Exception = exc) -> None:
            raise exc

        with pytest.raises(type(exc)):
            retry.with_backoff(
                fail,
                attempts=5,
                first_delay_s=1,
                transient=retry.oserror_not_missing,
                give_up=lambda e, n: RuntimeError(),
            )
