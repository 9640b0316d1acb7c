# Two set-up commands are kept true on a fresh machine: `make demo` and `make test`.
# Both create .venv when missing and install the project (torch==2.13.0 CPU build first, so pip never
# pulls a multi-GB CUDA build); re-running them only re-installs when pyproject.toml changed.
PYTHON ?= python3
VENV   ?= .venv
PY     := $(VENV)/bin/python
STAMP  := $(VENV)/.hyperdiff-installed

.PHONY: setup test demo bench clean

$(STAMP): pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --disable-pip-version-check torch==2.13.0
	$(PY) -m pip install -q --disable-pip-version-check -e '.[test]'
	touch $(STAMP)

setup: $(STAMP)

test: setup
	HF_HUB_OFFLINE=1 $(PY) -m pytest -q

demo: setup
	HF_HUB_OFFLINE=1 $(VENV)/bin/hyperdiff demo

bench: setup
	HF_HUB_OFFLINE=1 $(PY) scripts/bench_core.py --out bench/core.json

clean:
	rm -rf outputs bench .pytest_cache
