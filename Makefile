# secureiod — developer tasks. `make test` bootstraps everything it needs
# (apt packages, .venv) and runs the whole suite; see scripts/bootstrap.sh.

PYTHON ?= python3
VENV   := .venv
VPY    := $(VENV)/bin/python
RUFF   := $(VENV)/bin/ruff

# Lint what exists; test the directories that actually contain test files
# (pytest exits 5 on a directory with no tests).
LINT_DIRS := $(wildcard secureiod tests bench netns-tests)
TEST_DIRS := $(foreach d,tests netns-tests,\
               $(if $(shell find $(d) -name 'test_*.py' -print -quit 2>/dev/null),$(d)))

.PHONY: help bootstrap venv test lint fmt bench-protocol bench-crypto demo clean distclean

help:
	@echo "make demo            tunnel between two network namespaces (arrives with the daemon)"
	@echo "make test            bootstrap, then ruff + the whole pytest suite"
	@echo "make lint | fmt      ruff check | ruff format"
	@echo "make bench-protocol  protocol benchmark"
	@echo "make bench-crypto    crypto backend benchmark"
	@echo "make venv            only bootstrap (apt packages, .venv)"
	@echo "make clean           remove caches; distclean also removes .venv"

bootstrap venv:
	@PYTHON='$(PYTHON)' bash scripts/bootstrap.sh

test: bootstrap
	$(RUFF) check $(LINT_DIRS)
ifeq ($(strip $(TEST_DIRS)),)
	@echo "make test: no test files found in tests/ or netns-tests/"; exit 1
else
	$(VPY) -m pytest $(strip $(TEST_DIRS)) -q
endif

lint: bootstrap
	$(RUFF) check $(LINT_DIRS)

fmt: bootstrap
	$(RUFF) format $(LINT_DIRS)

bench-protocol: bootstrap
	$(VPY) bench/protocol.py

bench-crypto: bootstrap
	$(VPY) bench/crypto_routes.py

demo:
	@echo "make demo: the daemon is not implemented yet (issue 4)"; exit 1

clean:
	rm -rf .pytest_cache .ruff_cache .hypothesis build dist *.egg-info
	find . -path ./$(VENV) -prune -o -name __pycache__ -type d -exec rm -rf {} +

distclean: clean
	rm -rf $(VENV)
