# The two commands a new machine needs: `make run` and `make test`. Everything else is
# a building block of those, or a check CI runs.
PYTHON ?= python3
VENV   ?= .venv
PY     := $(VENV)/bin/python
LOCK   := requirements.lock
HASH   := $(shell cat pyproject.toml $(LOCK) | cksum | cut -d' ' -f1)
RUN_STAMP := $(VENV)/.runtime-$(HASH)
STAMP  := $(VENV)/.installed-$(HASH)
export PYTHONDONTWRITEBYTECODE := 1

.PHONY: run test test-sqlite lint typecheck schema check-schema trusted token migrate reconcile bench bench-tools clean lock

$(PY):
	$(PYTHON) -c 'import sys; assert sys.version_info >= (3, 11), "Python 3.11+ is needed"'
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip

# What the service needs, at the versions in requirements.lock (make run stops here).
$(RUN_STAMP): pyproject.toml $(LOCK) | $(PY)
	$(PY) -m pip install --quiet -c $(LOCK) -e .
	rm -f $(VENV)/.runtime-* && touch $@

# And the test and lint tools (make test, lint, typecheck).
$(STAMP): $(RUN_STAMP)
	$(PY) -m pip install --quiet -c $(LOCK) -e '.[dev]'
	rm -f $(VENV)/.installed-* && touch $@

install: $(STAMP)

## Serve on the embedded default (SQLite file, sandbox gateway) on 127.0.0.1:$${PORT:-8000}.
## WEB_CONCURRENCY=2 make run: two uvicorn processes (on PostgreSQL: DATABASE_URL=postgres://...).
run: $(RUN_STAMP)
	$(PY) -m api

## The whole suite: SQLite always; PostgreSQL too when TEST_DATABASE_URL is set.
test: $(STAMP)
	TEST_BACKEND=sqlite $(PY) -m pytest $(PYTEST_ARGS)
	@if [ -n "$$TEST_DATABASE_URL" ]; then \
	  echo "== the same suite on PostgreSQL ($$TEST_DATABASE_URL)"; \
	  TEST_BACKEND=postgres $(PY) -m pytest $(PYTEST_ARGS); \
	else echo "TEST_DATABASE_URL is not set: PostgreSQL run skipped"; fi

lint: $(STAMP)
	$(PY) -m ruff check .
	$(PY) -m ruff format --check .

typecheck: $(STAMP)
	$(PY) -m mypy

## Regenerate schema.graphql from the code.
schema: $(STAMP)
	$(PY) -m strawberry export-schema api.graphql.schema:schema --output schema.graphql

check-schema: $(STAMP)
	$(PY) -m strawberry export-schema api.graphql.schema:schema --output $(VENV)/schema.check.graphql
	diff -u schema.graphql $(VENV)/schema.check.graphql

## Rewrite the billing page's operations.js (names -> sha256) from its operations.graphql.
trusted: $(RUN_STAMP)
	$(PY) -m api.trusted --write

## Print a development token: make token ACCOUNT=acme ROLES=ADMIN (HEADERS=1: GraphiQL's JSON)
token: $(RUN_STAMP)
	@$(PY) -m api.devtoken --account $${ACCOUNT:-acme} --user $${USER_ID:-admin-1} --roles $${ROLES:-ADMIN} --email $${EMAIL:-admin@example.com} $(if $(HEADERS),--headers)

migrate: $(RUN_STAMP)
	$(PY) -m api --migrate-only

## Check that balances, ledger entries, payments (and Stripe) agree; non-zero exit on any
## discrepancy. Scope it with RECONCILE_ARGS="--account acme --account other".
reconcile: $(RUN_STAMP)
	$(PY) -m runtime.reconcile $(RECONCILE_ARGS)

## Benchmarks (numbers, not tests): make bench, or one of them: make bench BENCH=spend
## (spend, latency, recharge, schedule, csv, page). Needs wrk and pgbench (make bench-tools),
## PostgreSQL and Redis on loopback; spend runs the production shape (2 processes, arq).
bench: $(STAMP)
	$(PY) -m bench $(BENCH)

bench-tools:
	command -v wrk >/dev/null && command -v pgbench >/dev/null || \
	  (apt-get update && apt-get install -y wrk postgresql-client)

## Re-pin the runtime dependencies (requirements.lock) from pyproject.toml.
lock:
	rm -rf $(VENV)-lock && $(PYTHON) -m venv $(VENV)-lock
	$(VENV)-lock/bin/pip install --quiet --upgrade pip && $(VENV)-lock/bin/pip install --quiet .
	{ sed -n '1,2p' $(LOCK); $(VENV)-lock/bin/pip freeze --exclude purchase-credits; } > $(LOCK).new
	mv $(LOCK).new $(LOCK) && rm -rf $(VENV)-lock

clean:
	rm -rf $(VENV) var .pytest_cache .mypy_cache .ruff_cache
