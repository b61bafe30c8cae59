# `make run` and `make test` set everything up on a machine that has only Python 3.11+.
PYTHON ?= python3
VENV ?= .venv
BIN = $(VENV)/bin

.PHONY: install run test bench faults clean

$(BIN)/.installed: pyproject.toml
	@$(PYTHON) -c 'import sys; sys.exit(0 if sys.version_info >= (3, 11) else "Python 3.11 or newer is needed; set PYTHON=python3.11")'
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip
	$(BIN)/pip install --quiet -e '.[test]'
	touch $@

install: $(BIN)/.installed

run: install
	$(BIN)/environment-provider demo --providers providers --examples examples

test: install
	$(BIN)/pytest -q

bench: install
	$(BIN)/python benchmarks/run.py

faults: install
	$(BIN)/python faults/run.py

clean:
	rm -rf $(VENV) *.egg-info .pytest_cache
