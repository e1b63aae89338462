# make test   install what is missing, build the extension, run the whole test suite and the
#             benchmark suite once as a smoke test (--benchmark-disable)
# make bench  install what is missing, build the extension, run python -m fused_resnet.bench
#             (results.json and speedup.png in bench-out/; BENCH_ARGS="--output DIR" for another)
# make nvcc-check  compile the CUDA sources with nvcc (no GPU, no build needed)
# make device-twin the GPU machine's stack (Python 3.12, torch 2.11.0, triton 3.6.0) in a cached
#             virtual environment: builds the sm_90 extension that travels to the GPU machine,
#             compiles the Triton kernels for sm_90, runs the CPU suite (benchmarks/device_twin.sh)
#
# An importable torch is used as it is; only when none is importable is torch==2.14.1 with
# torchvision==0.29.1 installed: the CUDA build `pip install torch` gives users on Linux, so the
# CUDA kernels are compiled and linked (nothing CUDA runs without a GPU; the suite runs on CPU
# tensors). Packages already importable are not reinstalled.

PYTHON ?= python
PIP := $(PYTHON) -m pip
PYTEST_ARGS ?=
# pytest-xdist workers for the test suite: one per core
TEST_WORKERS ?= auto
BENCH_ARGS ?=

.PHONY: install test bench nvcc-check device-twin clean

install:
	@$(PYTHON) -c "import torch" 2>/dev/null || $(PIP) install torch==2.14.1 torchvision==0.29.1
	@for pkg in setuptools:setuptools wheel:wheel ninja:ninja numpy:numpy triton:triton pytest:pytest \
	            pytest_benchmark:pytest-benchmark xdist:pytest-xdist hypothesis:hypothesis \
	            sklearn:scikit-learn tqdm:tqdm matplotlib:matplotlib; do \
	    mod=$${pkg%%:*}; dist=$${pkg##*:}; \
	    $(PYTHON) -c "import $$mod" 2>/dev/null || $(PIP) install "$$dist" || exit 1; \
	done
	@# timm, for the model-zoo tests, only beside an importable torchvision: timm depends on
	@# torchvision, and pip would otherwise fetch one, and a torch with it
	@$(PYTHON) -c "import timm" 2>/dev/null || ! $(PYTHON) -c "import torchvision" 2>/dev/null \
	    || $(PIP) install "timm==1.0.31" || exit 1
	@# pip's editable build starts from scratch every time (minutes with the CUDA kernels): build
	@# only when no build by this Python and torch is recorded, a source or setup.py is newer than
	@# the record, or the extension does not load. `make clean` forgets the record.
	@stamp="build/.installed-$$($(PYTHON) -c 'import hashlib, sys, torch; print(hashlib.sha1(f"{sys.prefix} {torch.__version__}".encode()).hexdigest()[:12])')"; \
	if [ -f "$$stamp" ] && [ -z "$$(find csrc setup.py -newer "$$stamp" -print -quit)" ] \
	    && $(PYTHON) -c "import fused_resnet, sys; sys.exit(fused_resnet.EXTENSION_ERROR is not None)" 2>/dev/null; then \
	  echo "fused_resnet: the extension is up to date (built by this Python and torch; make clean to rebuild)"; \
	else \
	  $(PIP) install --no-build-isolation --no-deps -e . && mkdir -p build && touch "$$stamp"; \
	fi

test: install
	$(PYTHON) -m pytest tests -rs -n $(TEST_WORKERS) --durations=20 $(PYTEST_ARGS)
	$(PYTHON) -m pytest benchmarks --benchmark-disable $(PYTEST_ARGS)

# compile-only check of the CUDA sources with this machine's nvcc and the build's flags (no GPU needed)
nvcc-check:
	FUSED_RESNET_NVCC_CHECK=1 $(PYTHON) -m pytest tests/test_cuda_compile.py -rs -s $(PYTEST_ARGS)

bench: install
	$(PYTHON) -m fused_resnet.bench $(BENCH_ARGS)

device-twin:
	bash benchmarks/device_twin.sh

clean:
	rm -rf build *.egg-info fused_resnet/_C*.so
