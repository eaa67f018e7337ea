# Two commands do everything (both create .venv on first use and are safe to repeat):
#   make run    set up, then run the main job: train ultra-tiny on this Python's standard library
#   make test   set up, then run the test suite
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
INSTALLED := $(VENV)/.installed
# Runs a command with Debian's OpenBLAS preloaded when it is installed (Linux; see README).
FAST_BLAS := $(BIN)/python -m power_retention --

.PHONY: setup run demo test bench clean

setup: $(INSTALLED)

$(INSTALLED): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -m pip install --quiet -e ".[dev]"
	touch $(INSTALLED)

run: $(INSTALLED)
	$(FAST_BLAS) $(BIN)/python train.py --model ultra-tiny

demo: $(INSTALLED)
	$(FAST_BLAS) $(BIN)/python demo.py

test: $(INSTALLED)
	$(FAST_BLAS) $(BIN)/python -m pytest -q

bench: $(INSTALLED)
	$(FAST_BLAS) $(BIN)/python benchmarks/bench_retention.py

clean:
	rm -rf $(VENV) *.egg-info .pytest_cache .hypothesis
