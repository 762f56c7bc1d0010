# Two commands do everything on a fresh machine: `make demo` and `make test`.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed

.PHONY: setup setup-browser demo test test-fast lint lock clean

setup: $(STAMP)

# The exact versions of requirements.lock, then the project itself without resolving anything
# again: every machine and CI run the same pyarrow, AWS SDK and test tools. Re-installs only when
# the dependency list or the lock changes: a second `make setup` is instant.
$(STAMP): pyproject.toml requirements.lock
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet --disable-pip-version-check -r requirements.lock
	$(PY) -m pip install --quiet --disable-pip-version-check --no-deps -e .
	$(PY) -m pip check
	touch $(STAMP)

# Refresh requirements.lock: resolve pyproject.toml (with its dev extra) afresh in a scratch
# environment and freeze it. Run it after changing a dependency, and commit the lock.
LOCK_VENV := .lock-venv
lock:
	rm -rf $(LOCK_VENV)
	$(PYTHON) -m venv $(LOCK_VENV)
	$(LOCK_VENV)/bin/python -m pip install --quiet --upgrade pip
	$(LOCK_VENV)/bin/python -m pip install --quiet --disable-pip-version-check -e '.[dev]'
	{ sed -n '1,/^[^#]/{/^#/p}' requirements.lock; \
	  $(LOCK_VENV)/bin/python -m pip freeze --exclude-editable; } > requirements.lock.new
	mv requirements.lock.new requirements.lock
	rm -rf $(LOCK_VENV)

# Headless Chromium from Debian's packages, for the report's browser test (tests/test_report.py);
# nothing happens where `chromium` is already on PATH. As root, or through sudo where there is one.
setup-browser:
	@command -v chromium >/dev/null 2>&1 || { \
	  if [ "$$(id -u)" = 0 ]; then SUDO=; elif command -v sudo >/dev/null 2>&1; then SUDO=sudo; \
	  else echo "make setup-browser: chromium is missing; install Debian's chromium package as root" >&2; exit 1; fi; \
	  $$SUDO apt-get update -q && \
	  $$SUDO env DEBIAN_FRONTEND=noninteractive apt-get install -y -q --no-install-recommends chromium; }

demo: setup
	$(PY) -m jobs.quickstart --budget-minutes 10

test: setup setup-browser
	$(PY) -m pytest -q

test-fast: setup setup-browser
	$(PY) -m pytest -q -m "not slow"

lint: setup
	$(PY) -m ruff check .

clean:
	rm -rf demo-output .pytest_cache .ruff_cache .lock-venv
