# xrfnb: all set-up lives here. `make serve` and `make test` work on a fresh clone.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed

.PHONY: install serve test lab lint bench clean browser-deps lock

$(PY):
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip

# torch first and pinned: 2.13.0 is the CPU wheel on the project machines' disk.
# constraints.txt pins every dependency to the versions the test suite last passed with (`make lock`),
# so a new release upstream cannot change what a fresh clone installs.
$(STAMP): pyproject.toml constraints.txt | $(PY)
	$(PY) -m pip install -q -c constraints.txt "torch==2.13.0"
	$(PY) -m pip install -q -c constraints.txt -e ".[test]"
	touch $(STAMP)

install: $(STAMP)

# Chromium for the real-browser dashboard test (Debian packages; never `playwright install`).
browser-deps:
	@command -v chromium >/dev/null 2>&1 || { \
	  if [ "$$(id -u)" = "0" ] && command -v apt-get >/dev/null 2>&1; then \
	    apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium chromium-driver >/dev/null; \
	  else echo "chromium missing and cannot install it (not root): browser tests will skip"; fi; }

serve: install
	$(VENV)/bin/xrfnb serve

test: install browser-deps
	$(VENV)/bin/ruff check xrfnb tests benchmarks dashboards
	$(VENV)/bin/python -m pytest

lab: install
	$(VENV)/bin/jupyter lab notebooks $$([ "$$(id -u)" = "0" ] && echo --allow-root)

lint: install
	$(VENV)/bin/ruff check xrfnb tests benchmarks dashboards

bench: install
	$(PY) -m pip install -q -c constraints.txt -e ".[test,bench]"
	for b in benchmarks/bench_*.py benchmarks/eval_*.py; do $(PY) $$b || exit 1; done

clean:
	rm -rf $(VENV) build *.egg-info

# Refresh constraints.txt: resolve the newest versions pyproject.toml allows in a scratch venv and pin
# them all. Then run `make clean test`; commit constraints.txt only when that passes.
LOCK_VENV := .venv-lock
lock:
	rm -rf $(LOCK_VENV)
	$(PYTHON) -m venv $(LOCK_VENV)
	$(LOCK_VENV)/bin/python -m pip install -q --upgrade pip
	$(LOCK_VENV)/bin/python -m pip install -q "torch==2.13.0"
	$(LOCK_VENV)/bin/python -m pip install -q -e ".[test,bench]"
	{ echo "# Versions the test suite passed with; made by \`make lock\` (see Makefile). Used by make install."; \
	  $(LOCK_VENV)/bin/python -m pip freeze --exclude-editable | grep -v '^-e ' | sed 's/^torch==\([0-9.]*\)+cpu$$/torch==\1/'; \
	} > constraints.txt
	rm -rf $(LOCK_VENV)
