"""Retrying a call that fails for a transient reason (a storage or network hiccup)."""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import TypeVar

T = TypeVar("T")


def with_backoff(
    fn: Callable[[], T],
    *,
    attempts: int,
    first_delay_s: float,
    transient: Callable[[Exception], bool],
    give_up: Callable[[Exception, int], BaseException],
) -> T:
    """`fn()`, called again after `first_delay_s`, then twice as long each time, while it raises
    an exception that `transient` accepts; any other exception propagates at once. After the
    last of `attempts` calls, `give_up(exc, attempts)` is raised from the last exception."""
    delay = first_delay_s
    for attempt in range(1, attempts + 1):
        try:
            return fn()
        except Exception as exc:
            if not transient(exc):
                raise
            if attempt >= attempts:
                raise give_up(exc, attempt) from exc
        time.sleep(delay)
        delay *= 2
    raise AssertionError("attempts must be >= 1")


def oserror_not_missing(exc: Exception) -> bool:
    """An `OSError` other than `FileNotFoundError` (a file that is absent stays absent)."""
    return isinstance(exc, OSError) and not isinstance(exc, FileNotFoundError)


__all__ = ["oserror_not_missing", "with_backoff"]
