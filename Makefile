# Two commands do all set-up on a fresh machine: `make demo` and `make test`.
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
PIP := $(BIN)/python -m pip
export PREFECT_SERVER_ANALYTICS_ENABLED := false
export GCSFS_EXPERIMENTAL_ZB_HNS_SUPPORT := false

.PHONY: install install-dev chromium azurite postgres demo test lint format bench clean

$(BIN)/python:
	$(PYTHON) -m venv $(VENV)
	$(PIP) install --quiet --upgrade pip

# Installs are stamped with the files that define them, so re-runs cost nothing.
$(VENV)/.installed: $(BIN)/python pyproject.toml constraints.txt
	$(PIP) install --quiet -c constraints.txt -e '.[s3,gcs,azure,plot]'
	touch $@

$(VENV)/.installed-dev: $(VENV)/.installed
	$(PIP) install --quiet -c constraints.txt -e '.[s3,gcs,azure,plot,dev]'
	touch $@

install: $(VENV)/.installed
install-dev: $(VENV)/.installed-dev chromium azurite

# Debian's Chromium, which Playwright drives in the Prefect-UI test (tests/test_recover_ui.py; another binary:
# PREFECT_RECOVERY_CHROMIUM). `playwright install` is not used: it downloads its own browser from the internet.
# apt-get runs as root, or through sudo where that exists.
chromium:
	@command -v chromium >/dev/null 2>&1 || { \
	  if [ "$$(id -u)" -eq 0 ]; then sudo=; elif command -v sudo >/dev/null 2>&1; then sudo=sudo; \
	  else echo "chromium is missing: install it as root (apt-get install -y chromium)" >&2; exit 1; fi; \
	  $$sudo apt-get update && $$sudo env DEBIAN_FRONTEND=noninteractive apt-get install -y chromium; }

# Azurite, the Azure Blob emulator of tests/test_backends.py, from the npm registry into a git-ignored folder of
# the repo (tests/helpers/emulators.py finds it there; another binary: AZURITE_BIN). The stamp names the version,
# so re-runs cost nothing and a new version replaces the old install. moto and gcp-storage-emulator come with .[dev].
AZURITE_VERSION := 3.37.0
AZURITE_DIR := .cache/azurite
$(AZURITE_DIR)/.installed-$(AZURITE_VERSION):
	@command -v npm >/dev/null 2>&1 || { echo "npm is missing: install Node.js and npm (apt-get install -y nodejs npm)" >&2; exit 1; }
	rm -rf $(AZURITE_DIR)
	mkdir -p $(AZURITE_DIR)
	npm install --prefix $(AZURITE_DIR) --no-save --no-audit --no-fund azurite@$(AZURITE_VERSION)
	touch $@

azurite: $(AZURITE_DIR)/.installed-$(AZURITE_VERSION)

# PostgreSQL on 127.0.0.1:5432 for the production-shaped Prefect server of tests/test_production.py (it creates
# and drops a database of its own). Starts the machine's cluster when one is installed but stopped; installs
# Debian's postgresql on a machine without one and gives the postgres role the password that
# tests/helpers/postgres.py uses (another server: PREFECT_RECOVERY_TEST_POSTGRES).
postgres:
	@pg_isready -q -h 127.0.0.1 -p 5432 2>/dev/null || { \
	  if [ "$$(id -u)" -eq 0 ]; then sudo=; elif command -v sudo >/dev/null 2>&1; then sudo=sudo; \
	  else echo "PostgreSQL is not running: install and start it as root (apt-get install -y postgresql)" >&2; exit 1; fi; \
	  if ! ls /etc/postgresql/*/main >/dev/null 2>&1; then \
	    $$sudo apt-get update && $$sudo env DEBIAN_FRONTEND=noninteractive apt-get install -y postgresql; fi; \
	  $$sudo pg_ctlcluster --skip-systemctl-redirect $$(ls /etc/postgresql | tail -1) main start; \
	  $$sudo -u postgres psql -q -c "ALTER USER postgres PASSWORD 'postgres'" 2>/dev/null || \
	    $$sudo su postgres -c "psql -q -c \"ALTER USER postgres PASSWORD 'postgres'\""; }

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

test: lint postgres
	$(BIN)/python -m pytest $(PYTEST_ARGS)

bench: install-dev
	$(BIN)/python benchmarks/save_restore.py --json

clean:
	rm -rf $(VENV) .prefect-recovery .pytest_cache
