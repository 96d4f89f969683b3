"""InFlight: the requests of this machine's tenant that run now, which the shutdown waits for."""

from __future__ import annotations

import asyncio

__all__ = ["InFlight"]


class InFlight:
    """``with in_flight:`` around each request; ``idle`` is set while none runs.

    A class's own ``__enter__``/``__exit__``, not ``@contextmanager``: it runs once per
    request, and a generator made and driven for each costs several times as much.
    """

    def __init__(self) -> None:
        self.count = 0
        self.idle = asyncio.Event()
        self.idle.set()

    def __enter__(self) -> None:
        self.count += 1
        self.idle.clear()

    def __exit__(self, *exc_info: object) -> None:
        self.count -= 1
        if self.count == 0:
            self.idle.set()
