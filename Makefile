# The two set-up commands: `make setup`, then `make test`.
VENV   ?= .venv
PYTHON ?= python3.11
PY      = $(VENV)/bin/python
SUDO    = $(shell [ "$$(id -u)" = 0 ] || echo sudo)

.PHONY: setup test test-fast protos bench

setup:
	@# redis-server for the queues; Debian's chromium for the studio's browser tests (Playwright drives it,
	@# no browser download).
	@{ command -v redis-server && command -v chromium; } >/dev/null || \
		{ $(SUDO) apt-get update && $(SUDO) apt-get install -y redis-server chromium; }
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet -e '.[dev]'

test:
	$(PY) -m pytest $(PYTEST_ARGS)

test-fast:
	$(PY) -m pytest -m "not slow" $(PYTEST_ARGS)

protos:
	$(PY) -m services.common.protogen

bench:
	$(PY) bench/bench_amg.py
	$(PY) bench/bench_embed.py
	$(PY) bench/bench_predict.py
	$(PY) bench/bench_pipeline.py
	$(PY) bench/bench_concepts.py
	$(PY) bench/bench_parse.py
	$(PY) bench/bench_click.py
	$(PY) bench/bench_instances.py
