# `make demo` and `make test` work on a fresh machine with only python3: each creates .venv if
# missing and installs the project from constraints.txt (every package pinned, torch CPU build).
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
SOURCES := pyproject.toml constraints.txt $(shell find plugins diagnostics pretrain cli demo evaluation sweep reproduce safety recipes -type f \( -name '*.py' -o -name '*.pth' -o -name '*.yml' -o -name '*.yaml' \) 2>/dev/null) $(shell find demo/standins -type f 2>/dev/null)
export HF_HUB_OFFLINE := 1
export OMP_WAIT_POLICY ?= PASSIVE

.PHONY: setup test test-fast demo clean

setup: $(VENV)/.installed

$(PY):
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip

# The package is installed (not editable) so the import hook's .pth and the finmerge.* names
# are exactly what users get; this target reinstalls it whenever a source file changes.
$(VENV)/.installed: $(PY) $(SOURCES)
	$(PY) -m pip install --quiet -c constraints.txt ".[dev]"
	touch $@

# One pytest worker per core (at most 4), each test file on one worker so that its module fixtures
# are built once; PYTEST_WORKERS=0 runs everything in this process.
PYTEST_WORKERS ?= auto
PYTEST_PARALLEL := -n $(PYTEST_WORKERS) --maxprocesses 4 --dist loadfile

test: setup
	$(PY) -m pytest -q $(PYTEST_PARALLEL)

test-fast: setup
	$(PY) -m pytest -q $(PYTEST_PARALLEL) -m "not slow"

demo: setup
	$(VENV)/bin/finmerge demo

clean:
	rm -rf $(VENV) build dist demo-out
