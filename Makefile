# Two set-up commands are kept true on a fresh machine: `make demo` and `make test`.
# Both create .venv when missing and install the project (torch==2.13.0 CPU build first, so pip never
# pulls a multi-GB CUDA build); re-running them only re-installs when pyproject.toml changed.
# The web UI's browser test drives Debian's chromium through playwright (pip, test extra); the set-up installs
# chromium with apt-get when /usr/bin/chromium is missing (never `playwright install`, which downloads browsers).
PYTHON ?= python3
VENV   ?= .venv
PY     := $(VENV)/bin/python
STAMP  := $(VENV)/.hyperdiff-installed
CHROMIUM := /usr/bin/chromium
SUDO   := $(shell [ "$$(id -u)" = 0 ] || echo sudo)

.PHONY: setup test demo bench clean

$(STAMP): pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --disable-pip-version-check torch==2.13.0
	$(PY) -m pip install -q --disable-pip-version-check -e '.[test]'
	touch $(STAMP)

# Debian chromium for tests/test_ui_browser.py: `apt-get update` only when the package is not found without it.
# Without apt-get (not Debian) it says so and the browser test skips.
$(CHROMIUM):
	@if command -v apt-get >/dev/null; then \
	  $(SUDO) env DEBIAN_FRONTEND=noninteractive apt-get install -y -q chromium || \
	  { $(SUDO) apt-get update -q && $(SUDO) env DEBIAN_FRONTEND=noninteractive apt-get install -y -q chromium; }; \
	else echo "no apt-get: install chromium as $(CHROMIUM) for the browser test (skipped without it)"; fi

setup: $(STAMP) $(CHROMIUM)

test: setup
	HF_HUB_OFFLINE=1 $(PY) -m pytest -q

demo: $(STAMP)
	HF_HUB_OFFLINE=1 $(VENV)/bin/hyperdiff demo

bench: $(STAMP)
	HF_HUB_OFFLINE=1 $(PY) scripts/bench_core.py --out bench/core.json
	HF_HUB_OFFLINE=1 $(PY) scripts/bench_cli.py --out bench/cli.json

clean:
	rm -rf outputs bench .pytest_cache
