"""What Ctrl-C does to a test run: it stops the run wherever it is, kills every server below
it, and ends it within seconds even when a process of the run does not come down by itself.

pytest-asyncio runs each async test in an ``asyncio.Runner``, which, while SIGINT has Python's
default handler, turns Ctrl-C into a cancellation of the test's task. A test whose code absorbs
that cancellation (a shutdown that finishes what it started, say) simply ends, and the next
test starts with a fresh count: the run went on however often one pressed. With the handler
below in place, the Runner leaves SIGINT alone, and the KeyboardInterrupt stops pytest wherever
it lands.

Before it does, the handler kills every process below this one: the servers of the tests (moto,
uvicorn machines, dev clusters) run in sessions of their own, out of the terminal's reach, and
a graceful stop of each would take seconds. An xdist controller spares its workers and passes
the signal on to them instead (``kill -INT`` may have reached the controller alone), so that
each ends its session and reports.

Ending can still hang: a worker that does not get to its handler (stuck in C code, or at exit
on a thread that never returns), or xdist waiting on a worker's pipe (it waits 10 s, kills the
worker, and waits 10 s more). So the first Ctrl-C also starts a watchdog: a worker still
running ``WORKER_GRACE`` later is killed (it loses only its report of the interruption), and
a process still running ``RUN_GRACE`` later prints where each of its threads is and exits
with pytest's code for an interrupted run.
"""

from __future__ import annotations

import contextlib
import faulthandler
import os
import signal
import sys
import threading
import time
from collections.abc import Callable

from tests.support.process_tree import direct_children, kill_descendants

__all__ = [
    "INTERRUPTED_EXIT_CODE",
    "RUN_GRACE",
    "WORKER_GRACE",
    "install_interrupt_handler",
]

WORKER_GRACE = 3.0
RUN_GRACE = 15.0
INTERRUPTED_EXIT_CODE = 2  # pytest.ExitCode.INTERRUPTED


def install_interrupt_handler(is_xdist_controller: Callable[[], bool]) -> None:
    """Make SIGINT stop this test process at once, as the module says.

    ``is_xdist_controller`` is asked when the signal comes: xdist registers its controller
    plugin after the conftests have been configured.
    """
    watchdog: list[threading.Thread] = []

    def interrupt(signum: int, frame: object) -> None:
        workers = frozenset(direct_children()) if is_xdist_controller() else frozenset()
        for worker in workers:
            with contextlib.suppress(ProcessLookupError):
                os.kill(worker, signal.SIGINT)
        kill_descendants(signal.SIGKILL, spare=workers)
        if not watchdog:
            watchdog.append(threading.Thread(target=_end, daemon=True))
            watchdog[0].start()
        raise KeyboardInterrupt

    signal.signal(signal.SIGINT, interrupt)


def _end() -> None:
    """Kill the workers still running after their grace, then this process after its own."""
    time.sleep(WORKER_GRACE)
    kill_descendants(signal.SIGKILL)
    time.sleep(RUN_GRACE - WORKER_GRACE)
    print(
        f"\n{RUN_GRACE:.0f} s after Ctrl-C this test process had not ended; where it was:",
        file=sys.stderr,
        flush=True,
    )
    faulthandler.dump_traceback(sys.stderr, all_threads=True)
    os._exit(INTERRUPTED_EXIT_CODE)
