# Two commands do all the set-up on a fresh machine:
#   make demo   installs what it needs, transfers a shipped adapter between two real models,
#               and prints what it measured
#   make test   installs the package and its test dependencies, then runs the test suite
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
PIP := $(PY) -m pip
TORCH := torch==2.13.0

.PHONY: test test-real lint demo

$(VENV)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PIP) install -q --upgrade pip
	$(PIP) install -q "$(TORCH)"
	$(PIP) install -q -e ".[dev]"
	touch $@

test: $(VENV)/.installed
	$(PY) -m pytest -q -m "not real"

test-real: $(VENV)/.installed
	$(PY) -m pytest -q -m real

lint: $(VENV)/.installed
	$(VENV)/bin/ruff check src tests
