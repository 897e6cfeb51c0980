# Two entry points for a fresh machine: `make run` and `make test`.
# Each creates its own virtual environment and installs what it needs.
PY ?= python3
VENV ?= .venv
BIN := $(VENV)/bin

.PHONY: run test install install-test bench clean

$(BIN)/python:
	$(PY) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip

install: $(BIN)/python
	$(BIN)/pip install -q -e .

install-test: $(BIN)/python
	$(BIN)/pip install -q -e '.[test]'

run: install
	$(BIN)/afdserve demo

test: install-test
	$(BIN)/python -m pytest tests

bench: $(BIN)/python
	$(BIN)/pip install -q -e '.[bench]'
	$(BIN)/afdserve bench

clean:
	rm -rf $(VENV) build *.egg-info afdserve/_native*.so
