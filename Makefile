# `make demo` and `make test` do all set-up on a fresh machine.
PY      ?= python3
VENV    := .venv
VPY     := $(VENV)/bin/python
STAMP   := $(VENV)/.installed-dev
BSTAMP  := $(VENV)/.installed-bench

.PHONY: demo test bench docs clean

$(VPY):
	$(PY) -m venv $(VENV)
	$(VPY) -m pip install -q --upgrade pip

$(STAMP): $(VPY) pyproject.toml constraints.txt
	$(VPY) -m pip install -q -e '.[dev]' -c constraints.txt
	touch $@

$(BSTAMP): $(STAMP)
	$(VPY) -m pip install -q -e '.[dev,bench]' -c constraints.txt
	touch $@

demo: $(STAMP)
	$(VENV)/bin/surgery demo

test: $(STAMP)
	$(VPY) -m pytest -q

docs: $(STAMP)
	NO_MKDOCS_2_WARNING=1 $(VENV)/bin/mkdocs build --strict

bench: $(BSTAMP)
	$(VPY) benchmarks/run_all.py

clean:
	rm -rf $(VENV) build site *.egg-info .pytest_cache
