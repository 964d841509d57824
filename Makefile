# Two entry points: `make demo` (the whole story on a local Ray) and `make test` (the suite).
# Both build .venv first. torch is installed before the project, pinned, so pip never resolves a
# multi-GB CUDA build; override with e.g. `make test TORCH_SPEC='torch==2.14.1'`.
# `make bench` adds the bench extra and runs the quick benchmarks (BENCHMARKS.md: full commands).

PYTHON ?= python3
VENV ?= .venv
TORCH_SPEC ?= torch==2.13.0
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed
BENCH_STAMP := $(VENV)/.installed-bench
RESULTS ?= benchmarks/results/quick

.PHONY: demo test bench venv protos clean

venv: $(STAMP)

$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet '$(TORCH_SPEC)'
	$(PY) -m pip install --quiet -e '.[server,test]'
	touch $@

demo: $(STAMP)
	$(VENV)/bin/loader demo

test: $(STAMP)
	$(PY) -m pytest -q

$(BENCH_STAMP): $(STAMP) pyproject.toml
	$(PY) -m pip install --quiet -e '.[server,test,bench]'
	touch $@

# About 15 minutes on 2 cores; results (JSON and markdown) under $(RESULTS).
bench: $(BENCH_STAMP)
	mkdir -p $(RESULTS)
	$(PY) benchmarks/tar_read.py --json $(RESULTS)/tar_read.json
	$(PY) benchmarks/throughput.py --quick --json $(RESULTS)/throughput.json

protos: $(STAMP)
	$(PY) protos/generate.py

clean:
	rm -rf $(VENV) data .pytest_cache
