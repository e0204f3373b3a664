# secureiod — developer tasks. `make test` bootstraps everything it needs
# (apt packages, .venv) and runs the whole suite; see scripts/bootstrap.sh.

PYTHON ?= python3
VENV   := .venv
VPY    := $(VENV)/bin/python
RUFF   := $(VENV)/bin/ruff

# Lint what exists; test the directories that actually contain test files
# (pytest exits 5 on a directory with no tests).
LINT_DIRS := $(wildcard secureiod tests bench netns-tests)
TEST_DIRS := $(foreach d,tests netns-tests packaging/tests,\
               $(if $(shell find $(d) -name 'test_*.py' -print -quit 2>/dev/null),$(d)))

.PHONY: help bootstrap venv test lint fmt bench-protocol bench-crypto bench-crossover demo netns-test clean distclean

help:
	@echo "make demo            tunnel between two network namespaces (needs root)"
	@echo "make netns-test      only the end-to-end suite in network namespaces (needs root)"
	@echo "make test            bootstrap, then ruff + the whole pytest suite"
	@echo "make test-fresh      make test + make demo on a fresh Debian 12 root (needs root)"
	@echo "make deb             build dist/secureiod_<version>_<arch>.deb"
	@echo "make test-systemd    build the .deb, test it under systemd in two containers"
	@echo "make lint | fmt      ruff check | ruff format"
	@echo "make bench           tunnels compared: secureiod, wireguard-go, tinc, Nebula (root)"
	@echo "make bench-protocol  protocol benchmark"
	@echo "make bench-crypto    crypto backend benchmark"
	@echo "make bench-crossover libsodium vs OpenSSL per call, by size (C)"
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

bench-crossover: bootstrap
	mkdir -p bench/build
	gcc -O2 -Wall -Wextra -o bench/build/crypto_crossover bench/crypto_crossover.c -lsodium -lcrypto
	bench/build/crypto_crossover

# `make bench` compares tunnels, so it alone needs tinc, Nebula, WireGuard (wg, and Debian's
# wireguard-go as the fallback: a build first on PATH wins, and the run prints its version)
# and matplotlib for the chart; none of them is in bootstrap, so `make test` stays as it is.
BENCH_APT := tinc nebula wireguard-tools wireguard-go

.PHONY: bench bench-deps bench-session
bench-deps:
	@PYTHON='$(PYTHON)' bash scripts/bootstrap.sh $(BENCH_APT)
	@$(VPY) -c 'import matplotlib' 2>/dev/null \
		|| $(VPY) -m pip install -q --disable-pip-version-check -e '.[chart]'

bench: bench-deps
	$(VPY) bench/tunnel.py

bench-session: bootstrap
	$(VPY) bench/session.py

demo: bootstrap
	$(VPY) scripts/demo.py

netns-test: bootstrap
	$(VPY) -m pytest netns-tests -q

clean:
	rm -rf .pytest_cache .ruff_cache .hypothesis build dist *.egg-info
	find . -path ./$(VENV) -prune -o -name __pycache__ -type d -exec rm -rf {} +

distclean: clean
	rm -rf $(VENV)

# --- Debian package and its systemd test (packaging/) ---------------------------------
# `make deb` builds dist/secureiod_<version>-1_<arch>.deb on Debian 12 (as root);
# `make test-systemd` boots two Debian 12 containers with systemd-nspawn, installs that
# .deb and checks the secureiod@ service end to end (packaging/tests/test_systemd.py,
# which `make test` also runs, building its own .deb).
DEB_DIR := dist

.PHONY: deb test-systemd

deb:
	bash packaging/deb/build.sh $(DEB_DIR)

test-systemd: bootstrap
	deb=$$(bash packaging/deb/build.sh $(DEB_DIR)) && \
	SECUREIOD_DEB="$$deb" $(VPY) -m pytest packaging/tests -v -p no:cacheprovider

# --- the newcomer's check (not part of `make test`) ----------------------------------------
# `make test-fresh` clones the committed HEAD into a throwaway overlay of a cached minimal
# Debian 12 root and runs `make test` and `make demo` there as root (scripts/test_fresh.py
# says how, and what it cleans up). Needs root and network (apt, pip); only the system
# python3, no .venv.

.PHONY: test-fresh
test-fresh:
	$(PYTHON) scripts/test_fresh.py
