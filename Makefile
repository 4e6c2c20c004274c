# `make demo` and `make test` each create .venv when it is missing and install dissect into it.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed-test

.PHONY: help demo test lint install clean

help:  ## list the targets
	@grep -E '^[a-z]+:.*## ' $(MAKEFILE_LIST) | sed 's/:.*## /\t/' | expand -t 10

$(BIN)/python:
	$(PYTHON) -m venv $(VENV)

$(STAMP): setup.py | $(BIN)/python
	$(BIN)/python -m pip install -q -e '.[test]'
	touch $(STAMP)

install: $(STAMP)  ## create .venv and install dissect with its test extra (then: . .venv/bin/activate)

demo: $(STAMP)  ## the whole job on the toy dataset and toy model; prints where the report is
	$(BIN)/dissect demo

test: $(STAMP) lint  ## the test suite (pytest) and the lint
	$(BIN)/python -m pytest

lint: $(STAMP)  ## ruff check of the package, tests and scripts
	$(BIN)/ruff check dissect tests scripts

clean:  ## remove .venv, build files and the demo report
	rm -rf $(VENV) build *.egg-info reports/demo
