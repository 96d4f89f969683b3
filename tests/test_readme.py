"""Every code block of the README runs as written.

Python blocks start with ``# <file>.py`` and are saved under that name in a fresh working
directory. Shell blocks are run line by line there, in README order, as a reader would:
``NAME=value uvicorn module:app`` and ``tenantdb dev ...`` start a server (each stopping
the one before, gracefully), ``curl`` lines run against it, ``python`` lines run once it
is stopped, and a ``# ...`` line after
a command is the output it must print. Only the port differs (a free one, not 8000/8080).
``fly`` commands need a Fly.io account and are not run; ``tenantdb machines`` commands are
checked against the CLI's parser; ``tenantdb`` commands that read the bucket run (their
output is compared only where the README shows it), and so does ``tenantdb init``.
"""

from __future__ import annotations

import re
import shlex
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

from tenantdb.cli.main import build_parser
from tests.support.servers import ROOT, free_port

FENCE_RE = re.compile(r"^```(\w*)\n(.*?)^```$", re.MULTILINE | re.DOTALL)
ENV_RE = re.compile(r"[A-Z_][A-Z0-9_]*=\S*")
README_PORTS = re.compile(r"127\.0\.0\.1:(8000|8080)")
# tenantdb commands that only read the bucket: run against the README's own tenants.
BUCKET_READERS = ("status", "history", "restore", "verify", "query")
# tenantdb commands that create, fork, export or purge tenants: run, output shown or not.
FLEET_VERBS = ("tenants",)
# tenantdb commands that write files into the reader's project: run there.
PROJECT_WRITERS = ("init",)


def readme_blocks() -> list[tuple[str, str]]:
    """(language, code) of every fenced block of the README, in order."""
    text = (ROOT / "README.md").read_text()
    return [(m[1], m[2]) for m in FENCE_RE.finditer(text)]


def commands(code: str) -> Iterator[tuple[str, list[str]]]:
    """Each command of a shell block (continuation lines joined), with its expected output."""
    lines = code.replace("\\\n", " ").splitlines()
    for i, line in enumerate(lines):
        if line.strip() and not line.startswith("#"):
            expected = []
            for after in lines[i + 1 :]:
                if not after.startswith("# "):
                    break
                expected.append(after[2:])
            yield line, expected


class Reader:
    """Runs the README's shell lines in ``workdir``, one server at a time."""

    def __init__(self, workdir: Path, env: dict[str, str]) -> None:
        self.workdir = workdir
        self.env = env
        self.server: subprocess.Popen[bytes] | None = None
        self.port = 0
        self.log = workdir / "servers.log"

    def run(self, line: str, expected: list[str]) -> None:
        words = shlex.split(line)
        assignments = {}
        while words and ENV_RE.fullmatch(words[0]):
            name, _, value = words.pop(0).partition("=")
            assignments[name] = value
        program, *args = words
        if program == "fly" or line.startswith("export FLY_"):
            return  # needs a Fly.io account
        if program == "tenantdb" and args[0] == "machines":
            build_parser().parse_args(args)  # exits 2 on a usage error
            return
        reads_bucket = program == "tenantdb" and args[0] in (*BUCKET_READERS, *FLEET_VERBS)
        writes_project = program == "tenantdb" and args[0] in PROJECT_WRITERS
        if program == "uvicorn":
            self.start([sys.executable, "-m", "uvicorn", *args], assignments)
        elif program == "tenantdb" and args[0] == "dev":
            self.start([sys.executable, "-m", "tenantdb.cli", *args], assignments)
        elif program in ("curl", "python") or reads_bucket or writes_project:
            if program == "python":
                self.stop()  # the README runs scripts while no server holds the tenant
            command = {
                "python": [sys.executable, *args],
                "curl": ["curl", "-sS", *args],
                "tenantdb": [sys.executable, "-m", "tenantdb.cli", *args],
            }[program]
            command = [README_PORTS.sub(f"127.0.0.1:{self.port}", word) for word in command]
            done = subprocess.run(
                command,
                cwd=self.workdir,
                env={**self.env, **assignments},
                capture_output=True,
                timeout=60,
                check=False,
            )
            output = done.stdout.decode().splitlines()
            assert done.returncode == 0, (line, done.stderr.decode(), self.log.read_text())
            if expected or not reads_bucket:  # status tables change with time: shown or not
                assert output == expected, (line, done.stderr.decode(), self.log.read_text())
        else:
            pytest.fail(f"the README runs {program!r}, which this test does not know")

    def start(self, command: list[str], assignments: dict[str, str]) -> None:
        self.stop()
        self.port = free_port()
        with self.log.open("ab") as log:
            self.server = subprocess.Popen(
                [*command, "--port", str(self.port)],
                cwd=self.workdir,
                env={**self.env, **assignments},
                stdout=log,
                stderr=subprocess.STDOUT,
            )
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline:
            assert self.server.poll() is None, self.log.read_text()
            try:
                httpx.get(f"http://127.0.0.1:{self.port}/", timeout=1)
                return
            except httpx.HTTPError:
                time.sleep(0.1)
        pytest.fail(f"{command} did not start:\n{self.log.read_text()}")

    def stop(self) -> None:
        """Ctrl-C, as the reader would: a graceful stop that releases the tenant's lease."""
        if self.server is not None:
            self.server.send_signal(signal.SIGINT)
            code = self.server.wait(60)
            assert code == 0, self.log.read_text()
            self.server = None


