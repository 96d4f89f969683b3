"""The counter app of ``apps.py`` with a fault switch, for fail-stop tests in a real process.

Once the file ``TENANTDB_TEST_FAULT_FILE`` exists, the loop named by ``TENANTDB_TEST_FAULT``
dies of an exception no loop expects: ``shipper`` (``Shipper.ship_once`` raises
``ValueError``) or ``renewal`` (``Lease.renew`` raises ``RecursionError``).
Serve with ``uvicorn tests.support.faulty_app:app``.
"""

from __future__ import annotations

import os
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

from tenantdb.protocol.lease import Lease
from tenantdb.replication.shipper import Shipper
from tests.support.apps import starlette_app

__all__ = ["app"]

_MARKER = Path(os.environ["TENANTDB_TEST_FAULT_FILE"])
_FAULTS: dict[str, tuple[type, str, type[Exception]]] = {
    "shipper": (Shipper, "ship_once", ValueError),
    "renewal": (Lease, "renew", RecursionError),
}


def _arm(owner: type, name: str, error: type[Exception]) -> None:
    original: Callable[..., Awaitable[Any]] = getattr(owner, name)

    async def faulty(self: Any, *args: Any, **kwargs: Any) -> Any:
        if _MARKER.exists():
            raise error(f"injected into {owner.__name__}.{name}")
        return await original(self, *args, **kwargs)

    setattr(owner, name, faulty)


_arm(*_FAULTS[os.environ["TENANTDB_TEST_FAULT"]])
app = starlette_app
