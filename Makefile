# Two entry points: `make demo` (the whole story on a local Ray) and `make test` (the suite).
# Both build .venv first. torch is installed before the project, pinned, so pip never resolves a
# multi-GB CUDA build; override with e.g. `make test TORCH_SPEC='torch==2.14.1'`.

PYTHON ?= python3
VENV ?= .venv
TORCH_SPEC ?= torch==2.13.0
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed

.PHONY: demo test venv protos clean

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

protos: $(STAMP)
	$(PY) protos/generate.py

clean:
	rm -rf $(VENV) data .pytest_cache
