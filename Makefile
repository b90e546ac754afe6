# The two commands of the README: `make smoke` (whole DAG at smoke scale) and `make test` (test suite).
# Each first creates/updates the project-local environment in .venv/ from the exact lock in envs/.
SHELL := /bin/bash
PYTHON ?= python3.11
VENV := .venv
BIN := $(VENV)/bin
UV_VERSION := 0.13.9
STAMP := $(VENV)/.densessl-installed
CORES ?= 2
SMOKE_ARGS ?=

.PHONY: env smoke test test-fast test-slurm lint lock clean-smoke dry-run browser

env: $(STAMP)

$(BIN)/python:
	$(PYTHON) -m venv $(VENV)

$(BIN)/uv: | $(BIN)/python
	$(BIN)/python -m pip install --quiet --disable-pip-version-check uv==$(UV_VERSION)

# Reinstall only when the lock or the package metadata change; uv keeps a download cache, so a second
# machine-local install (or a CI job after another) costs seconds.
# compileall: every stage is its own Python process, and with PYTHONDONTWRITEBYTECODE set (as on our CI
# machines) each one would recompile torch and timm from source: 9.4 s → 3.6 s per process (measured). A few
# packages ship non-Python-3.11 test fixtures that compileall reports and skips, hence `|| true`.
# envs/build_mmcv.py: mmcv has no wheel for our torch on PyPI; the script compiles the hash-pinned sdist once per
# machine (75 minutes measured on 2 busy cores), keeps the wheel in $${DENSESSL_WHEEL_CACHE:-~/.cache/densessl/wheels}
# and installs it (seconds when cached). It runs after the lock install, which brings mmcv's build requirements.
$(STAMP): envs/requirements.lock pyproject.toml Makefile envs/build_mmcv.py | $(BIN)/uv
	$(BIN)/uv pip install --python $(BIN)/python --require-hashes -r envs/requirements.lock
	$(BIN)/uv pip install --python $(BIN)/python --no-deps -e .
	$(BIN)/python envs/build_mmcv.py
	$(BIN)/python -m compileall -q -j 0 $(VENV)/lib src > $(VENV)/compileall.log 2>&1 || true
	$(BIN)/python -m densessl doctor
	touch $(STAMP)

# After the DAG: `densessl check-report` fails unless the supervised reference beats the best random-init seed of
# its network on every protocol that enforces the check (baselines.protocols.<p>.enforce_reference_check;
# docs/learning_signal.md); the methods' own margins are reported, not checked.
smoke: $(STAMP)
	$(BIN)/snakemake --cores $(CORES) --config preset=smoke $(SMOKE_ARGS)
	@echo; cat results/smoke/report/report.md; echo; echo "report: results/smoke/report/index.html"
	$(BIN)/python -m densessl check-report --config config.yaml --preset smoke

dry-run: $(STAMP)
	$(BIN)/snakemake -n

test: $(STAMP) browser
	$(BIN)/python -m pytest -q tests

# Debian's chromium for tests/test_report_browser.py (the HTML report in a headless browser). Installed when
# missing where this runs as root with apt-get; elsewhere the browser tests skip, naming the fix.
browser:
	@command -v chromium >/dev/null && exit 0; \
	if [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null; then \
	  export DEBIAN_FRONTEND=noninteractive; \
	  apt-get install -y -q chromium >/dev/null 2>&1 || { apt-get update -q >/dev/null 2>&1 && apt-get install -y -q chromium >/dev/null 2>&1; } \
	    || echo "make: chromium could not be installed; the report's browser tests skip" >&2; \
	else echo "make: no chromium (apt-get install chromium, as root); the report's browser tests skip" >&2; fi

test-fast: $(STAMP)
	$(BIN)/python -m pytest -q -m "not e2e" tests

# The DAG through workflow/profiles/slurm on a one-node SLURM cluster that the test starts on loopback (its
# own munge key, config and ports under a temporary folder; slurmdbd on a MariaDB bound to 127.0.0.1, so sacct
# answers; two fake GPUs as gres), with a preemption that requeues the job in place and resumes from the
# previous checkpoint after the newest was torn, and a time-limited job that requeues itself;
# tests/test_slurm_launch.py: a pretraining job of 2 srun tasks (gloo), and the same run through
# `python -m densessl launch` (submitit). Needs root; installs Debian's SLURM 22.05 daemons, slurmdbd, MariaDB
# and munge when they are missing.
SLURM_TOOLS := /usr/sbin/slurmctld /usr/sbin/slurmd /usr/sbin/slurmdbd /usr/sbin/mariadbd /usr/sbin/munged /usr/bin/sbatch
test-slurm: $(STAMP)
	@for f in $(SLURM_TOOLS); do [ -x $$f ] || missing=1; done; \
	if [ -n "$$missing" ]; then \
	  command -v apt-get >/dev/null || { echo "test-slurm: install slurmctld, slurmd, slurm-client, slurmdbd, mariadb-server and munge" >&2; exit 1; }; \
	  export DEBIAN_FRONTEND=noninteractive; pkgs="slurmctld slurmd slurm-client slurmdbd mariadb-server munge"; \
	  apt-get install -y -q $$pkgs >/dev/null || { apt-get update -q >/dev/null && apt-get install -y -q $$pkgs >/dev/null; } || exit 1; \
	fi
	DENSESSL_TEST_SLURM=1 $(BIN)/python -m pytest -q -m slurm tests/test_slurm.py tests/test_slurm_launch.py

lint: $(STAMP)
	$(BIN)/ruff check src tests
	$(BIN)/python workflow/lint.py --configfile config.yaml

# Re-resolve the lock from pyproject.toml (needs network). Commit the result.
lock: | $(BIN)/uv
	$(BIN)/uv pip compile pyproject.toml --extra dev --generate-hashes --python-version 3.11 \
	  --python-platform x86_64-manylinux_2_28 -o envs/requirements.lock

clean-smoke:
	rm -rf results/smoke
