# Two commands on a fresh machine:  `make demo`  (the embedded end-to-end demo)  and  `make test`.
# Both create (or reuse) a local virtualenv in .venv and install what they need into it.
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
# The CPU build of torch; on GPU clusters use environment.yml instead.
TORCH_SPEC ?= torch==2.13.0
STAMP := $(VENV)/.installed

.PHONY: demo test test-all venv clean

$(STAMP): pyproject.toml Makefile
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	$(BIN)/pip install -q "$(TORCH_SPEC)" numpy
	$(BIN)/pip install -q -e ".[dev,gpu]"
	touch $(STAMP)

venv: $(STAMP)

demo: $(STAMP)
	$(BIN)/python -m rcm.demo --out demo_out

test: $(STAMP)
	$(BIN)/python -m pytest -q -m "not gpu" tests

clean:
	rm -rf demo_out runs outputs .pytest_cache
