"""Log lines: key=value (quoted where needed) or JSON, one per event, tenant and generation on
every line of the tenantdb loggers."""

from __future__ import annotations

import asyncio
import json
import logging
import re
import socket
import subprocess
import sys
from dataclasses import dataclass

import pytest

from tenantdb.errors import ConfigurationError
from tenantdb.logs import JSONFormatter, KeyValueFormatter, RecurringProblem, follow, formatter
from tenantdb.metrics import Metrics, MetricsServer

# key=value pairs: a bare word or a JSON string.
PAIR = re.compile(r'(\w+)=("(?:[^"\\]|\\.)*"|[^\s"=\\]*)(?: |$)')


def parse_key_values(line: str) -> dict[str, str]:
    """The pairs of one key=value line (and nothing else in it)."""
    pairs = PAIR.findall(line)
    assert "".join(f"{k}={v} " for k, v in pairs).rstrip() == line
    return {k: json.loads(v) if v.startswith('"') else v for k, v in pairs}


@dataclass
class Held:
    tenant: str = "acme"
    state: str = "serving"

    def generation(self) -> int:
        return 7

    def log_lag(self) -> float:
        return 0.0


def record(
    message: str, *args: object, name: str = "tenantdb", **extra: object
) -> logging.LogRecord:
    made = logging.LogRecord(name, logging.WARNING, __file__, 1, message, args, None)
    made.__dict__.update(extra)
    return made


@pytest.fixture(autouse=True)
def followed() -> object:
    follow(Held())
    yield
    follow(None)


def test_key_value_lines_quote_what_needs_it_and_carry_tenant_and_generation() -> None:
    line = KeyValueFormatter().format(record('tenant %s: "lease" lost\nfor=good', "acme"))
    assert "\n" not in line
    fields = parse_key_values(line)
    assert fields["event"] == 'tenant acme: "lease" lost\nfor=good'
    assert (fields["level"], fields["logger"]) == ("warning", "tenantdb")
    assert (fields["tenant"], fields["generation"]) == ("acme", "7")
    assert re.fullmatch(r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d{3}Z", fields["time"])


def test_json_lines_parse_and_carry_tenant_and_generation() -> None:
    try:
        raise ValueError("boom")
    except ValueError:
        failed = record("publish failed")
        failed.exc_info = sys.exc_info()
    line = JSONFormatter().format(failed)
    assert "\n" not in line
    fields = json.loads(line)
    assert (fields["tenant"], fields["generation"]) == ("acme", "7")
    assert fields["event"].startswith("publish failed\nTraceback")


def test_a_record_about_another_tenant_says_so() -> None:
    fields = json.loads(JSONFormatter().format(record("routing failed", tenant="beta")))
    assert (fields["tenant"], fields["generation"]) == ("beta", "")
    other = parse_key_values(KeyValueFormatter().format(record("GET /", name="uvicorn")))
    assert (other["tenant"], other["generation"]) == ("", "")


def test_the_format_is_chosen_by_the_environment() -> None:
    assert isinstance(formatter({}), KeyValueFormatter)
    assert isinstance(formatter({"TENANTDB_LOG_FORMAT": "JSON"}), JSONFormatter)
    with pytest.raises(ConfigurationError, match="TENANTDB_LOG_FORMAT='xml'"):
        formatter({"TENANTDB_LOG_FORMAT": "xml"})


def test_configure_logging_takes_over_from_an_earlier_basic_config(
    subprocess_env: dict[str, str],
) -> None:
    # The README's notes_api.py imports notes.py, which ran logging.basicConfig() already.
    script = (
        "import logging\n"
        "logging.basicConfig(level=logging.INFO, format='%(levelname)s %(name)s: %(message)s')\n"
        "from tenantdb.logs import configure_logging\n"
        "configure_logging()\n"
        "logging.getLogger('tenantdb').info('lease taken')\n"
    )
    done = subprocess.run(
        [sys.executable, "-c", script],
        env=subprocess_env,
        capture_output=True,
        text=True,
        timeout=30,
        check=True,
    )
    [line] = done.stderr.splitlines()
    fields = parse_key_values(line)
    assert (fields["event"], fields["logger"]) == ("lease taken", "tenantdb")


def test_no_line_of_the_tenantdb_logger_names_it_twice() -> None:
    # With a format that shows the logger's name ("%(name)s: %(message)s", as the README's
    # notes.py has), a message that starts with "tenantdb:" prints "tenantdb: tenantdb: ...".
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        handler = Collect()
        handler.setFormatter(logging.Formatter("%(name)s: %(message)s"))
        logger = logging.getLogger("tenantdb")
        logger.addHandler(handler)
        try:
            asyncio.run(enter_and_leave(MetricsServer(Metrics(), port, "127.0.0.1")))
        finally:
            logger.removeHandler(handler)
    [line] = handler.lines
    assert line.startswith(f"tenantdb: no metrics: cannot listen on 127.0.0.1:{port}")


class Collect(logging.Handler):
    def __init__(self) -> None:
        super().__init__()
        self.lines: list[str] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.lines.append(self.format(record))


async def enter_and_leave(server: MetricsServer) -> None:
    async with server:
        pass


def test_a_recurring_problem_is_logged_once_until_it_changes_or_a_minute_passes(
    caplog: pytest.LogCaptureFixture, monkeypatch: pytest.MonkeyPatch
) -> None:
    problem = RecurringProblem(logging.getLogger("tenantdb"))
    for _ in range(50):
        problem.warn("tenant %s: cannot read %s", "acme", "lock.json")
    problem.warn("tenant %s: cannot read %s", "acme", "history")  # another problem
    monkeypatch.setattr(RecurringProblem, "REPEAT_AFTER", -1.0)
    problem.warn("tenant %s: cannot read %s", "acme", "history")  # a minute later, as it were
    assert [r.getMessage() for r in caplog.records] == [
        "tenant acme: cannot read lock.json",
        "tenant acme: cannot read history",
        "tenant acme: cannot read history",
    ]
    assert problem.clear()
    assert not problem.clear()
