# Two entry points for a fresh machine: `make run` and `make test`.
# Each creates its own virtual environment and installs what it needs.
PY ?= python3
VENV ?= .venv
BIN := $(VENV)/bin

.PHONY: run test install install-test browser bench clean

$(BIN)/python:
	$(PY) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip

install: $(BIN)/python
	$(BIN)/pip install -q -e .

install-test: $(BIN)/python
	$(BIN)/pip install -q -e '.[test]'

run: install
	$(BIN)/afdserve demo

test: install-test browser
	$(BIN)/python -m pytest tests

# The dashboard test drives Debian's chromium through chromium-driver; install them where apt-get
# is available and chromium is missing. Never fails `make test`: without them the test is skipped.
browser:
	@if ! command -v chromium >/dev/null 2>&1 && command -v apt-get >/dev/null 2>&1; then \
		echo "make: installing chromium + chromium-driver for tests/test_dashboard.py"; \
		if [ "$$(id -u)" = 0 ]; then SUDO=; else SUDO="sudo -n"; fi; \
		( $$SUDO apt-get update -qq && DEBIAN_FRONTEND=noninteractive $$SUDO apt-get install -y -qq \
			chromium chromium-driver ) >/dev/null 2>&1 \
			|| echo "make: could not install chromium (tests/test_dashboard.py will be skipped)"; \
	fi

bench: $(BIN)/python
	$(BIN)/pip install -q -e '.[bench]'
	$(BIN)/afdserve bench

clean:
	rm -rf $(VENV) build *.egg-info afdserve/_native*.so afdserve/_fp8*.so
