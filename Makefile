# tradecanvas — the two commands a fresh machine needs are `make run` and `make test`.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed-$(shell cat setup.cfg pyproject.toml | cksum | cut -d' ' -f1)

## install: create .venv and install tradecanvas with the dev and bench extras
install: $(STAMP)

.PHONY: install run check test lint typecheck unit unit-fast e2e browser doc-audit deploy-check bench bench-smoke soak test-data clean

$(STAMP): setup.cfg pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -m pip install --quiet -e '.[dev,bench]'
	rm -f $(VENV)/.installed-*
	touch $@

## run: create .venv, install, start `tradecanvas serve` with the defaults
run: $(STAMP)
	$(BIN)/tradecanvas serve

## check: the inner loop (two to three minutes): lint, types, the unit tests without the end-to-end ones
check: lint typecheck unit-fast

## test: ruff, mypy --strict, pytest, the deploy unit checks, the e2e replay, the doc audit and
## the benchmark harness at a tiny size
test: lint typecheck unit deploy-check e2e doc-audit bench-smoke

lint: $(STAMP)
	$(BIN)/ruff check tradecanvas tests bench scripts
	$(BIN)/ruff format --check tradecanvas tests bench scripts

typecheck: $(STAMP)
	$(BIN)/mypy --strict tradecanvas tests bench scripts

unit: $(STAMP)
	$(BIN)/pytest -q

unit-fast: $(STAMP)
	$(BIN)/pytest -q -m "not e2e and not slow"

## browser: the chart page's tests in headless Chromium (also part of `make unit`, so of make test)
browser: $(STAMP)
	$(BIN)/pytest -q -m browser

deploy-check: $(STAMP)
	bash scripts/deploy_check.sh

## e2e: the acceptance replay, single process, then distributed (1 ingest + 2 edges + Redis +
## PostgreSQL; outside CI skipped with a message when a service does not answer)
e2e: $(STAMP)
	bash scripts/e2e_acceptance.sh
	bash scripts/e2e_acceptance.sh --topology distributed

doc-audit:
	bash scripts/doc_audit.sh

## bench: the benchmarks under bench/ (ratios against a baseline measured in the same run);
## writes bench/results/summary.json and docs/benchmarks-latency.png (docs/benchmarks.md)
bench: $(STAMP)
	$(BIN)/python -m bench

## bench-smoke: every benchmark at a tiny size (under a minute); proves the harness runs, checks no numbers
bench-smoke: $(STAMP)
	$(BIN)/python -m bench --smoke

## soak: the reliability suite (tests/reliability) at full size (TRADECANVAS_SOAK=1, about 30
## minutes on 2 shared cores); its JSON lines go to var/reliability.jsonl and the table
## to docs/reliability.md
SOAK_LINES := var/reliability.jsonl
soak: $(STAMP)
	mkdir -p var && rm -f $(SOAK_LINES)
	TRADECANVAS_SOAK=1 TRADECANVAS_RELIABILITY_OUT=$(CURDIR)/$(SOAK_LINES) \
		$(BIN)/pytest -q -o faulthandler_timeout=3600 tests/reliability
	$(BIN)/python scripts/reliability_report.py $(SOAK_LINES) docs/reliability.md

## test-data: download Binance's public daily kline archives (checksums verified) into .cache/
## with `tradecanvas fetch-archive`; BINANCE_ARCHIVE_URL=... for another copy of the archive
test-data: $(STAMP)
	PYTHON=$(BIN)/python bash scripts/fetch_test_data.sh

clean:
	rm -rf $(VENV) .mypy_cache .ruff_cache .pytest_cache *.egg-info
