# Every target does its own set-up: a fresh clone needs only `make demo` or `make test`.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed

.PHONY: demo test lint docs bench clean

$(STAMP): pyproject.toml constraints.txt
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q -c constraints.txt -e '.[all]'
	touch $(STAMP)

demo: $(STAMP)
	$(VENV)/bin/spade-ad demo -o demo_out

test: $(STAMP)
	bash scripts/install-browser-deps.sh
	$(VENV)/bin/ruff check src tests benchmarks
	$(VENV)/bin/lint-imports
	NO_MKDOCS_2_WARNING=1 $(VENV)/bin/mkdocs build --strict -q
	$(PY) -m pytest -q

lint: $(STAMP)
	$(VENV)/bin/ruff check src tests benchmarks
	$(VENV)/bin/lint-imports

# The documentation site (mkdocs.yml, docs/) into site/, warnings as errors; `mkdocs serve` to read it locally.
docs: $(STAMP)
	NO_MKDOCS_2_WARNING=1 $(VENV)/bin/mkdocs build --strict

bench: $(STAMP)
	$(PY) -m pip install -q -c constraints.txt -e '.[bench]'
	$(PY) benchmarks/bench_search.py
	$(PY) benchmarks/bench_scale.py
	$(PY) benchmarks/bench_service.py --seconds 30

clean:
	rm -rf $(VENV) demo_out site
