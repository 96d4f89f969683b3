"""How a machine's process ends itself: failed stop (exit 70) or idle (exit 0), gracefully.

The middleware's lifespan starts two watchers of its TenantDB; when one fires, the server is
asked to shut down as on SIGTERM (requests in flight end, the final publish runs), and the
process then exits with the watcher's code. A thread keeps the kill-timeout deadline, in
case the event loop is what got stuck.
"""

from __future__ import annotations

import asyncio
import logging
import os
import signal
import threading

from tenantdb.machine.database import TenantDB
from tenantdb.machine.supervisor import FAIL_STOP_EXIT_CODE

__all__ = ["ProcessEnd"]

log = logging.getLogger("tenantdb")


class ProcessEnd:
    """Ends the server's process when its machine failed or went idle (if it is the server's
    to end: ``exit_on_failure`` and a server on the main thread that handles SIGTERM)."""

    def __init__(self, *, exit_on_failure: bool, kill_timeout: float) -> None:
        self.exit_on_failure = exit_on_failure
        self.kill_timeout = kill_timeout
        self._exit_code: int | None = None  # set when the process must end (failed or idle)
        self._watchdog: threading.Timer | None = None  # ends a shutdown that overruns

    def watch(self, tdb: TenantDB) -> list[asyncio.Task[None]]:
        """Start the watchers of ``tdb``; a shutdown they start lasts ``kill_timeout`` at most."""
        watchers = []
        for watch in (self._stop_on_failure, self._stop_when_idle):
            watcher = asyncio.create_task(watch(tdb))
            watcher.add_done_callback(self._watcher_ended)
            watchers.append(watcher)
        return watchers

    async def _stop_on_failure(self, tdb: TenantDB) -> None:
        """Once the machine has failed stop, shut the server down so the process exits."""
        reason = await tdb.failed()
        if not self.can_exit():
            # An embedding program (a test, a server in a thread) restarts it, not Fly.
            log.critical(
                "tenantdb: this machine failed (%s); it answers 503 until restarted", reason
            )
            return
        log.critical(
            "tenantdb: this machine failed (%s); shutting the server down, exit code %d",
            reason,
            FAIL_STOP_EXIT_CODE,
        )
        await self.end(FAIL_STOP_EXIT_CODE)

    async def _stop_when_idle(self, tdb: TenantDB) -> None:
        """Once the tenant is idle (``TENANTDB_IDLE_STOP``), end the process with code 0.

        Fly's restart policy ``on-failure`` leaves a machine that exited 0 stopped, and its
        proxy starts it again on the next request (autostart): an idle tenant costs nothing.
        """
        await tdb.idle()
        if not self.can_exit():
            log.info("tenantdb: the tenant is idle, but the server runs in a thread: it goes on")
            return
        log.info("tenantdb: the tenant is idle; shutting the server down, exit code 0")
        await self.end(0)

    def _watcher_ended(self, watcher: asyncio.Task[None]) -> None:
        """A watcher that dies could never end the process: that machine would be
        half-alive, so it ends here, loudly."""
        if watcher.cancelled() or (exc := watcher.exception()) is None:
            return
        log.critical("tenantdb: a watcher of this machine died", exc_info=exc)
        if self.can_exit():
            os._exit(FAIL_STOP_EXIT_CODE)

    def can_exit(self) -> bool:
        """Whether ending the process is this server's to do (see ``exit_on_failure``)."""
        return self.exit_on_failure and _server_handles_sigterm()

    async def end(self, code: int) -> None:
        """Shut the server down gracefully, then exit with ``code``."""
        if self._exit_code is not None:
            # Already shutting down (idle, then failed): a failure still shows in the code.
            self._exit_code = max(self._exit_code, code)
            return
        self._exit_code = code
        # A connection that never ends (a websocket, a stream, a stuck handler) would hold
        # the shutdown, and the half-alive process, forever. The deadline is kept by a
        # thread, not the event loop: a failed machine's loop may be what is stuck.
        self._watchdog = threading.Timer(self.kill_timeout, self._exit_now)
        self._watchdog.daemon = True
        self._watchdog.start()
        # Servers take SIGTERM for a graceful shutdown: requests in flight end, then the
        # lifespan's shutdown runs (the app's, then ours: final publish and release), then
        # exit_if_asked.
        signal.raise_signal(signal.SIGTERM)

    def _exit_now(self) -> None:
        """The watchdog's end of a shutdown that did not finish within the kill timeout."""
        code = self._exit_code or 0
        log.critical(
            "tenantdb: the server did not shut down within %gs; exiting with code %d",
            self.kill_timeout,
            code,
        )
        os._exit(code)

    def exit_if_asked(self) -> None:
        """After the lifespan's shutdown of a machine that ends itself: exit with its code."""
        if self._exit_code is not None:
            if self._watchdog is not None:
                self._watchdog.cancel()
            log.log(
                logging.CRITICAL if self._exit_code else logging.INFO,
                "tenantdb: shutdown complete, exiting with code %d",
                self._exit_code,
            )
            # Scheduled before the server hears that the shutdown is complete, so it runs
            # before uvicorn re-raises the SIGTERM it captured (which would end the process
            # by the signal instead of this exit code).
            asyncio.get_running_loop().call_soon(_exit_process, self._exit_code)


def _server_handles_sigterm() -> bool:
    """True on the main thread of a server that shuts down gracefully on SIGTERM."""
    if threading.current_thread() is not threading.main_thread():
        return False  # the signal would reach the main thread, not this server
    # Without a handler (the default action), SIGTERM would kill the process on the spot.
    return callable(signal.getsignal(signal.SIGTERM))


def _exit_process(code: int) -> None:
    # Raised in a callback of the event loop, SystemExit leaves the loop (and the server's
    # asyncio.run) and the interpreter exits with ``code``; raised in the lifespan, the
    # server would catch it as an error of the lifespan protocol.
    raise SystemExit(code)
