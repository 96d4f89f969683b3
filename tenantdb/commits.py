"""Tell whether a connection committed a change, from the statements SQLite runs on it.

The output gate holds a response only if its request's connection committed something.
Python's sqlite3 exposes no commit hook, but its trace callback sees every statement a
connection steps, the implicit ``BEGIN`` and ``COMMIT`` of the ``sqlite3`` module and each
statement of ``executescript`` included. Each statement is sorted by its first keyword: a
read, a transaction boundary, or (anything else, to be safe) a write. A write outside a
transaction commits when it completes; inside one, it counts once the transaction commits.
Doubt always falls on the side of "committed": it costs a wait, never an acknowledged
write that is not durable.
"""

from __future__ import annotations

import re
from collections.abc import Callable

__all__ = ["CommitTracker"]

# Comments and whitespace before a statement's first keyword, then the keyword.
_FIRST_WORD = re.compile(r"(?:\s+|--[^\n]*(?:\n|$)|/\*.*?\*/)*([A-Za-z]*)", re.DOTALL)
_READS = frozenset({"SELECT", "VALUES", "EXPLAIN", "BEGIN", "SAVEPOINT"})
_COMMITS = frozenset({"COMMIT", "END", "RELEASE"})
# A WITH statement (a common table expression) writes only if its last part does.
_WRITE_VERB = re.compile(r"\b(?:INSERT|UPDATE|DELETE|REPLACE)\b", re.IGNORECASE)
_ROLLBACK_TO = re.compile(r"ROLLBACK\s+(?:TRANSACTION\s+)?TO\b", re.IGNORECASE)


class CommitTracker:
    """Follows one connection's statements; ``take()`` says whether it committed since."""

    __slots__ = ("_committed", "_in_transaction", "_pending")

    def __init__(self, in_transaction: Callable[[], bool]) -> None:
        """``in_transaction`` reads the traced connection's state (called while tracing)."""
        self._in_transaction = in_transaction
        self._pending = False  # a write of the open transaction, not committed yet
        self._committed = False

    def take(self) -> bool:
        """Whether a commit with changes ran since the last call (and reset that)."""
        committed, self._committed = self._committed, False
        return committed

    def trace(self, statement: str) -> None:
        """The connection's trace callback: called as each statement starts."""
        match = _FIRST_WORD.match(statement)
        word = match.group(1).upper() if match else ""
        if word in _READS:
            return
        if word == "PRAGMA":
            # PRAGMA x = v and PRAGMA x(v) may set something (user_version, say).
            if "=" in statement or "(" in statement:
                self._wrote()
        elif word in _COMMITS:
            # RELEASE commits only when it ends the outermost savepoint: assume it does.
            self._committed = self._committed or self._pending
            if word != "RELEASE":
                self._pending = False
        elif word == "ROLLBACK":
            if not (match and _ROLLBACK_TO.match(statement, match.start(1))):
                self._pending = False
        elif word != "WITH" or _WRITE_VERB.search(statement):
            self._wrote()

    def _wrote(self) -> None:
        if self._in_transaction():
            self._pending = True
        else:
            self._committed = True  # autocommit: the statement commits as it completes
