# Entropy at Test Time: one command builds the book, one runs the tests. Each installs what it needs.
#   make book                      execute every notebook (quick profile), regenerate results pages, render HTML
#   make book CHAPTER="tta/sar"    one chapter (a glob over <part>/<slug>); PROFILE=paper for the paper profile
#   make test                      unit tests, nbval over every notebook, schema, determinism, offline, fresh-venv,
#                                  results under emulated other CPUs (tests/test_portability.py)
#   make robustness                every chapter on a second set of seeds: which verdicts hold (not in CI)
SHELL := /bin/bash
PYTHON ?= python3
VENV ?= .venv
PROFILE ?= quick
CHAPTER ?= *
JOBS ?= 2
PY := $(VENV)/bin/python
# The venv's python first on PATH: Jupyter kernels are started as "python".
export PATH := $(abspath $(VENV))/bin:$(PATH)

LOCK := requirements-lock.txt

.PHONY: install book execute pages html test test-fast test-emulated robustness lock clean

install: $(VENV)/.installed

# The CPU wheel of torch 2.13.0 first (pip finds it locally), so that `torch>=2.1` is already satisfied;
# then the library and its dev tools at the exact versions of the lock file (pip constraints).
$(VENV)/.installed: pyproject.toml $(LOCK)
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet torch==2.13.0
	$(PY) -m pip install --quiet -c $(LOCK) -e ".[dev]"
	$(PY) -m pip check
	touch $@

execute: install
	$(PY) -m shared.book.execute --profile $(PROFILE) --select "$(CHAPTER)" --jobs $(JOBS)

pages: install
	$(PY) -m shared.book.pages

html: install
	$(VENV)/bin/jupyter-book build . --toc book/_toc.yml --config _config.yml -W -n --keep-going
	@echo "The book: file://$(abspath _build/html/index.html)"

book: install
	@start=$$(date +%s); \
	$(MAKE) --no-print-directory execute pages html && \
	echo "make book: $$(( $$(date +%s) - start )) s in all"

test: install
	@start=$$(date +%s); \
	$(PY) -m pytest -n $(JOBS) --dist loadfile; status=$$?; \
	echo "make test: $$(( $$(date +%s) - start )) s in all"; exit $$status

test-fast: install
	$(PY) -m pytest -n $(JOBS) --dist loadfile -m "not slow"

# nbval over every notebook with the kernels started under another CPU's dispatch limits
# (shared.kernels.EMULATED_CPUS); the committed results files must come out identical.
test-emulated: install
	ENTROPY_BOOK_EMULATE_CPU=$${CPU:-avx} $(PY) -m pytest -n $(JOBS) --dist loadfile book chapters templates

# Every chapter again on a second, disjoint set of seeds; writes results/robustness.json (not part of CI).
robustness: install
	$(PY) -m shared.book.robustness --select "$(CHAPTER)" --jobs $(JOBS)
	$(PY) -m shared.book.pages

# Rewrite the lock file from the current environment (after a deliberate upgrade).
lock: install
	{ head -3 $(LOCK); $(PY) -m pip freeze --exclude-editable | sed 's/^torch==\(.*\)+cpu$$/torch==\1/'; } > $(LOCK).new && mv $(LOCK).new $(LOCK)

clean:
	rm -rf _build
