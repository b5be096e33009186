# segd — two commands matter: `make demo` and `make test`.
PYTHON ?= python3
VENV   ?= .venv
PY     := $(VENV)/bin/python
STAMP  := $(VENV)/.installed
HOSTS  ?= 1

.PHONY: demo test test-long test-unit lint typecheck bench host image venv clean

$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q -e '.[test]'
	touch $(STAMP)

venv: $(STAMP)

# Debian packages (docker.io, nftables, busybox-static), dockerd, and the local image.
host:
	bash scripts/host-setup.sh
	bash scripts/build-image.sh

lint: $(STAMP)
	$(VENV)/bin/ruff check segd tests bench
	$(VENV)/bin/ruff format --check segd tests bench

typecheck: $(STAMP)
	$(VENV)/bin/mypy

test-unit: $(STAMP)
	bash scripts/pytest.sh -m "not kernel and not docker and not slow"

test: $(STAMP) host lint typecheck
	bash scripts/pytest.sh -m "not slow"

test-long: $(STAMP) host
	bash scripts/pytest.sh

# Prints the table and writes bench/results/latest.json; BENCH_ARGS="--only apply --size tiny".
bench: $(STAMP) host
	$(PY) -m bench $(BENCH_ARGS)

# HOSTS=3: the shop spread over three simulated hosts in the segd mesh (the test bed).
demo: $(STAMP) host
	$(VENV)/bin/segd demo --hosts $(HOSTS)

clean:
	rm -rf $(VENV) .mypy_cache .ruff_cache .pytest_cache
