# Suture: `make demo` runs the built-in demo end to end, `make test` runs the test suite.
# Both create .venv and install everything on a fresh machine with only Python 3.11+.
PYTHON ?= python3
VENV ?= .venv
# The torch build to install first; choose another (e.g. a CUDA build) with `make TORCH_SPEC=torch==2.5.1 ...`.
TORCH_SPEC ?= torch==2.13.0
BIN := $(VENV)/bin
OUT ?= out/quickstart
PYTEST_ARGS ?=

.PHONY: demo test install install-test bench app clean

$(BIN)/python:
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --upgrade pip >/dev/null

$(VENV)/.installed: $(BIN)/python pyproject.toml
	$(BIN)/pip install "$(TORCH_SPEC)"
	$(BIN)/pip install -e '.[app,hf]'
	touch $@

$(VENV)/.installed-test: $(VENV)/.installed pyproject.toml
	$(BIN)/pip install -e '.[test,parity,search]'
	touch $@

install: $(VENV)/.installed

install-test: $(VENV)/.installed-test

demo: install
	$(BIN)/suture run recipes/examples/quickstart.yaml $(OUT) --overwrite

test: install-test
	$(BIN)/python -m pytest $(PYTEST_ARGS)

bench: install
	$(BIN)/python benchmarks/merge_bench.py

app: install
	$(BIN)/suture app

clean:
	rm -rf $(VENV) out .pytest_cache
