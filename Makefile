# batchlab: two commands on a fresh machine, `make demo` and `make test`.
PYTHON ?= python3.11
VENV   ?= .venv
PY     := $(VENV)/bin/python
STAMP  := $(VENV)/.installed

.PHONY: demo test lint install browser bench clean

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
	$(VENV)/bin/batchlab up --demo

bench: $(STAMP)
	$(PY) bench/trainer_throughput.py

clean:
	rm -rf $(VENV) .pytest_cache build *.egg-info