def test_every_block_says_what_it_is() -> None:
    languages = [language for language, _ in readme_blocks()]
    assert set(languages) <= {"python", "sh", "text"}, languages
    assert "python" in languages


@pytest.mark.long
def test_every_readme_block_runs_as_written(tmp_path: Path, subprocess_env: dict[str, str]) -> None:
    # The query cache of `tenantdb query` goes under XDG_CACHE_HOME: here, not in $HOME.
    reader = Reader(tmp_path, {**subprocess_env, "XDG_CACHE_HOME": str(tmp_path / "cache")})
    ran = []
    try:
        for language, code in readme_blocks():
            if language == "python":
                first = code.splitlines()[0]
                assert re.fullmatch(r"# \w+\.py", first), f"name the file: {first!r}"
                (tmp_path / first[2:]).write_text(code)
            elif language == "sh":
                for line, expected in commands(code):
                    reader.run(line, expected)
                    ran.append(line)
    finally:
        reader.stop()
    assert any(line.startswith("TENANT_ID=100 uvicorn") for line in ran)
    # `tenantdb init` packaged the README's own notes.py.
    assert "TENANTDB_APP=notes:app" in (tmp_path / "Dockerfile").read_text()
    log = reader.log.read_text()
    assert "INFO tenantdb: tenant 100: lease released" in log  # tenantdb's own lines show
    # notes_api.py's configure_logging() took over from the basicConfig() of notes.py.
    assert re.search(r"^time=\S+ level=info logger=tenantdb event=", log, re.MULTILINE)
    assert "Traceback" not in log
    assert 'logger=uvicorn.access event="127.0.0.1:' in log  # a machine's line, as it is
    assert "127.0.0.1:0 " not in log  # the access log shows the proxy's real connection


def test_the_long_material_is_in_docs_linked_from_the_readme() -> None:
    readme = (ROOT / "README.md").read_text()
    for doc in (
        "docs/architecture.md",
        "docs/guarantees.md",
        "docs/performance.md",
        "docs/development.md",
    ):
        assert f"]({doc})" in readme
    for page in [ROOT / "README.md", *(ROOT / "docs").glob("*.md")]:
        for link in re.findall(r"\]\(([^)#]+)", page.read_text()):
            if not link.startswith(("http://", "https://")):
                assert (page.parent / link).exists(), (page.name, link)
