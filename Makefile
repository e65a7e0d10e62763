# batchlab: two commands on a fresh machine, `make demo` and `make test`.
PYTHON ?= python3.11
VENV   ?= .venv
PY     := $(VENV)/bin/python
STAMP  := $(VENV)/.installed

# `make demo PORT=8001 HOST=0.0.0.0`; `make demo ARGS=-v` logs every request.
PORT   ?= 8000
HOST   ?= 127.0.0.1
ARGS   ?=

.PHONY: demo test lint install browser bench clean test-pythons

$(VENV)/bin/python:
	$(PYTHON) -m venv $(VENV) || python3 -m venv $(VENV)

# Reinstall only when the project's dependency files change.
$(STAMP): $(VENV)/bin/python pyproject.toml constraints.txt
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q -c constraints.txt -e '.[dev]'
	touch $(STAMP)

install: $(STAMP)

# Debian's Chromium drives the browser tests and screenshots (never `playwright install`).
browser:
	@command -v chromium >/dev/null 2>&1 || { \
	  (apt-get update -qq && apt-get install -y -qq chromium >/dev/null) || \
	  echo "could not install chromium: browser tests will skip (fail under CI=true)"; }

lint: $(STAMP)
	$(VENV)/bin/ruff check .
	$(VENV)/bin/ruff format --check .

test: $(STAMP) browser
	$(VENV)/bin/ruff check .
	$(PY) -m pytest -q

demo: $(STAMP)
	$(VENV)/bin/batchlab up --demo --host $(HOST) --port $(PORT) $(ARGS)

# The torch-free parts (specs, plans, API, client helpers) on Python 3.12 and 3.13.
test-pythons:
	.ci/pythons.sh

bench: $(STAMP)
	$(PY) bench/trainer_throughput.py

clean:
	rm -rf $(VENV) .pytest_cache build *.egg-info
