# The two README commands: `make run` (main job) and `make test` (whole suite); both set up the venv.
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed

$(STAMP): pyproject.toml
	python3 -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q -e '.[dev]'
	touch $@

SUDO := $(if $(filter 0,$(shell id -u)),,sudo)
APT := DEBIAN_FRONTEND=noninteractive $(SUDO) apt-get install -y -q chromium

.PHONY: install run test lint bench browser
install: $(STAMP)

run: $(STAMP)
	$(VENV)/bin/fedshop simulate --out runs/simulation --fresh

lint: $(STAMP)
	$(VENV)/bin/ruff check .
	$(VENV)/bin/ruff format --check .

# The privacy report is tested in a real browser: Debian's Chromium, never a downloaded one.
browser:
	@command -v chromium >/dev/null || $(APT) || ($(SUDO) apt-get update -q && $(APT))

test: lint browser
	FEDSHOP_REQUIRE_BROWSER=1 $(PY) -m pytest -q

# Non-private vs DP users/s on the default and a Ta-Feng-sized data set (about 3 minutes on
# 2 cores). BENCH_ARGS="--quick" for a smoke run, "--tafeng PATH" to time the real file.
BENCH_ARGS ?=
bench: $(STAMP)
	$(PY) benchmarks/throughput.py $(BENCH_ARGS)
