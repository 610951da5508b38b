"""Request ids: unique across processes and cheap (no system call per request, unlike uuid4)."""

from __future__ import annotations

import itertools
import os


class RequestIds:
    """A random 64-bit prefix per process and a counter: `<16 hex><12 hex>`."""

    def __init__(self) -> None:
        self._prefix = os.urandom(8).hex()
        self._counter = itertools.count(1)

    def next(self) -> str:
        return f"{self._prefix}{next(self._counter):012x}"
