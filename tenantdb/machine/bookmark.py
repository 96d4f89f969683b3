"""A position in the tenant's log (``<generation>.<index>``): a bookmark's, a tail hint's."""

from __future__ import annotations

import re
from dataclasses import dataclass

from tenantdb.protocol.lockfile import LockRecord, SnapshotName

__all__ = ["Bookmark"]

_BOOKMARK_RE = re.compile(r"([0-9]{1,12})\.([0-9]{1,15})")


@dataclass(frozen=True, order=True)
class Bookmark:
    """A position in the tenant's log: a copy at or past it holds every write before it."""

    generation: int
    index: int

    def __str__(self) -> str:
        return f"{self.generation}.{self.index}"

    @classmethod
    def parse(cls, text: str) -> Bookmark:
        """Parse ``<generation>.<index>``; ``ValueError`` for anything else."""
        match = _BOOKMARK_RE.fullmatch(text.strip())
        if match is None:
            raise ValueError(f"{text[:40]!r} is not a bookmark (<generation>.<index>)")
        return cls(int(match[1]), int(match[2]))

    @classmethod
    def of(cls, record: LockRecord) -> Bookmark:
        """The position of the data ``record`` names.

        Log indices go on across snapshots and generations; a newer generation holds
        everything an older one published, so positions compare generation first.
        """
        if record.log is not None:
            return cls(record.generation, record.log.tail)
        name = SnapshotName.parse(record.snapshot.key) if record.snapshot else None
        base = name.base if name is not None and name.base is not None else 1
        return cls(record.generation, max(base - 1, 0))
