# Two commands do all set-up on a fresh machine: `make demo` and `make test`.
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
PIP := $(BIN)/python -m pip
export PREFECT_SERVER_ANALYTICS_ENABLED := false
export GCSFS_EXPERIMENTAL_ZB_HNS_SUPPORT := false

.PHONY: install install-dev demo test lint format bench clean

$(BIN)/python:
	$(PYTHON) -m venv $(VENV)
	$(PIP) install --quiet --upgrade pip

# Installs are stamped with the files that define them, so re-runs cost nothing.
$(VENV)/.installed: $(BIN)/python pyproject.toml constraints.txt
	$(PIP) install --quiet -c constraints.txt -e '.[s3,azure]'
	touch $@

$(VENV)/.installed-dev: $(VENV)/.installed
	$(PIP) install --quiet -c constraints.txt -e '.[s3,azure,dev]'
	touch $@

install: $(VENV)/.installed
install-dev: $(VENV)/.installed-dev

# The main job: the example pipeline run uninterrupted, then killed with SIGKILL part-way and
# resumed; it fails unless the resumed result is bit-identical to the uninterrupted one.
demo: install
	$(BIN)/prefect-recovery crash-test

lint: install-dev
	$(BIN)/ruff check prefect_recovery tests benchmarks
	$(BIN)/ruff format --check prefect_recovery tests benchmarks

format: install-dev
	$(BIN)/ruff format prefect_recovery tests benchmarks
	$(BIN)/ruff check --fix prefect_recovery tests benchmarks

test: lint
	$(BIN)/python -m pytest $(PYTEST_ARGS)

bench: install-dev
	$(BIN)/python benchmarks/save_restore.py --json

clean:
	rm -rf $(VENV) .prefect-recovery .pytest_cache
