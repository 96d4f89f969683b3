# `make demo` runs the local multi-tenant demo; `make check` runs lint, types and the fast unit
# tests (under a minute); `make test` runs lint, types and every test.
# Each target creates .venv and installs what it needs on first use: the demo only the
# package itself, the tests also their tools.
# `make simulate SEEDS=N` runs N seeded fault schedules of the simulation (tests/simulation);
# `make simulate-mutations SEEDS=N` shows it finds each past fix reverted.
PYTHON ?= python3
# Python and pytest cache compiled modules (pytest its assertion-rewritten ones too): an
# environment that turns that off makes every process, test subprocesses included,
# recompile what it imports (seconds of CPU each time pytest imports hypothesis).
unexport PYTHONDONTWRITEBYTECODE
VENV ?= .venv
BIN := $(VENV)/bin
PORT ?= 8080
# pytest-xdist workers for `make test`. The tests mostly wait (on leases, servers, sockets),
# not compute, so more workers than cores pays: 4 on two cores. `make test PYTEST_WORKERS=0`
# runs the suite in one process.
PYTEST_WORKERS ?= 4
# The fast unit tests of `make check`: no server processes, no waits on real time. The `long`
# tests and the process- and server-heavy files (dev/, faults/, the CLI, the machines in
# subprocesses) run in `make test` only.
CHECK_TESTS ?= \
	tests/test_config.py tests/test_tenants.py tests/test_lockfile.py tests/test_commits.py \
	tests/test_logs.py tests/test_pool.py tests/test_lending.py \
	tests/replication/test_segment.py tests/replication/test_segment_limit.py \
	tests/replication/test_checksum.py tests/replication/test_wal.py \
	tests/routing/test_dns.py tests/routing/test_machines_api.py tests/routing/test_machines.py \
	tests/routing/test_arrival.py tests/routing/test_replay_headers.py tests/routing/test_checks.py \
	tests/storage/test_local_bucket.py tests/storage/test_object_info.py \
	tests/storage/test_s3_addressing.py tests/storage/test_download_bounds.py \
	tests/dev/test_dns_server.py tests/dev/test_ports.py tests/dev/test_dashboard_state.py \
	tests/simulation/test_sim_bucket.py
CHECK_WORKERS ?= 2
# Seeded schedules of `make simulate` (FIRST_SEED onwards), in SIM_JOBS processes (a
# schedule is CPU-bound: one per core).
SEEDS ?= 100
FIRST_SEED ?= 1
SIM_JOBS ?= $(shell nproc 2>/dev/null || echo 1)

.PHONY: install demo check test chromium lint bench simulate simulate-mutations clean

$(BIN)/python:
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip

$(BIN)/.installed-app: pyproject.toml | $(BIN)/python
	$(BIN)/python -m pip install --quiet -e .
	touch $@

$(BIN)/.installed: pyproject.toml | $(BIN)/python
	$(BIN)/python -m pip install --quiet -e ".[test]"
	touch $@

install: $(BIN)/.installed

demo: $(BIN)/.installed-app
	$(BIN)/tenantdb dev --port $(PORT)

lint: install
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .
	$(BIN)/mypy

check: lint
	$(BIN)/pytest -n $(CHECK_WORKERS) --dist loadgroup -m "not long" $(CHECK_TESTS)

# The dashboard's browser test needs Debian's chromium (Playwright drives it; no download).
# It is checked first, before a minute of lint: installing it takes apt-get, so root.
test: chromium lint
	$(BIN)/pytest -n $(PYTEST_WORKERS) --dist loadgroup

chromium:
	@command -v chromium >/dev/null || { \
	  echo "make test: the dashboard's browser test needs chromium: installing Debian's with apt-get"; \
	  if [ "$$(id -u)" != 0 ]; then \
	    echo "make test: apt-get needs root: run 'sudo apt-get install chromium' first;" \
	      "until then tests/dev/test_dashboard.py is skipped" >&2; \
	  elif ! { apt-get update -qq && apt-get install -y -qq chromium; }; then \
	    echo "make test: apt-get could not install chromium (no network or no such package);" \
	      "tests/dev/test_dashboard.py is skipped" >&2; \
	  fi; \
	}

bench: install
	command -v dig >/dev/null || (apt-get update -qq && apt-get install -y -qq dnsutils)
	command -v wrk >/dev/null || (apt-get update -qq && apt-get install -y -qq wrk)
	$(BIN)/python -m bench

simulate: install
	$(BIN)/python -m tests.simulation --seeds $(SEEDS) --first $(FIRST_SEED) --jobs $(SIM_JOBS)

# Each past fix of tenantdb reverted in turn (tests/simulation/mutations.py): the seeds it
# takes the simulation to find it (SEEDS at most each).
simulate-mutations: install
	for mutation in $$($(BIN)/python -c "from tests.simulation.mutations import MUTATIONS; print(*MUTATIONS)"); do \
	  $(BIN)/python -m tests.simulation --mutation $$mutation --seeds $(SEEDS) --first $(FIRST_SEED) --jobs $(SIM_JOBS) \
	    2>/dev/null | grep -E "^mutation|^seeds:" || true; \
	done

clean:
	rm -rf $(VENV) .tenantdb .pytest_cache .mypy_cache .ruff_cache
