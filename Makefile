# Two commands on a fresh machine with Python 3.10+:  `make demo`  and  `make test`.
PYTHON ?= python3
VENV   := .venv
PY     := $(VENV)/bin/python
STAMP  := $(VENV)/.installed

.PHONY: setup demo lint test bench clean

setup: $(STAMP)

$(STAMP): pyproject.toml constraints.txt
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	# torch first, pinned, so nothing can pull a CUDA build from the registry
	$(PY) -m pip install --quiet -c constraints.txt torch
	$(PY) -m pip install --quiet -c constraints.txt -e ".[dev]"
	touch $(STAMP)

# Pretrain the `tiny` preset on the built-in corpus (CPython's own docs), then print a sample.
demo: setup
	$(PY) -m minipretrain train --config configs/tiny.toml --run-dir runs/demo --overwrite
	$(PY) -m minipretrain generate --ckpt runs/demo --prompt "The" --max-new-tokens 120

# ruff (pinned in constraints.txt; rules in pyproject.toml) over the code, the tests and the benchmarks
lint: setup
	$(PY) -m ruff check src tests benchmarks

test: setup lint
	$(PY) -m pytest tests

bench: setup
	$(PY) benchmarks/throughput.py --config configs/minimind2-26m.toml --batch-size 4 --seq-len 512

clean:
	rm -rf $(VENV) runs build *.egg-info src/*.egg-info
